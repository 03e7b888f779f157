"""``trainer.init_from=<run dir | checkpoint>``: start a run from another run's weights (fine-tuning).

Only the model's weights are taken: the optimizer, the schedule, the data position and the step start
afresh. The weights are read with ``torch.load(weights_only=True)``; names and shapes must match the
model being trained, and every mismatch is listed in one error.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from ds_hydra.errors import UserError
from ds_hydra.training import state as state_io

log = logging.getLogger(__name__)

KEY = "trainer.init_from"


def initial_weights_file(value: str) -> Path:
    """The checkpoint ``value`` names: a run dir's newest ``checkpoints/step_*.pt``, or that file itself."""
    path = Path(value).expanduser()
    if path.is_dir() and not state_io.is_sharded_checkpoint(path):
        latest = state_io.latest_checkpoint(path)
        if latest is None:
            raise UserError(f"{KEY}={value}: no {state_io.CHECKPOINT_DIR}/step_*.pt in that directory; give a trained run's directory or one of its checkpoints")
        return latest
    if not (path.is_file() or state_io.is_sharded_checkpoint(path)):
        raise UserError(f"{KEY}={value}: no such run directory or checkpoint file")
    return path


def load_initial_weights(model: nn.Module, value: str) -> Path:
    """Load the weights of ``value`` into ``model`` (before any training transform); returns the file."""
    path = initial_weights_file(value)
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state

    state = load_checkpoint_state(path, with_optimizer=False)
    weights = state.get("model") if isinstance(state, dict) else None
    state_io.load_checked_weights(model, weights, f"{KEY}={value}: {path}", "training checkpoint")
    log.info("initial weights from %s (step %s); optimizer, schedule and data start afresh", path, state.get("step", "?"))
    return path
