"""The sweep callback: one JSON record per job, one report per sweep, failures included.

Jobs may run in other processes (joblib, submitit), so each job writes its record next to its
outputs (``<job dir>/sweep_job.json``) at ``on_job_end``, and the report is built from the records
found under the sweep directory. Hydra 1.3's basic sweeper re-raises the first failed job's
exception once its batch is done and never calls ``on_multirun_end``; the CLI then calls
``finish_active_sweep`` itself, so the report is written either way and the process exits non-zero.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.experimental.callback import Callback

from ds_hydra.errors import UserError
from ds_hydra.sweeps.records import write_job_record

log = logging.getLogger(__name__)

# The full metrics of the job running in this process: the task may hand the sweeper a single
# number (``objective``), but the report wants every metric.
_job_metrics: Optional[Dict[str, Any]] = None


def note_job_metrics(metrics: Any) -> None:
    """Called by the task function with its complete metrics dict."""
    global _job_metrics
    _job_metrics = dict(metrics) if isinstance(metrics, dict) else None


def noted_job_metrics() -> Optional[Dict[str, Any]]:
    """The metrics the task noted last (a torchrun'd job's rank 0 hands them to its launcher)."""
    return _job_metrics


def select_objective(cfg, metrics: Any) -> Any:
    """The task's return value: the ``objective`` metric as a float when set, else all metrics."""
    name = cfg.get("objective", None) if hasattr(cfg, "get") else None
    if name is None or not isinstance(metrics, dict):
        return metrics
    if name not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise UserError(f"objective={name}: the task returned no such metric; available: {', '.join(numeric)}")
    return float(metrics[name])


@dataclass
class SweepOutcome:
    """What the finished sweep's report says; ``failed`` > 0 makes the CLI exit non-zero."""

    sweep_dir: Path
    jobs: int
    failed: int
    report: Optional[Path] = None
    first_error: Optional[str] = None
    wall_s: float = 0.0


@dataclass
class _ActiveSweep:
    sweep_dir: Path
    sweep_id: str
    started: float
    objective: Optional[str]
    maximize: bool
    plot: bool
    outcome: Optional[SweepOutcome] = None


_active: Optional[_ActiveSweep] = None


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary`` in conf/config.yaml; ``~hydra.callbacks.sweep_summary`` turns it off."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.sweep_id: Optional[str] = None  # set in the launching process, pickled to job processes
        self._job_started = 0.0

    # -- launching process ----------------------------------------------------------------------
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        global _active
        self.sweep_id = uuid.uuid4().hex
        sweeper = config.hydra.get("sweeper", {}) or {}
        _active = _ActiveSweep(
            sweep_dir=Path(config.hydra.sweep.dir),
            sweep_id=self.sweep_id,
            started=time.perf_counter(),
            objective=config.get("objective", None),
            maximize=str(sweeper.get("direction", "minimize")) == "maximize",
            plot=self.plot,
        )

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        finish_active_sweep()

    # -- job process ----------------------------------------------------------------------------
    def on_job_start(self, config, **kwargs: Any) -> None:
        note_job_metrics(None)
        self._job_started = time.perf_counter()

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if self.sweep_id is None:  # a single run: no sweep started in this process or its launcher
            return
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else config.hydra
        failed = job_return.status == JobStatus.FAILED
        value = job_return._return_value
        if failed:  # the sweeper re-raises only the first failure, and without its traceback
            trace = None if isinstance(value, UserError) else (type(value), value, value.__traceback__)
            log.error("job %s failed: %s", hydra_cfg.job.num, _one_line_error(value), exc_info=trace)
        metrics = _job_metrics if _job_metrics is not None else (value if isinstance(value, dict) else {})
        if not failed and not isinstance(value, dict) and value is not None and config.get("objective", None):
            metrics = {**metrics, config.objective: value}
        record = {
            "sweep_id": self.sweep_id,
            "num": int(hydra_cfg.job.num),
            "overrides": list(job_return.overrides or []),
            "status": "failed" if failed else "completed",
            "metrics": {k: _json_scalar(v) for k, v in (metrics or {}).items() if _is_scalar(v)},
            "error": _one_line_error(value) if failed else None,
            "dir": str(hydra_cfg.runtime.output_dir),
            "job_wall_s": time.perf_counter() - self._job_started if self._job_started else None,
        }
        write_job_record(Path(hydra_cfg.runtime.output_dir), record)
        note_job_metrics(None)


def finish_active_sweep() -> Optional[SweepOutcome]:
    """Write the report of the sweep this process launched (once); None when no sweep is active."""
    if _active is None:
        return None
    if _active.outcome is not None:
        return _active.outcome
    from ds_hydra.sweeps.report import write_sweep_report

    wall_s = time.perf_counter() - _active.started
    report = write_sweep_report(
        _active.sweep_dir,
        sweep_id=_active.sweep_id,
        objective=_active.objective,
        maximize=_active.maximize,
        wall_s=wall_s,
        plot=_active.plot,
    )
    failed = [r for r in report.records if r["status"] != "completed"]
    _active.outcome = SweepOutcome(
        sweep_dir=_active.sweep_dir,
        jobs=len(report.records),
        failed=len(failed),
        report=report.markdown if report.records else None,
        first_error=failed[0]["error"] if failed else None,
        wall_s=wall_s,
    )
    if report.records:
        log.info(
            "sweep summary: %d jobs, %d failed, %.1f s: %s", len(report.records), len(failed), wall_s, report.markdown
        )
    from ds_hydra.tracking.sweep import finish_sweep

    finish_sweep(_active.sweep_dir, failed=len(failed), files=[report.markdown, report.csv, report.png])  # MLflow's parent run
    return _active.outcome


def reset_active_sweep() -> None:
    """Forget the finished sweep (the CLI calls this once it has reported the outcome)."""
    global _active
    _active = None


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _json_scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _one_line_error(exc: Any) -> str:
    if not isinstance(exc, BaseException):
        return str(exc)
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
