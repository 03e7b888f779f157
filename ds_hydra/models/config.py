"""Schema of the ``model`` config group (torch-free: imported by the ConfigStore registration)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class GPTConfig:
    """A decoder-only transformer in the GPT-2 / nanoGPT mould."""

    _target_: str = "ds_hydra.models.gpt.GPT"
    n_layer: int = 4
    """Number of transformer blocks (the ``blocks`` ModuleList that checkpoint policies address)."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 64
    """Longest context the model sees (size of the learned position table)."""
    vocab_size: Optional[int] = None
    """Vocabulary size; ``null`` takes it from the data set (65 for Tiny Shakespeare characters)."""
    pad_vocab_to: int = 1
    """Round the embedding table up to a multiple of this (64 speeds up GPU matmuls)."""
    head_chunk_tokens: int = 0
    """Compute the output layer and loss this many tokens at a time, recomputing each chunk's logits in
    backward, so the (batch, block_size, vocab) logits are never held (forward then returns None for
    the logits when given targets); 0: all at once. Saves memory when the vocabulary is large."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 disables it)."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers (nanoGPT's character runs use none)."""


def validate_model(cfg, prefix: str = "model") -> List[str]:
    """Range checks the type system cannot express; returns one message per problem."""
    problems = []
    for key in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to"):
        if cfg[key] < 1:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 1")
    if cfg.get("head_chunk_tokens", 0) < 0:
        problems.append(f"{prefix}.head_chunk_tokens={cfg.head_chunk_tokens}: must be >= 0 (0: no chunks)")
    if cfg.n_head >= 1 and cfg.n_embd >= 1 and cfg.n_embd % cfg.n_head:
        problems.append(
            f"{prefix}.n_embd={cfg.n_embd}: must be divisible by model.n_head={cfg.n_head}"
        )
    if cfg.vocab_size is not None and cfg.vocab_size < 1:
        problems.append(f"{prefix}.vocab_size={cfg.vocab_size}: must be >= 1 or null (from the data)")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"{prefix}.dropout={cfg.dropout}: must be in [0, 1)")
    return problems
