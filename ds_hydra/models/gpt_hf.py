"""The built-in GPT as a Hugging Face ``GPT2LMHeadModel``: the same network in GPT-2's layout.

The architectures agree (pre-LayerNorm blocks, causal softmax attention scaled by 1/sqrt(head size),
a 4x MLP, learned positions, the output layer tied to the token embedding); what differs is layout:

* GPT-2 keeps its projections as ``Conv1D`` with (in, out) weights, the transpose of ``nn.Linear``;
* GPT-2 always has biases: a GPT built with ``bias=false`` gets zero biases;
* our ``F.gelu`` is the exact erf GELU: the config says ``activation_function="gelu"`` (GPT-2's
  default ``gelu_new`` is the tanh approximation);
* our embedding table may be padded (``pad_vocab_to``): only the ``vocab_size`` real rows are kept.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


def gpt2_config(model: nn.Module):
    from transformers import GPT2Config

    dropout = _dropout(model)
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.block_size,
        n_embd=model.n_embd,
        n_layer=model.n_layer,
        n_head=model.n_head,
        activation_function="gelu",
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def _dropout(model: nn.Module) -> float:
    return float(getattr(model.drop, "p", 0.0))


def gpt2_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``GPT2LMHeadModel``'s state dict holding ``model``'s weights (fp32 copies)."""
    V = model.vocab_size
    out: Dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.wte.weight[:V],
        "transformer.wpe.weight": model.wpe.weight,
    }
    out.update(_layer_norm("transformer.ln_f", model.ln_f))
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}"
        out.update(_layer_norm(f"{prefix}.ln_1", block.ln_1))
        out.update(_layer_norm(f"{prefix}.ln_2", block.ln_2))
        out.update(_conv1d(f"{prefix}.attn.c_attn", block.attn.qkv))
        out.update(_conv1d(f"{prefix}.attn.c_proj", block.attn.proj))
        out.update(_conv1d(f"{prefix}.mlp.c_fc", block.mlp.fc))
        out.update(_conv1d(f"{prefix}.mlp.c_proj", block.mlp.proj))
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.detach().float().clone() for k, v in out.items()}


def _layer_norm(name: str, norm: nn.Module) -> Dict[str, torch.Tensor]:
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)
    return {f"{name}.weight": norm.weight, f"{name}.bias": bias}


def _conv1d(name: str, linear: nn.Linear) -> Dict[str, torch.Tensor]:
    """nn.Linear (out, in) -> Conv1D (in, out)."""
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype)
    return {f"{name}.weight": linear.weight.t(), f"{name}.bias": bias}


def to_gpt2(model: nn.Module) -> nn.Module:
    """A ``GPT2LMHeadModel`` (eval mode, fp32) computing what ``model`` computes."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(gpt2_config(model))
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    # attention masks are buffers some transformers versions keep in the state dict: they are not weights
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"GPT -> GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()
