"""``task=eval``: validation loss and perplexity of a trained run's checkpoint on the corpus it trained on.

Two numbers, both on the run's own validation split:

* ``val_loss``: every validation token once, in consecutive non-overlapping windows of
  ``block_size`` tokens (each token predicted from the tokens before it in its window), and
  ``val_perplexity = exp(val_loss)``;
* ``val_loss_estimate``: the trainer's estimate, the same ``trainer.eval_batches`` random batches it
  logged as ``val_loss`` in metrics.jsonl (same seed, same sampler), so the two can be compared.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ds_hydra.data.batches import RandomBlocks

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"


@torch.inference_mode()
def split_loss(model, tokens: torch.Tensor, device: torch.device, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over ``tokens`` in non-overlapping windows of ``block_size``."""
    T = model.block_size
    n_windows = (len(tokens) - 1) // T
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens: fewer than block_size + 1 = {T + 1}")
    inputs = tokens[: n_windows * T].view(n_windows, T)
    targets = tokens[1 : n_windows * T + 1].view(n_windows, T)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n_windows, batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        _, loss = model(x, y)  # mean over the batch's tokens
        total += loss.double() * y.numel()
    return (total / (n_windows * T)).item()


@torch.inference_mode()
def trainer_estimate(model, tokens: torch.Tensor, device: torch.device, batch_size: int, batches: int, seed: int) -> float:
    """The trainer's validation estimate: mean loss of ``batches`` seeded random batches."""
    from ds_hydra.training.trainer import VAL_STREAM

    sampler = RandomBlocks(tokens, model.block_size, batch_size, seed, stream=VAL_STREAM)
    losses = torch.zeros(batches)
    for i in range(batches):
        x, y = sampler.next_batch(device)
        _, loss = model(x, y)
        losses[i] = loss.item()
    return losses.mean().item()


def evaluate(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Load ``inference.checkpoint`` and report its validation loss and perplexity; returns metrics."""
    from ds_hydra.inference.generate import _output_dir
    from ds_hydra.inference.loading import load_run
    from ds_hydra.training.run_dir import resolve_run_dir

    icfg = cfg.inference
    run = load_run(icfg.checkpoint, icfg.device, icfg.dtype.value, list(cfg.get("allowed_targets") or []))
    out_dir = _output_dir(resolve_run_dir(run_dir), run.run_dir)
    saved = run.config.get("trainer") or {}
    val = run.corpus.val
    loss = split_loss(run.model, val, run.device)
    estimate = trainer_estimate(
        run.model, val, run.device,
        batch_size=int(saved.get("batch_size", 12)),
        batches=int(saved.get("eval_batches", 50)),
        seed=int(saved.get("seed", 1337)),
    )
    metrics = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "dtype": str(run.dtype).replace("torch.", ""),
        "val_tokens": len(val),
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_loss_estimate": estimate,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info(
        "%s (step %d): val loss %.4f, perplexity %.3f over %d tokens; trainer's estimate %.4f",
        run.checkpoint, run.step, loss, metrics["val_perplexity"], len(val), estimate,
    )
    return metrics
