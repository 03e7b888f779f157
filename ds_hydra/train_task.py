"""``task=train`` and ``task=resume`` (and ``ds_hydra.train``): train, then run what the config asks for
after training on the final checkpoint (``lm_eval.after_training``: the harness's tasks). The loop is
``ds_hydra.training.trainer.train``; this layer sits above it and the harness, so neither imports the other."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional


def train(cfg, run_dir: Optional[Path] = None, plan=None) -> Dict[str, Any]:
    """Train from a composed config; returns the final metrics dict (with the after-training metrics).
    ``plan``: the start the CLI settled (``ds_hydra.training.resume.StartPlan``); None: train settles it."""
    from ds_hydra.training.trainer import train as train_loop

    after = []
    if cfg.get("lm_eval") is not None and cfg.lm_eval.after_training:
        from ds_hydra.harness.run import evaluate_after_training

        after.append(evaluate_after_training)
    return train_loop(cfg, run_dir, after_training=after, plan=plan)
