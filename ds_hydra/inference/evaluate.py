"""``task=eval``: validation loss and perplexity of a trained run's checkpoint on the data it trained on.

Two numbers, both on the run's own validation split and both token-weighted (the mean over every label
token evaluated, not a mean of batch means), with the run's own ``loss``:

* ``val_loss``: the whole validation split once (``data.whole_split``): for token streams every token in
  consecutive non-overlapping windows of the run's sequence length (each predicted from the tokens
  before it in its window); for SFT data every validation example (packed or padded rows give the
  same number: packed examples are kept apart). ``val_perplexity = exp(val_loss)``;
* ``val_loss_estimate``: the trainer's estimate, as it logged ``val_loss`` in metrics.jsonl (the same
  ``trainer.eval_batches`` random batches, same seed and sampler; SFT data: the whole split again).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ds_hydra.data.base import VAL_STREAM
from ds_hydra.loss.step import build_loss, token_mean_loss

log = logging.getLogger(__name__)

REPORT_FILE = "eval.json"


@torch.inference_mode()
def whole_split_loss(model, loss_fn, data, device: torch.device, seq_len: int, batch_size: int = 64) -> float:
    """Token-weighted mean loss over the whole validation split (``data.whole_split``)."""
    return token_mean_loss(model, loss_fn, data.whole_split("val", seq_len, batch_size).batches(device), device)


@torch.inference_mode()
def trainer_estimate(model, loss_fn, data, device: torch.device, seq_len: int, batch_size: int, batches: int, seed: int) -> float:
    """The trainer's validation estimate: ``batches`` seeded random batches (SFT data: the whole split)."""
    if data.eval_whole_split:
        return whole_split_loss(model, loss_fn, data, device, seq_len, batch_size)
    sampler = data.sampler("val", seq_len, batch_size, seed, stream=VAL_STREAM)
    return token_mean_loss(model, loss_fn, (sampler.next_batch(device) for _ in range(batches)), device)


def evaluate(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Load ``inference.checkpoint`` and report its validation loss and perplexity; returns metrics."""
    from ds_hydra.inference.loading import load_run, output_dir

    icfg = cfg.inference
    run = load_run(icfg.checkpoint, icfg.device, icfg.dtype.value, list(cfg.get("allowed_targets") or []))
    out_dir = output_dir(run_dir, run.run_dir)
    saved = run.config.get("trainer") or {}
    loss_fn = build_loss(run.config.get("loss"))
    val_tokens = run.data.num_tokens("val")
    loss = whole_split_loss(run.model, loss_fn, run.data, run.device, run.seq_len)
    estimate = trainer_estimate(
        run.model, loss_fn, run.data, run.device, run.seq_len,
        batch_size=int(saved.get("batch_size", 12)),
        batches=int(saved.get("eval_batches", 50)),
        seed=int(saved.get("seed", 1337)),
    )
    metrics = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "dtype": str(run.dtype).replace("torch.", ""),
        "val_tokens": val_tokens,
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_loss_estimate": estimate,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info(
        "%s (step %d): val loss %.4f, perplexity %.3f over %d tokens; trainer's estimate %.4f",
        run.checkpoint, run.step, loss, metrics["val_perplexity"], val_tokens, estimate,
    )
    return metrics
