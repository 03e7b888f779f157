"""Next-token cross-entropy in fp32, summed over the labelled positions: plain, and chunked over tokens.

A loss is called as ``loss(model, batch)``: it runs the model on the batch's inputs
(``ds_hydra.loss.inputs.run_model``) and returns the **sum** of the per-token losses over the
positions whose label is not -100 (``IGNORE_INDEX``). Dividing by the right number of tokens (the
optimizer step's, across micro-batches and ranks) is the trainer's job (``ds_hydra.loss.step``).
Both losses are parameter-free: compiling them leaves every state dict alone.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_hydra.errors import UserError
from ds_hydra.loss.inputs import run_model
from ds_hydra.models.contract import IGNORE_INDEX, ChunkedHead, logits_of, model_vocab_size

__all__ = ["CrossEntropyLoss", "ChunkedCrossEntropyLoss", "token_loss_sum"]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, V) logits (upcast to fp32) against (N,) labels, summed over labels != -100."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class CrossEntropyLoss(nn.Module):
    """The model's logits, then fp32 cross-entropy summed over the labelled positions.

    A model that returns a ``ChunkedHead`` (the built-in GPT with ``model.head_chunk_tokens``) has its
    output layer applied a chunk at a time here too. ``compile()`` compiles the cross-entropy kernel
    only (the model is compiled per block by the trainer): it reads low-precision logits in place and
    never stores an fp32 copy of them.
    """

    def __init__(self):
        super().__init__()
        self.kernel = token_loss_sum

    def compile(self, *args, **kwargs) -> None:  # noqa: D102  (nn.Module.compile would trace the model call too)
        self.kernel = torch.compile(token_loss_sum, *args, **kwargs)

    def forward(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.from_output(run_model(model, batch), batch["labels"])

    def from_output(self, output: Any, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss of a model's output (any form of the model contract) against ``labels`` (B, T)."""
        if isinstance(output, ChunkedHead):
            return chunked_sum(output.hidden, output.head, output.vocab_size, labels, output.chunk_tokens, self.kernel)
        logits = logits_of(output)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"the model's logits have shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)}; "
                f"a causal LM returns (batch, seq, vocab) logits"
            )
        return self.kernel(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


class ChunkedCrossEntropyLoss(CrossEntropyLoss):
    """The plain loss's numbers without the (B, T, V) logits: the model runs with its output layer passed
    through (it returns the final hidden states), then the output layer and the cross-entropy run
    ``chunk_tokens`` tokens at a time, each chunk recomputed in backward.

    Works for any model whose output layer is ``get_output_embeddings()`` (Hugging Face) or ``lm_head``
    and whose logits are that layer's output as it is; a model that rescales or caps its logits after
    the layer (Gemma 2's soft-capping, Cohere's logit scale, Granite's scaling) is refused in one line.
    """

    def __init__(self, chunk_tokens: int = 1024):
        super().__init__()
        if chunk_tokens < 1:
            raise UserError(f"loss.chunk_tokens={chunk_tokens}: must be >= 1")
        self.chunk_tokens = chunk_tokens

    def forward(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrapped(model)
        head = output_layer(inner)
        with passed_through(head):
            output = run_model(model, batch)
        labels = batch["labels"]
        if isinstance(output, ChunkedHead):
            hidden, vocab = output.hidden, output.vocab_size
        else:
            hidden, vocab = logits_of(output), model_vocab_size(inner)
            width = head.weight.size(1) if isinstance(getattr(head, "weight", None), torch.Tensor) else hidden.size(-1)
            if hidden.size(-1) != width or vocab is None:
                raise UserError(
                    f"loss=chunked_cross_entropy: {type(inner).__name__} changes its output layer's input or output on the "
                    f"way out (hidden {tuple(hidden.shape)}); use loss=cross_entropy"
                )
        return chunked_sum(hidden, head, vocab, labels, self.chunk_tokens, self.kernel)


def chunked_sum(hidden: torch.Tensor, head, vocab: int, labels: torch.Tensor, chunk_tokens: int, kernel=token_loss_sum) -> torch.Tensor:
    """Sum of the cross-entropy of ``head(hidden)[..., :vocab]`` against ``labels``, ``chunk_tokens`` tokens
    at a time; each chunk's logits are recomputed in backward (only one chunk's exist at a time)."""
    from torch.utils.checkpoint import checkpoint

    x, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)  # (B * T, C), (B * T,)
    total: Optional[torch.Tensor] = None
    part_of = functools.partial(_chunk_sum, head, vocab, kernel)
    for xs, ys in zip(x.split(chunk_tokens), y.split(chunk_tokens)):
        part = checkpoint(part_of, xs, ys, use_reentrant=False)
        total = part if total is None else total + part
    return total


def _chunk_sum(head, vocab: int, kernel, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return kernel(head(x)[:, :vocab], labels)  # (chunk, V) logits, alive only inside this chunk


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP's or DeepSpeed's wrapper (``.module``); FSDP2 and compile leave it as it is."""
    while isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


# Config fields of models whose logits are not their output layer's output as it is.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_layer(model: nn.Module) -> nn.Module:
    """The model's output layer (hidden -> logits), or one line saying why chunking cannot find it."""
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise UserError(
                f"loss=chunked_cross_entropy: {type(model).__name__} transforms its logits after the output layer "
                f"(config.{name}={getattr(config, name)}), which chunking would skip; use loss=cross_entropy"
            )
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        raise UserError(
            f"loss=chunked_cross_entropy: {type(model).__name__} has no output layer to chunk (neither "
            f"get_output_embeddings() nor .lm_head); use loss=cross_entropy"
        )
    return head


@contextlib.contextmanager
def passed_through(head: nn.Module) -> Iterator[None]:
    """``head`` returns its input unchanged while inside: the model hands its final hidden states out
    where its logits would be. The head's hooks still run (a sharding engine gathers its weight)."""
    own = head.__dict__.get("forward")  # an instance-level forward someone set (kept and put back)
    head.forward = _identity
    try:
        yield
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x
