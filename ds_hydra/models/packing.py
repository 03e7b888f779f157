"""Which models keep packed examples apart (``data.pack=true``).

A packed row holds several examples one after another, with ``position_ids`` restarting at 0 at each
(``ds_hydra.data.sft.build_rows``). The model must then let a token attend only to tokens of its own
example, and count positions from its example's start; otherwise an example's loss depends on its
neighbours in the row. Models that do:

* the built-in GPT (``packs_documents = True``): a block-causal mask for SDPA;
* any model that says so with a class attribute ``packs_documents = True`` (a user's own);
* Hugging Face models whose modeling code builds its mask with ``transformers.masking_utils``
  (``create_causal_mask``) in a transformers that finds packed sequences from ``position_ids``
  (``find_packed_sequence_indices``, transformers >= 4.54), for the attention implementations that
  mask function serves or that use ``position_ids`` themselves (sdpa, eager, flex_attention,
  flash_attention_2/3).

Everything else is refused in one line before step 1: it would silently mix a row's examples.
"""
from __future__ import annotations

import inspect
import sys
from typing import Optional

import torch.nn as nn

from ds_hydra.errors import UserError

__all__ = ["check_packing", "packing_problem"]

# Attention implementations whose packed-sequence handling transformers derives from position_ids.
HF_PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def packing_problem(model: nn.Module) -> Optional[str]:
    """Why ``model`` would let packed examples see each other, or None when it keeps them apart."""
    base = getattr(model, "get_base_model", None)  # an adapter wrapper (peft): the model underneath decides
    if callable(base) and base() is not model:
        return packing_problem(base())
    if getattr(model, "packs_documents", False):
        return None
    name = type(model).__name__
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return f"{name}'s forward takes no position_ids, so nothing tells it where a packed example starts"
    config = getattr(model, "config", None)
    if config is None or not type(model).__module__.startswith("transformers."):
        return f"{name} does not say it keeps packed examples apart (a class attribute packs_documents = True)"
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if masking_utils is None or not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers does not detect packed sequences from position_ids (transformers >= 4.54 does)"
    modeling = sys.modules.get(type(model).__module__)
    if not any(hasattr(modeling, f) for f in ("create_causal_mask", "create_sliding_window_causal_mask")):
        return f"{name}'s modeling code builds its own attention mask, which ignores where packed examples start"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in HF_PACKING_ATTENTION:
        return f"its attention implementation {attention!r} ignores where packed examples start (these do not: {', '.join(HF_PACKING_ATTENTION)})"
    return None


def check_packing(model: nn.Module) -> None:
    """Refuse ``data.pack=true`` in one line for a model that would mix a packed row's examples."""
    problem = packing_problem(model)
    if problem is not None:
        raise UserError(f"data.pack=true: {type(model).__name__} would let packed examples attend to each other ({problem}); use data.pack=false")
