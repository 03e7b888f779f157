"""Checks that run before Hydra writes anything into the run directory.

Hydra creates the run directory and writes ``.hydra/`` into it before it calls the task function,
so a problem found only there would already have touched the directory, and when that directory is
an earlier run (``resume=<run>``, or ``hydra.run.dir=<run>``) it would overwrite the run's record.
``Preflight`` is a Hydra callback (``hydra.callbacks.preflight`` in conf/config.yaml) whose
``on_run_start`` fires after composition and before any file is written. It checks, in order:

1. the config (``ds_hydra.validation``): every range and cross-field problem;
2. a CUDA device is there when ``trainer.device`` asks for one;
3. the run directory can be created and written (``hydra.run.dir``);
4. the directory does not already hold a run, unless ``resume=`` continues it;
5. when resuming, the checkpoint loads safely and was saved by the same model.

Sweep jobs (``-m``) are checked by the task itself, each in its own fresh job directory.

Hydra turns an ``Exception`` raised in a callback into a warning and carries on, so a refusal leaves
the callback as ``RunRefused`` (a ``BaseException``); ``cli_main`` unwraps it into its one line.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from ds_hydra.errors import UserError


class RunRefused(BaseException):
    """A ``UserError`` found before the run started, carried past Hydra's callback error handling."""

    def __init__(self, error: Exception):
        self.error = error
        super().__init__(str(error))


class Preflight(Callback):
    """``on_run_start``: refuse a bad run before its directory is touched."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        from omegaconf.errors import OmegaConfBaseException

        try:
            check_before_run(config)
        except (UserError, OmegaConfBaseException) as exc:
            raise RunRefused(exc) from exc


def check_before_run(config) -> None:
    """Raise ``UserError`` for a run that would fail, before anything is written."""
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.training.resume import check_compatible, plan_start
    from ds_hydra.validation import validate_config

    HydraConfig.instance().set_config(config)  # lets ${hydra:...} resolve while validating
    task = getattr(config.task, "value", config.task)
    if task != "validate":  # task=validate reports these problems itself, with its own
        validate_config(config)
    if task not in ("train", "resume"):
        return
    check_device(config)
    run_dir = Path(str(config.hydra.run.dir))
    ensure_writable(run_dir, key="hydra.run.dir")
    plan = plan_start(config, run_dir)
    if plan.checkpoint is not None:
        from ds_hydra.training.state import load_train_state

        saved = load_train_state(plan.checkpoint, mmap=True)  # maps the tensors; reads only the index
        check_compatible(saved["config"], config, plan.checkpoint, strict=False)


def check_device(config) -> None:
    """A CUDA device this machine does not have (imports torch only when one is asked for)."""
    device = str(config.trainer.device)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"trainer.device={device}: CUDA is not available on this machine (use auto or cpu)")


def ensure_writable(folder: Path, key: str) -> None:
    """``folder`` (or, if it does not exist yet, its nearest existing parent) takes a temp file.

    Nothing is created: a timestamped run dir resolved here may differ by a second from the one
    Hydra resolves next, and an empty folder would be left behind.
    """
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={folder}: cannot write there: {existing} is a file, not a directory; choose a writable directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{key}={folder}: cannot write there: {reason} (writing into {existing}); choose a writable directory") from None
