"""Schemas of the ``loss`` config group (torch-free: imported by the ConfigStore registration)."""
from __future__ import annotations

from dataclasses import dataclass

CROSS_ENTROPY_TARGET = "ds_hydra.loss.cross_entropy.CrossEntropyLoss"
CHUNKED_CROSS_ENTROPY_TARGET = "ds_hydra.loss.cross_entropy.ChunkedCrossEntropyLoss"


@dataclass
class CrossEntropyConfig:
    """Next-token cross-entropy in fp32 over the positions whose label is not -100 (the data's mask)."""

    _target_: str = CROSS_ENTROPY_TARGET


@dataclass
class ChunkedCrossEntropyConfig:
    """The same loss, with the model's output layer applied ``chunk_tokens`` tokens at a time (any model
    whose output layer ds_hydra can find: the built-in GPT, Hugging Face causal LMs): the (batch, seq,
    vocab) logits are never held, one chunk's are instead, and each chunk's logits are recomputed in
    backward (one more output-layer forward: 2 x width x vocab FLOPs per token)."""

    _target_: str = CHUNKED_CROSS_ENTROPY_TARGET
    chunk_tokens: int = 1024
    """Tokens per chunk (over the flattened batch x sequence); fewer: less memory, more kernel launches."""
