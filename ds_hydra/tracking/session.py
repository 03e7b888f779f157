"""The trackers of one run, side by side: opened from the ``logger`` config, fed every metrics record,
finished with the final metrics; a tracker that fails costs a warning, never the run.

Each tracker's run id is kept in ``<run dir>/trackers.json``, so that a continued run
(``resume=<run>``, a re-run sweep, a torchrun restart) continues the same tracker run instead of
starting a new one. The file also keeps the last step the trackers were sent: the records a
continued run recomputes between its checkpoint and that step are not sent again to the trackers
that only append (W&B, MLflow); the CSV file and TensorBoard drop their later records and take them anew.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ds_hydra.tracking.base import FINISHED, RunInfo, Tracker
from ds_hydra.tracking.config import chosen_trackers
from ds_hydra.tracking.naming import current_sweep, describe_run

log = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"
LAST_STEP_KEY = "last_logged_step"


@dataclass(frozen=True)
class TrackedRun:
    """What the trackers of a run are given, cut from the run's config (``ds_hydra.training.slices.tracked_run``)."""

    logger: Any = None
    """The ``logger`` config: which trackers, and their settings (None: metrics.jsonl alone)."""
    name: Optional[str] = None
    """The run's ``name`` (None: the run is described by its overrides)."""
    config: Dict[str, Any] = field(default_factory=dict)
    """The run's resolved config as plain data (Hydra's own section left out): the hyperparameters that
    trackers record beside the metrics."""


def _tracker_classes() -> Dict[str, Callable[[Any], Tracker]]:
    """logger option -> tracker class; each module imports its package only when its tracker starts."""
    from ds_hydra.tracking.csv_file import CsvTracker
    from ds_hydra.tracking.mlflow_run import MlflowTracker
    from ds_hydra.tracking.tensorboard import TensorBoardTracker
    from ds_hydra.tracking.wandb_run import WandbTracker

    return {"csv": CsvTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of a run; each call goes to every tracker still working."""

    def __init__(self, trackers: Sequence[Tracker], run_dir: Optional[Path] = None, ids: Optional[Dict[str, Any]] = None):
        self.active: List[Tracker] = list(trackers)
        self.run_dir = run_dir
        self.ids: Dict[str, Any] = dict(ids or {})
        self.last_step: Optional[int] = None
        self.skip_through: Optional[int] = None  # steps already sent before an interruption

    def start(self, run: RunInfo) -> None:
        self.skip_through = run.last_logged_step
        for tracker in list(self.active):
            run.previous = self.ids.get(tracker.key) or {}
            started = self._guarded(tracker, "start", lambda t=tracker: t.start(run))
            if started:
                self.ids[tracker.key] = started
        self._save_ids()

    def log(self, step: int, record: Dict[str, Any]) -> None:
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        sent_before = self.skip_through is not None and step <= self.skip_through
        for tracker in list(self.active):
            if sent_before and tracker.append_only:
                continue  # recomputed after a resume: this tracker's run has the record already
            self._guarded(tracker, "log", lambda t=tracker: t.log(step, record))

    def finish(self, final: Dict[str, Any], files: Sequence[Path] = (), status: str = FINISHED) -> None:
        for tracker in list(self.active):
            self._guarded(tracker, "finish", lambda t=tracker: t.finish(final, files, status))
        self.active = []
        self._save_ids()

    def _guarded(self, tracker: Tracker, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # any tracker failure: a full disk, a server that went away, a bug in a package
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning(
                "logger=%s: %s failed (%s: %s); the run goes on without it (metrics.jsonl has every record)",
                tracker.key, what, type(exc).__name__, detail,
            )
            if tracker in self.active:
                self.active.remove(tracker)
            return None

    def _save_ids(self) -> None:
        if self.run_dir is None or not self.ids:
            return
        from ds_hydra.common.files import atomic_write_text

        steps = [s for s in (self.last_step, self.skip_through) if s is not None]
        state = {**self.ids, LAST_STEP_KEY: max(steps) if steps else None}
        try:
            atomic_write_text(self.run_dir / TRACKERS_FILE, json.dumps(state, indent=1) + "\n")
        except OSError as exc:
            log.warning("%s: cannot write the tracker run ids (%s); a resumed run will start new tracker runs", self.run_dir / TRACKERS_FILE, exc)


def open_trackers(run: TrackedRun, run_dir: Path, start_step: int = 0, records: Sequence[Dict[str, Any]] = ()) -> Trackers:
    """Start the trackers ``run.logger`` chooses for the run in ``run_dir`` (none: an empty fan-out)."""
    names = chosen_trackers(run.logger) if run.logger is not None else []
    if not names:
        return Trackers([])
    classes = _tracker_classes()
    saved = read_tracker_ids(run_dir)
    last_logged_step = saved.pop(LAST_STEP_KEY, None)
    trackers = Trackers([classes[name](run.logger) for name in names], run_dir=Path(run_dir), ids=saved)
    trackers.start(run_info(run, run_dir, start_step, records, last_logged_step))
    return trackers


def run_info(run: TrackedRun, run_dir: Path, start_step: int, records: Sequence[Dict[str, Any]],
             last_logged_step: Optional[int]) -> RunInfo:
    config = run.config
    sweep = current_sweep()
    name = describe_run(run.name, run_dir)
    if sweep is not None and not run.name:
        name = f"job {sweep.job_num}: {name}"
    return RunInfo(
        run_dir=Path(run_dir), name=name, config=config, params=flatten(config), sweep=sweep,
        start_step=start_step, records=list(records), last_logged_step=last_logged_step,
    )


def read_tracker_ids(run_dir: Path) -> Dict[str, Any]:
    """``trackers.json`` of ``run_dir`` ({} when there is none, or it is unreadable: new tracker runs)."""
    path = Path(run_dir) / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting new tracker runs", path, exc)
        return {}
    return saved if isinstance(saved, dict) else {}


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"optimizer": {"lr": 1e-3}}`` -> ``{"optimizer.lr": 1e-3}`` (lists stay values)."""
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix: node}
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
