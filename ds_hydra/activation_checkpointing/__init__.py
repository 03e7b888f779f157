"""Activation checkpointing: recompute chosen blocks in backward instead of storing their activations.

One call applies a policy (``checkpoint_activations(model, **ckpt)``; the keywords are the ``ckpt``
config group's fields), one call removes it (``remove_activation_checkpointing``), and
``SavedActivationCounter`` measures what a forward keeps for backward. Modules, one per concern:
``config`` (schema, torch-free), ``blocks`` (finding the block list), ``policies`` (which blocks),
``selective`` (per-op saving), ``planner`` (probe, memory predictions, budget plans), ``counter``
(saved-bytes counting), ``offload`` (host memory), ``apply`` (wiring it into the model).
"""
from ds_hydra.lazy import lazy_attributes

_EXPORTS = {
    "checkpoint_activations": "apply",
    "remove_activation_checkpointing": "apply",
    "checkpointing_state": "apply",
    "plan_checkpointing": "apply",
    "ckpt_config": "apply",
    "find_blocks": "blocks",
    "model_blocks": "blocks",
    "SavedActivationCounter": "counter",
    "probe": "planner",
    "ActivationProfile": "planner",
    "CkptConfig": "config",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
