"""Run metrics: ``metrics.jsonl`` (one JSON object a line, always), the loss-curve PNG, and the trackers
``logger`` chooses (CSV, TensorBoard, W&B, MLflow: ds_hydra.tracking) fed the same records."""
from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from ds_hydra.tracking.session import TrackedRun

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


class MetricsLogger:
    """The run's records: appended to ``metrics.jsonl``, kept for the loss curve, sent to the trackers.

    ``run`` (``ds_hydra.training.slices.tracked_run`` of the run's config) chooses the trackers and names
    the run; None: metrics.jsonl and the loss curve only. ``enabled=False`` (ranks other than 0) keeps the
    records in memory only. ``finish`` draws the loss curve and closes the trackers with the final
    metrics; ``close`` ends them after a failure.
    """

    def __init__(self, run_dir: Path, run: Optional["TrackedRun"] = None, enabled: bool = True,
                 earlier_records: Sequence[Dict[str, Any]] = (), start_step: int = 0):
        self.records: List[Dict[str, Any]] = list(earlier_records)  # the loss curve shows the whole run
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.title = run_title(run.name if run is not None else None, self.run_dir)
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        from ds_hydra.tracking.session import Trackers, open_trackers

        self.trackers = open_trackers(run, self.run_dir, start_step, self.records) if (enabled and run is not None) else Trackers([])

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        self.trackers.log(step, {k: v for k, v in record.items() if k != "step"})

    def finish(self, final: Dict[str, Any]) -> None:
        """The run is done: the loss-curve PNG, then the final metrics and files to every tracker."""
        try:
            if self.enabled and len(curve_steps(self.records)) >= 2:  # one step is no curve (and plotting costs ~0.5 s)
                plot_loss_curve(self.records, self.run_dir / LOSS_CURVE_FILE, title=self.title)
        finally:
            self.close(final=final)

    def close(self, error: Optional[BaseException] = None, final: Optional[Dict[str, Any]] = None) -> None:
        """Close metrics.jsonl and the trackers (after ``error``: the trackers mark the run failed or stopped)."""
        from ds_hydra.tracking.base import FAILED, FINISHED, STOPPED
        from ds_hydra.common.run_dir import RESOLVED_CONFIG_FILE
        from ds_hydra.common.signals import Stopped

        if self._file is not None:
            self._file.close()
            self._file = None
        status = FINISHED if error is None else (STOPPED if isinstance(error, Stopped) else FAILED)
        files = [self.run_dir / LOSS_CURVE_FILE, self.run_dir / RESOLVED_CONFIG_FILE] if error is None else []
        files = [f for f in files if f.is_file()]
        self.trackers.finish(final or {}, files=files, status=status)


def run_title(name: Optional[str], run_dir: Path) -> str:
    """The loss curve's title: what the run was (its ``name``, else its overrides) and where it is."""
    from ds_hydra.tracking.naming import describe_run, short_dir

    what = describe_run(name, run_dir)
    where = short_dir(run_dir)
    lines = textwrap.wrap(what, width=90, max_lines=3, placeholder=" ...") or [where]
    return "\n".join(lines if where in what else [*lines, where])


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def curve_steps(records: List[Dict[str, Any]]) -> List[int]:
    """The distinct steps that have a loss to plot."""
    return sorted({r["step"] for r in records if "loss" in r or "val_loss" in r})


def plot_loss_curve(records: List[Dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss per logged step, and train/val estimates at each evaluation."""
    from ds_hydra.plotting import new_figure, save_figure

    fig, ax = new_figure(7, 4)
    steps = [r["step"] for r in records if "loss" in r]
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train (batch)", alpha=0.5)
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (estimate)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (estimate)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
