"""The one loss function of a batch, and the normalisation of a step's loss.

``loss_sum(model, loss_fn, batch)`` is the only place where a model and the ``loss`` component meet:
the trainer's micro-batches, evaluation, the memory preflight's example step and the throughput
probe all call it. It returns the sum of the per-token losses over the batch's label tokens (labels
not -100); ``label_tokens`` counts those.

The trainer's step loss is ``sum over its micro-batches and ranks of loss_sum / the step's label
tokens`` (the count is known before any backward: the step's micro-batches are drawn first and
their labels counted, then one integer is all-reduced across ranks). Its gradient is therefore the
gradient of the mean over every label token of the step, whatever ``batch_size x grad_accum_steps
x ranks`` divides it (transformers' ``num_items_in_batch``, torchtune's and torchtitan's global
token scaling).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn

from ds_hydra.models.contract import IGNORE_INDEX

__all__ = ["build_loss", "loss_sum", "label_tokens", "mean_loss", "token_mean_loss"]


def build_loss(loss_cfg: Optional[Any]) -> nn.Module:
    """The ``loss`` group's component (through the ``_target_`` allowlist); the plain cross-entropy when
    the config has no ``loss`` node (a run saved before the group existed)."""
    from ds_hydra.loss.cross_entropy import CrossEntropyLoss

    if loss_cfg is None:
        return CrossEntropyLoss()
    from ds_hydra.instantiate import instantiate

    return instantiate(loss_cfg)


def loss_sum(model: nn.Module, loss_fn: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the per-token losses of ``batch``'s label tokens, the model run on its inputs; the
    logits are gone when this returns (they would otherwise live through backward)."""
    return loss_fn(model, batch)


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of ``labels`` carry a loss (int64, on the labels' device)."""
    return (labels != IGNORE_INDEX).sum()


def mean_loss(model: nn.Module, loss_fn: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss_sum`` over the batch's own label tokens (0, not NaN, for a batch without any): the loss of
    one batch on its own (the preflight's and the probes' step)."""
    return loss_sum(model, loss_fn, batch) / label_tokens(batch["labels"]).clamp(min=1)


@torch.no_grad()
def token_mean_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> float:
    """The mean loss over every label token of ``batches`` (not a mean of batch means: a batch weighs as
    many tokens as it labels), summed over ranks by ``all_reduce`` (sum, in place) when given; one
    host sync at the end. How the in-run validation and ``task=eval`` evaluate."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, label tokens)
    for batch in batches:
        with autocast():
            total[0] += loss_sum(model, loss_fn, batch).double()
        total[1] += label_tokens(batch["labels"])
    if all_reduce is not None:
        all_reduce(total)
    summed, tokens = total.tolist()
    if not tokens:
        raise ValueError("no label token to evaluate")
    return summed / tokens
