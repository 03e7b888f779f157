"""Everything that speaks DeepSpeed, on plain torch: its JSON config read into ds_hydra's overrides
(``json_import``) and written from them (``json_export``), its activation-checkpointing module
(``checkpointing``, also importable as ``ds_hydra.checkpointing``). The engine that runs DeepSpeed
itself is ``ds_hydra.engine.deepspeed_engine``."""
