"""``logger=tensorboard``: TensorBoard event files in ``<run dir>/tensorboard``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

from ds_hydra.tracking.base import RunInfo, Tracker, numeric

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    """A scalar per numeric metric; a continued run purges the events after its checkpoint's step."""

    key = "tensorboard"

    def __init__(self, cfg=None) -> None:
        self.writer = None

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the interrupted run's events from this step on (recomputed now)
        purge = run.start_step + 1 if run.start_step else None
        self.writer = SummaryWriter(log_dir=str(Path(run.run_dir) / TENSORBOARD_DIR), purge_step=purge)
        return None

    def log(self, step: int, record: Dict[str, Any]) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, final: Dict[str, Any], files: Sequence[Path], status: str) -> None:
        self.writer.close()
