"""The model contract: what ds_hydra asks of a model, and the loss the trainer computes from its output.

A model is any ``nn.Module`` called as ``model(input_ids)`` with ``input_ids`` of shape (B, T) that
returns one of:

* the logits, a (B, T, V) tensor;
* an object with a ``.logits`` attribute (a Hugging Face ``ModelOutput``);
* a tuple or list whose first item is the logits;
* a ``ChunkedHead``: the final hidden states and the output layer, for models that let the loss apply
  the output layer a chunk of tokens at a time (the built-in GPT with ``head_chunk_tokens``).

The trainer owns the loss (the ``loss`` group, ``ds_hydra.loss``): next-token cross-entropy in fp32
from a batch ``{"input_ids", "labels"}``, where ``labels[b, t]`` is the token that should follow
``input_ids[b, :t+1]`` and -100 marks a position that carries no loss; ``CausalLMLoss`` below is one
batch's mean of it, for code that scores a model outside the trainer. Packed rows (``data.pack=true``)
also pass ``position_ids=`` (restarting at 0 at each example), only to models that keep packed
examples apart (``ds_hydra.models.packing``). Nothing else is required;
what a model can tell about itself (its maximum positions, its vocabulary, its transformer shape) is
read by the small functions below, each with a fallback.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "ChunkedHead",
    "CausalLMLoss",
    "leading_tensor",
    "logits_of",
    "max_positions",
    "model_vocab_size",
    "model_config",
]


class ChunkedHead:
    """A model's output that defers the output layer to the loss.

    ``hidden`` (B, T, C) are the final hidden states and ``head`` maps (N, C) to (N, V_padded) logits.
    ``loss`` applies the head ``chunk_tokens`` tokens at a time and recomputes each chunk's logits in
    backward, so the (B, T, V) logits never exist at once: one chunk's are alive instead of all of
    them from forward to backward. It costs one more head forward (2 * C * V FLOPs per token).
    """

    def __init__(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab_size: int, chunk_tokens: int):
        self.hidden = hidden
        self.head = head
        self.vocab_size = vocab_size
        self.chunk_tokens = chunk_tokens

    @property
    def logits(self) -> torch.Tensor:
        """All the logits (B, T, V) at once, for callers that need them (generation without a cache)."""
        return self.head(self.hidden)[..., : self.vocab_size]

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions, as ``CausalLMLoss`` computes it."""
        from torch.utils.checkpoint import checkpoint

        x, labels = self.hidden.reshape(-1, self.hidden.size(-1)), labels.reshape(-1)  # (B * T, C), (B * T,)
        total = None
        for xs, ys in zip(x.split(self.chunk_tokens), labels.split(self.chunk_tokens)):
            part = checkpoint(self._loss_sum, xs, ys, use_reentrant=False)
            total = part if total is None else total + part
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def _loss_sum(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)[:, : self.vocab_size].float()  # (chunk, V)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def leading_tensor(output: Any) -> Optional[torch.Tensor]:
    """The tensor a module's output leads with: the output itself, or the first item of a tuple or list;
    None otherwise (how both models and their blocks may return extras beside the tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output (see the module docstring for the accepted forms)."""
    if isinstance(output, ChunkedHead):
        return output.logits
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    leading = leading_tensor(output)
    if leading is not None:
        return leading
    raise TypeError(
        f"the model returned {type(output).__name__}; a model must return its logits (a (batch, seq, vocab) tensor), "
        f"an object with .logits, or a tuple whose first item is the logits"
    )


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy in fp32: the mean over positions whose label is not -100.

    Parameter-free, so compiling it (the trainer does on CUDA) leaves every state dict alone; the
    compiled kernel reads low-precision logits in place and never stores an fp32 copy of them.
    A micro-batch without a single labelled position has loss 0 (and no gradient), not NaN.
    """

    def forward(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(output, ChunkedHead):
            return output.loss(labels)
        logits = logits_of(output)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"the model's logits have shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)}; "
                f"a causal LM returns (batch, seq, vocab) logits"
            )
        vocab = logits.size(-1)
        labels = labels.reshape(-1)
        losses = F.cross_entropy(logits.reshape(-1, vocab).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return losses / (labels != IGNORE_INDEX).sum().clamp(min=1)


def model_config(model: nn.Module) -> Any:
    """The model's Hugging Face style ``config`` object, or None."""
    return getattr(model, "config", None)


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model supports, when it says: ``block_size`` or ``max_seq_len`` (ours
    and many hand-written models), ``max_position_embeddings`` or ``n_positions`` (Hugging Face configs)."""
    for name in ("block_size", "max_seq_len"):
        value = getattr(model, name, None)
        if isinstance(value, int) and value > 0:
            return value
    config = model_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_vocab_size(model: nn.Module) -> Optional[int]:
    """The number of token ids the model can take, when it says (``vocab_size`` or ``config.vocab_size``)."""
    for owner in (model, model_config(model)):
        value = getattr(owner, "vocab_size", None)
        if isinstance(value, int) and value > 0:
            return value
    return None
