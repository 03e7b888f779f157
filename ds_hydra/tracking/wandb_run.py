"""``logger=[jsonl,wandb]``: a Weights & Biases run, offline by default, its files under ``<run dir>/wandb``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ds_hydra.tracking.base import FAILED, FINISHED, RunInfo, Tracker, numeric

log = logging.getLogger(__name__)

# W&B's own console output and crash reports (Sentry, over the network) stay off; the user's
# environment wins where it sets them.
QUIET_ENV = {"WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_CODE": "true"}
_NAME_LIMIT = 128  # W&B's limit on run names and groups
_EXIT_CODES = {FINISHED: 0, FAILED: 1}  # stopped runs exit 75 (requeue), as the CLI does


class WandbTracker(Tracker):
    """The config as the run's config, every metric at its step, the final metrics in the summary and
    the loss curve as an image; a continued run (same ``<run dir>``) resumes the same W&B run id."""

    key = "wandb"
    append_only = True

    def __init__(self, cfg) -> None:
        self.cfg = cfg.wandb
        self.run = None
        self.step = 0

    def start(self, run: RunInfo) -> Dict[str, Any]:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
        import wandb

        mode = self.cfg.mode.value if hasattr(self.cfg.mode, "value") else str(self.cfg.mode)
        previous = run.previous if run.previous.get("project") == self.cfg.project else {}
        group = self.cfg.group or (run.sweep.label[-_NAME_LIMIT:] if run.sweep is not None else None)
        self.run = wandb.init(
            mode=mode,
            dir=str(run.run_dir),
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=(self.cfg.name or run.name)[:_NAME_LIMIT],
            group=group,
            tags=list(self.cfg.tags),
            config=run.config,
            id=previous.get("id"),
            resume="allow" if previous.get("id") else None,
            settings=wandb.Settings(console="off"),  # the run dir keeps the logs
        )
        if previous.get("id"):
            self.run.config.update(run.config, allow_val_change=True)  # a resume may change settings
        log.info("W&B %s run %s in %s%s", mode, self.run.id, self.run.dir, _sync_hint(mode, self.run.dir))
        return {"id": self.run.id, "project": self.cfg.project, "entity": self.cfg.entity, "mode": mode}

    def log(self, step: int, record: Dict[str, Any]) -> None:
        values = numeric(record)
        if values:
            self.run.log(values, step=step)
            self.step = max(self.step, step)

    def finish(self, final: Dict[str, Any], files: Sequence[Path], status: str) -> None:
        import wandb

        try:
            self.run.summary.update({f"final/{k}": v for k, v in numeric(final).items()})
            images = {Path(f).stem: wandb.Image(str(f)) for f in files if Path(f).suffix == ".png" and Path(f).is_file()}
            if images:
                self.run.log(images, step=self.step)
        finally:
            self.run.finish(exit_code=_EXIT_CODES.get(status, 75))


def _sync_hint(mode: str, run_files: Optional[str]) -> str:
    if mode != "offline" or not run_files:
        return ""
    return f"; upload it with: wandb sync {Path(run_files).parent}"
