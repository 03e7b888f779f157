"""ds_hydra: DeepSpeed-style memory-efficient training of PyTorch models, configured with Hydra.

Names are imported lazily, so ``import ds_hydra`` (and composing configs) does not import torch.
"""
from ds_hydra.lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "cli_main": "ds_hydra.cli",
    "train": "ds_hydra.train_task",
    "checkpoint_activations": "ds_hydra.activation_checkpointing.apply",
    "remove_activation_checkpointing": "ds_hydra.activation_checkpointing.apply",
    "SavedActivationCounter": "ds_hydra.activation_checkpointing.counter",
    "GPT": "ds_hydra.models.gpt",
    "register_configs": "ds_hydra.config_store",
    "default_inference_config": "ds_hydra.inference.config",
    "generate": "ds_hydra.inference.generate",
    "load_run": "ds_hydra.inference.loading",
    "load_model": "ds_hydra.inference.loading",
    "DeepSpeedOptimizerCallable": "ds_hydra.optim.types",
    "DeepSpeedSchedulerCallable": "ds_hydra.optim.types",
    "_LRScheduler": "ds_hydra.optim.types",
    "WarmupLR": "ds_hydra.deepspeed.lr_schedules",
    "WarmupDecayLR": "ds_hydra.deepspeed.lr_schedules",
    "WarmupCosineLR": "ds_hydra.deepspeed.lr_schedules",
    "OneCycle": "ds_hydra.deepspeed.lr_schedules",
    "LRRangeTest": "ds_hydra.deepspeed.lr_schedules",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_attributes(__name__, _EXPORTS)
