"""``task=eval``: validation loss and perplexity of a trained run's checkpoint on the data it trained on.

Two numbers, both on the run's own validation split:

* ``val_loss``: every validation token once, in consecutive non-overlapping windows of the run's
  sequence length (each token predicted from the tokens before it in its window), and
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

from ds_hydra.data.base import VAL_STREAM
from ds_hydra.models.contract import CausalLMLoss

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"


@torch.inference_mode()
def split_loss(model, tokens, device: torch.device, seq_len: int, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over ``tokens`` in non-overlapping windows of ``seq_len``."""
    T = seq_len
    n_windows = (len(tokens) - 1) // T
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens: fewer than seq_len + 1 = {T + 1}")
    tokens = torch.as_tensor(tokens[: n_windows * T + 1]).long()
    inputs = tokens[: n_windows * T].view(n_windows, T)
    labels = tokens[1 : n_windows * T + 1].view(n_windows, T)
    loss_fn = CausalLMLoss()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n_windows, batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        total += loss_fn(model(x), y).double() * y.numel()  # the batch's mean, weighted by its tokens
    return (total / (n_windows * T)).item()


@torch.inference_mode()
def trainer_estimate(model, data, device: torch.device, seq_len: int, batch_size: int, batches: int, seed: int) -> float:
    """The trainer's validation estimate: mean loss of ``batches`` seeded random batches."""
    sampler = data.sampler("val", seq_len, batch_size, seed, stream=VAL_STREAM)
    loss_fn = CausalLMLoss()
    losses = torch.zeros(batches)
    for i in range(batches):
        batch = sampler.next_batch(device)
        losses[i] = loss_fn(model(batch["input_ids"]), batch["labels"]).item()
    return losses.mean().item()


def evaluate(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Load ``inference.checkpoint`` and report its validation loss and perplexity; returns metrics."""
    from ds_hydra.inference.loading import load_run, output_dir

    icfg = cfg.inference
    run = load_run(icfg.checkpoint, icfg.device, icfg.dtype.value, list(cfg.get("allowed_targets") or []))
    out_dir = output_dir(run_dir, run.run_dir)
    saved = run.config.get("trainer") or {}
    val = run.data.tokens("val")
    loss = split_loss(run.model, val, run.device, run.seq_len)
    estimate = trainer_estimate(
        run.model, run.data, run.device, run.seq_len,
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
