"""Experiment tracking: the destinations ``logger`` adds to ``metrics.jsonl`` (torch-free to import).

``config`` holds the ``logger`` schemas, ``base`` the interface every tracker meets, ``session`` the fan-out the trainer feeds (one warning for a
tracker that fails, its run ids kept in ``<run dir>/trackers.json``), and one module per tracker:
``csv_file``, ``tensorboard``, ``wandb_run``, ``mlflow_run`` (with ``mlflow_store``). ``sweep``
groups a sweep's jobs; ``naming`` says what a run is called.
"""
