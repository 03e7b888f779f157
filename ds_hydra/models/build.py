"""Building the run's model from ``cfg.model``: any ``_target_`` the allowlist admits.

The vocabulary is the data's unless the model config sets one: it is passed as ``vocab_size`` to
callables that take that argument (the built-in GPT, ``ds_hydra.models.hf.causal_lm``, and any
user builder with such a parameter).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch.nn as nn

from ds_hydra.errors import UserError, user_error_in
from ds_hydra.instantiate import allowed_prefixes, instantiate, is_allowed, locate_target


def build_model(model_cfg, vocab_size: Optional[int]) -> nn.Module:
    """The model ``model_cfg`` describes; a null ``vocab_size`` in it takes the data's ``vocab_size``."""
    kwargs = {}
    if model_cfg.get("vocab_size", None) is None and vocab_size is not None and _takes(model_cfg, "vocab_size"):
        kwargs["vocab_size"] = int(vocab_size)
    try:
        model = instantiate(model_cfg, **kwargs)
    except Exception as exc:  # Hydra wraps what the builder raised: hand back the user's one line
        error = user_error_in(exc)
        if error is None:
            raise
        raise error from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model._target_={model_cfg._target_}: returned a {type(model).__name__}, not a torch.nn.Module "
            f"(a model is a module called as model(input_ids) that returns logits)"
        )
    return model


def _takes(model_cfg, name: str) -> bool:
    """Whether the model's ``_target_`` accepts the argument ``name`` (by name or through **kwargs)."""
    target = str(model_cfg._target_)
    if not is_allowed(target, allowed_prefixes(model_cfg)):  # never import what instantiate will refuse
        return False
    try:
        params = inspect.signature(locate_target(target)).parameters
    except (ImportError, TypeError, ValueError):  # refused or odd targets: instantiate reports those
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def num_params(model: nn.Module) -> int:
    """Parameters the model reports as its size (``num_params()`` when it has one), else all of them."""
    if hasattr(model, "num_params"):
        return int(model.num_params())
    return sum(p.numel() for p in model.parameters())
