"""Activation checkpointing: recompute chosen blocks in backward instead of storing their activations."""


def __getattr__(name):
    if name in ("checkpoint_activations", "remove_activation_checkpointing", "find_blocks"):
        from ds_hydra.activation_checkpointing import apply

        return getattr(apply, name)
    raise AttributeError(name)


__all__ = ["checkpoint_activations", "remove_activation_checkpointing", "find_blocks"]
