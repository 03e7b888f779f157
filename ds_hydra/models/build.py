"""Building the run's model from ``cfg.model``: any ``_target_`` the allowlist admits.

The vocabulary is the data's unless the model config sets one: it is passed as ``vocab_size`` to
callables that take that argument (the built-in GPT, ``ds_hydra.models.hf.causal_lm``, and any
user builder with such a parameter).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch.nn as nn

from ds_hydra.errors import UserError, user_error_in
from ds_hydra.instantiate import OWN_KEYS, admits, allowed_prefixes, instantiate, locate_target

if TYPE_CHECKING:
    from ds_hydra.models.quantized_load import BaseShards


# Keys of a model node that say how to store the model, not arguments of its builder.
STORAGE_KEYS = OWN_KEYS["model"]


def build_model(
    model_cfg,
    vocab_size: Optional[int],
    adapter_cfg=None,
    load_base: Optional[Callable[[nn.Module], None]] = None,
    kept_base: Optional[KeptBase] = None,
) -> nn.Module:
    """The model ``model_cfg`` describes, as it trains; a null ``vocab_size`` in it takes the data's ``vocab_size``.

    ``load_base(model)`` loads weights into the base model (``trainer.init_from``, a run's saved base)
    before ``model.quantize`` and the adapter of ``adapter_cfg`` (``ds_hydra.models.adapters``) are applied:
    the trainer, the memory preflight and the loaders of a trained run all build through here, so all of
    them see the same frozen and trainable parameters.

    ``kept_base``: a QLoRA base that a run directory keeps (a random initialisation): read from there, or
    initialised and written there, block by block as it is quantized. Where that path does not apply (not a
    transformers model), the base is built whole and ``load_base`` loads it.
    """
    from ds_hydra.models.adapter_config import adapter_on, quantize_of

    model = None
    if (load_base is None or kept_base is not None) and adapter_on(adapter_cfg) and quantize_of(model_cfg) != "none":
        model = _build_quantized_as_loaded(model_cfg, vocab_size, kept_base)
        if model is not None:
            load_base = None  # the base is in it
    if model is None:
        model = build_base_model(model_cfg, vocab_size)
    if load_base is not None:
        load_base(model)

    if adapter_on(adapter_cfg) or quantize_of(model_cfg) != "none":
        from ds_hydra.models.adapters import adapt_model

        adapt_model(model, model_cfg, adapter_cfg)
    return model


@dataclass(frozen=True)
class KeptBase:
    """A QLoRA base kept in a run directory: ``read_from`` the model directory a first start wrote, or, where
    there is none yet, initialised from the seed and written into ``write_to`` (None: initialised only, as on
    the ranks that do not write)."""

    read_from: Optional[Path] = None
    write_to: Optional["BaseShards"] = None


def _build_quantized_as_loaded(model_cfg, vocab_size: Optional[int], kept_base: Optional[KeptBase] = None) -> Optional[nn.Module]:
    """A transformers model whose base is quantized block by block as it is read or initialised (the load
    then peaks at about the quantized base plus one block, not the whole base at ``model.dtype``); None
    where that path does not apply (another builder, a model built for its shapes only, a file whose names
    differ from the model's), and the caller builds in full and quantizes afterwards."""
    from ds_hydra.models.config import HF_TARGET
    from ds_hydra.models.hf import _shapes_only

    if str(model_cfg.get("_target_")) != HF_TARGET or _shapes_only():
        return None
    import torch

    from ds_hydra.models.adapter_config import quantize_of
    from ds_hydra.models.quantized_load import materialize_quantized

    from ds_hydra.models.quantized_load import construction_draws_only, to_meta

    kept_base = kept_base or KeptBase()
    pretrained = kept_base.read_from or model_cfg.get("pretrained", None)
    states = None
    if pretrained:
        with torch.device("meta"):  # causal_lm reads only config.json on the meta device
            model = build_base_model(model_cfg, vocab_size)
    else:  # draws from the generator as a full build does, so the same seed gives the same weights
        before = torch.random.get_rng_state()
        with construction_draws_only() as draws:
            model = to_meta(build_base_model(model_cfg, vocab_size))
        states = draws.generator_states
    if not materialize_quantized(model, quantize_of(model_cfg), str(pretrained) if pretrained else None,
                                 generator_states=states, keep_base=None if pretrained else kept_base.write_to):
        if states is not None:
            torch.random.set_rng_state(before)  # the full build draws it all again
        return None
    return model


def build_base_model(model_cfg, vocab_size: Optional[int]) -> nn.Module:
    """The model ``model_cfg``'s builder returns, before any quantization or adapter."""
    kwargs = {}
    if model_cfg.get("vocab_size", None) is None and vocab_size is not None and _takes(model_cfg, "vocab_size"):
        kwargs["vocab_size"] = int(vocab_size)
    allowed = allowed_prefixes(model_cfg)  # the root's allowed_targets, before the node is copied
    try:
        model = instantiate(_builder_node(model_cfg), _allowed_=allowed, **kwargs)
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


def _builder_node(model_cfg):
    """``model_cfg`` without the keys its builder does not take (``STORAGE_KEYS``)."""
    present = [key for key in STORAGE_KEYS if key in model_cfg]
    if not present:
        return model_cfg
    from omegaconf import OmegaConf, open_dict

    node = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True))
    with open_dict(node):
        for key in present:
            node.pop(key)
    return node


def _takes(model_cfg, name: str) -> bool:
    """Whether the model's ``_target_`` accepts the argument ``name`` (by name or through **kwargs)."""
    target = str(model_cfg._target_)
    if not admits("model", target, allowed_prefixes(model_cfg)):  # never import what instantiate will refuse
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
    from ds_hydra.models.adapters import unpacked_numel

    return sum(unpacked_numel(p) for p in model.parameters())
