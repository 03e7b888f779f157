"""The sweep callback: one JSON record per job, one report per sweep, failures included.

Jobs may run in other processes (joblib, submitit), so each job writes its record next to its
outputs (``<job dir>/sweep_job.json``) at ``on_job_end``, and the report is built from the records
found under the sweep directory. Hydra 1.3's basic sweeper re-raises the first failed job's
exception once its batch is done and never calls ``on_multirun_end``; the CLI then finishes the sweep
the callback handed to its ``StartUp`` itself, so the report is written either way and the process
exits non-zero.
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

class Objective(float):
    """A job's ``objective`` metric, the one number a sweeper compares, carrying all the job's metrics
    (``metrics``) to the sweep callback's ``on_job_end``, which runs wherever the job ran (joblib and
    submitit workers included) and gets the task's return value from Hydra."""

    metrics: Dict[str, Any]

    def __new__(cls, value: float, metrics: Dict[str, Any]) -> "Objective":
        objective = super().__new__(cls, value)
        objective.metrics = dict(metrics)
        return objective

    def __reduce__(self):  # pickled back from a launcher's worker process with its metrics
        return (Objective, (float(self), self.metrics))


def select_objective(cfg, metrics: Any) -> Any:
    """The task's return value: the ``objective`` metric (an ``Objective``, a float that keeps the other
    metrics for the sweep report) when set, else all metrics."""
    name = cfg.get("objective", None) if hasattr(cfg, "get") else None
    if name is None or not isinstance(metrics, dict):
        return metrics
    if name not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise UserError(f"objective={name}: the task returned no such metric; available: {', '.join(numeric)}")
    return Objective(float(metrics[name]), metrics)


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
class ActiveSweep:
    """The sweep a ``SweepSummary`` started in the launching process, until its report is written (once)."""

    sweep_dir: Path
    sweep_id: str
    started: float
    objective: Optional[str]
    maximize: bool
    plot: bool
    outcome: Optional[SweepOutcome] = None

    def finish(self) -> SweepOutcome:
        """Write the sweep's report (once; later calls return the same outcome)."""
        if self.outcome is not None:
            return self.outcome
        from ds_hydra.sweeps.report import write_sweep_report

        wall_s = time.perf_counter() - self.started
        report = write_sweep_report(
            self.sweep_dir, sweep_id=self.sweep_id, objective=self.objective, maximize=self.maximize, wall_s=wall_s, plot=self.plot,
        )
        failed = [r for r in report.records if r["status"] != "completed"]
        self.outcome = SweepOutcome(
            sweep_dir=self.sweep_dir,
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

        finish_sweep(self.sweep_dir, failed=len(failed), files=[report.markdown, report.csv, report.png])  # MLflow's parent run
        return self.outcome


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary`` in conf/config.yaml; ``~hydra.callbacks.sweep_summary`` turns it off.

    Hydra builds one per command: it keeps the sweep it started (``active``), and hands it to the
    command's ``StartUp`` too, since Hydra's basic sweeper raises a failed job's error past
    ``on_multirun_end`` and ``cli_main`` then writes the report itself."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.sweep_id: Optional[str] = None  # set in the launching process, pickled to job processes
        self.active: Optional[ActiveSweep] = None  # the launching process's sweep
        self._job_started = 0.0

    # -- launching process ----------------------------------------------------------------------
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        from ds_hydra.common.startup import StartUp

        self.sweep_id = uuid.uuid4().hex
        sweeper = config.hydra.get("sweeper", {}) or {}
        self.active = ActiveSweep(
            sweep_dir=Path(config.hydra.sweep.dir),
            sweep_id=self.sweep_id,
            started=time.perf_counter(),
            objective=config.get("objective", None),
            maximize=str(sweeper.get("direction", "minimize")) == "maximize",
            plot=self.plot,
        )
        startup = StartUp.current()
        if startup is not None:
            startup.sweep = self.active

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.active is not None:
            self.active.finish()

    # -- job process ----------------------------------------------------------------------------
    def on_job_start(self, config, **kwargs: Any) -> None:
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
        # every metric of the job: the objective carries them; without one the task returned them all
        metrics = value.metrics if isinstance(value, Objective) else (value if isinstance(value, dict) else {})
        if not failed and not isinstance(value, dict) and value is not None and config.get("objective", None):
            metrics = {**metrics, config.objective: float(value)}
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
