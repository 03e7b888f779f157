"""Schemas of the ``model`` config group and their checks (torch-free: imported by the ConfigStore
registration).

Any node with a ``_target_`` is a model config (the trainer never asks which model it has); the
schemas here type the shipped options, and ``validate_model`` runs the checks of the schema the
node's ``_target_`` belongs to. A user's own model (``model=custom model._target_=...``) is checked
against its builder's signature by ``task=validate`` and trained as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Callable, Dict, List, Optional

from ds_hydra.models.adapter_config import Quantize

GPT_TARGET = "ds_hydra.models.gpt.GPT"
HF_TARGET = "ds_hydra.models.hf.causal_lm"


@dataclass
class GPTConfig:
    """A decoder-only transformer in the GPT-2 / nanoGPT mould."""

    _target_: str = GPT_TARGET
    n_layer: int = 4
    """Number of transformer blocks (the ``blocks`` ModuleList that checkpoint policies address)."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 64
    """Longest context the model sees (size of the learned position table); the default data.seq_len."""
    vocab_size: Optional[int] = None
    """Vocabulary size; ``null`` takes it from the data set (65 for Tiny Shakespeare characters)."""
    pad_vocab_to: int = 1
    """Round the embedding table up to a multiple of this (64 speeds up GPU matmuls)."""
    head_chunk_tokens: int = 0
    """Apply the output layer and the loss this many tokens at a time, recomputing each chunk's logits in
    backward, so the (batch, seq_len, vocab) logits are never held (the model returns a ChunkedHead
    instead of logits); 0: all at once. Saves memory when the vocabulary is large."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 disables it)."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers (nanoGPT's character runs use none)."""
    quantize: Quantize = Quantize.none
    """Store the frozen linear weights of the blocks quantized: nf4 or int8 (QLoRA; needs adapter=lora|dora)."""


class ParamDtype(Enum):
    fp32 = "fp32"  # fp32 master weights; mixed precision comes from trainer.precision
    bf16 = "bf16"  # parameters stored in bfloat16 (half the memory; optimizer state in bf16 too)
    fp16 = "fp16"  # parameters stored in float16 (inference-style; training needs care)


@dataclass
class HFCausalLMConfig:
    """A Hugging Face ``transformers`` causal LM (``pip install 'ds-hydra[hf]'``), built locally, never downloaded."""

    _target_: str = HF_TARGET
    config: Optional[Dict[str, Any]] = None
    """The architecture: ``model_type`` (llama, gpt2, mistral, qwen2, ...) and that config class's fields;
    random initialisation. ``vocab_size`` defaults to the data's. Null with ``pretrained``."""
    pretrained: Optional[str] = None
    """A local model directory (config.json + model.safetensors, e.g. from save_pretrained or task=export_hf)
    to start from; loaded with local_files_only, never from the network."""
    vocab_size: Optional[int] = None
    """Overrides the data's vocabulary for a config-built model (null: the data's, or model.config.vocab_size)."""
    dtype: ParamDtype = ParamDtype.fp32
    """Parameter dtype: fp32 (default, for training with trainer.precision), bf16 or fp16."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (torch's fused attention), eager, or flash_attention_2 (CUDA, flash-attn installed)."""
    quantize: Quantize = Quantize.none
    """Store the frozen linear weights of the blocks quantized: nf4 or int8 (QLoRA; needs adapter=lora|dora)."""


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


def validate_gpt(node, prefix: str = "model") -> List[str]:
    """Range checks the type system cannot express; returns one message per problem. Fields the node
    leaves out (a ``model=custom`` node naming the GPT) take their schema defaults."""
    cfg = {f.name: node.get(f.name, f.default) for f in fields(GPTConfig)}
    problems = []
    for key in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to"):
        if cfg[key] < 1:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 1")
    if cfg["head_chunk_tokens"] < 0:
        problems.append(f"{prefix}.head_chunk_tokens={cfg['head_chunk_tokens']}: must be >= 0 (0: no chunks)")
    if cfg["n_head"] >= 1 and cfg["n_embd"] >= 1 and cfg["n_embd"] % cfg["n_head"]:
        problems.append(f"{prefix}.n_embd={cfg['n_embd']}: must be divisible by model.n_head={cfg['n_head']}")
    if cfg["vocab_size"] is not None and cfg["vocab_size"] < 1:
        problems.append(f"{prefix}.vocab_size={cfg['vocab_size']}: must be >= 1 or null (from the data)")
    if not 0.0 <= cfg["dropout"] < 1.0:
        problems.append(f"{prefix}.dropout={cfg['dropout']}: must be in [0, 1)")
    return problems


def validate_hf(cfg, prefix: str = "model") -> List[str]:
    problems = []
    config, pretrained = cfg.get("config"), cfg.get("pretrained")
    if not config and not pretrained:
        problems.append(
            f"{prefix}.config: set the architecture (e.g. {prefix}.config.model_type=llama and its fields) or "
            f"{prefix}.pretrained=<local model dir>"
        )
    if config and pretrained:
        problems.append(f"{prefix}.config: not with {prefix}.pretrained (the directory's config.json defines the model); drop one")
    if config and not config.get("model_type"):
        problems.append(f"{prefix}.config.model_type: missing; name the architecture, e.g. {prefix}.config.model_type=llama")
    if cfg.get("vocab_size") is not None and cfg.vocab_size < 1:
        problems.append(f"{prefix}.vocab_size={cfg.vocab_size}: must be >= 1 or null (from the data)")
    attn = cfg.get("attn_implementation")
    if attn not in ATTN_IMPLEMENTATIONS:
        problems.append(f"{prefix}.attn_implementation={attn}: allowed values: {', '.join(ATTN_IMPLEMENTATIONS)}")
    return problems


# _target_ -> the checks of its schema; other targets (users' models) have none beyond their signature.
MODEL_VALIDATORS: Dict[str, Callable[..., List[str]]] = {GPT_TARGET: validate_gpt, HF_TARGET: validate_hf}


def validate_model(cfg, prefix: str = "model") -> List[str]:
    """The checks of the model's own schema, chosen by its ``_target_``."""
    validator = MODEL_VALIDATORS.get(str(cfg.get("_target_", "")))
    return validator(cfg, prefix) if validator is not None else []


def configured_blocks(model_cfg) -> Optional[int]:
    """The block count a model config states (``n_layer``, or a Hugging Face config's layer count), if any."""
    for node in (model_cfg, model_cfg.get("config") or {}):
        for key in ("n_layer", "num_hidden_layers", "num_layers"):
            value = node.get(key) if hasattr(node, "get") else None
            if isinstance(value, int):
                return value
    return None


__all__ = ["GPTConfig", "HFCausalLMConfig", "validate_model", "configured_blocks", "MODEL_VALIDATORS"]
