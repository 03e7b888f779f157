"""Everything that speaks DeepSpeed, on plain torch:

* its JSON config read into ds_hydra's overrides: ``keys`` (DeepSpeed's names and what each maps to),
  ``json_import`` (reading a file and mapping it), ``command_line`` (``deepspeed_config=<file>`` before
  Hydra parses the command line), ``import_task`` (``task=import_deepspeed``: the overrides as a preset);
* its JSON config written from ds_hydra's: ``json_export`` (``task=export_deepspeed``, and the
  DeepSpeed engine's config);
* its learning-rate schedules with DeepSpeed's object API (``lr_schedules``);
* its activation-checkpointing module (``checkpointing``, also importable as ``ds_hydra.checkpointing``);
* its ``activation_checkpointing`` keys in the ``ckpt`` group and what they mean in ds_hydra
  (``activation_checkpointing_config``: ``number_checkpoints`` is ``segments``, ``cpu_checkpointing`` ``offload``);
* its own checkpoint files, loaded with ``weights_only=True`` (``checkpoint_loading``).

The engine that runs DeepSpeed itself is ``ds_hydra.engine.deepspeed_engine``.
"""
