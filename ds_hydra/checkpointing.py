"""``import ds_hydra.checkpointing``: the name model code uses for DeepSpeed's activation-checkpointing
module surface. The module itself is ``ds_hydra.deepspeed.checkpointing``; this name is the same module
object (its settings, its monkeypatchable functions), not a copy of its names."""
import sys

from ds_hydra.deepspeed import checkpointing as _module

sys.modules[__name__] = _module
