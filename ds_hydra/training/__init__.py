"""Training: the loop and what it needs around it.

``trainer`` (``train(cfg)``, the loop, the model transforms in ``prepare_model``), ``slices`` (the
config slices each component is handed), ``seq_vocab`` (the data fits the model), ``memory_estimate``,
``memory_preflight`` and ``memory_fit`` (one step's memory: estimated, checked against the device, fitted
to a limit), ``state``, ``sharded_checkpoint`` and ``checkpoint_convert`` (checkpoints: ``full`` and
``dcp``), ``init_from`` and ``adapter_base`` (weights a run starts from), ``metrics``, ``nonfinite``,
``throughput``, ``profiling``, ``config`` (the ``trainer`` and ``run`` schemas, torch-free), and
``resume/`` (continuing a run, one module per job, torch-free).
"""
