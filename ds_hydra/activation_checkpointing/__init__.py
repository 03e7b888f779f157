"""Activation checkpointing: recompute chosen blocks in backward instead of storing their activations.

One call applies a policy (``checkpoint_activations(model, **ckpt)``, the keywords being the ``ckpt``
config group's fields, or ``checkpoint_activations(model, policy=[Full(), Selective()])``), one call
removes it (``remove_activation_checkpointing``), and ``SavedActivationCounter`` measures what a
forward keeps for backward. Modules, one per concern: ``config`` (schema, the policies' configs and
the one mapping of the keys to them, torch-free), ``policies`` (one class per policy: which blocks),
``blocks`` (finding the block list), ``selective`` (per-op saving), ``measure`` (the probe: what each
block saves), ``counter`` (saved-bytes counting), ``offload`` (host memory), ``rng`` (RNG replay, named RNG
states for model-parallel code), ``apply`` (wiring it into the model).
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
    "probe": "measure",
    "ActivationProfile": "measure",
    "CkptConfig": "config",
    "Checkpointing": "policies",
    "Segments": "policies",
    "Full": "policies",
    "EveryN": "policies",
    "MemoryBudget": "policies",
    "Selective": "policies",
    "Offload": "policies",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
