"""EleutherAI's lm-evaluation-harness over ds_hydra's models: ``task=lm_eval`` and ``lm_eval.after_training``.

``config`` is the torch-free schema; ``model`` is the harness's model interface over a ds_hydra model
and tokenizer (it imports ``lm_eval``, the ``[eval]`` extra); ``run`` loads the model, runs the tasks
and reports them. ``import ds_hydra`` imports none of them.
"""
