"""One job of a run or a sweep under torchrun (``hydra/launcher=torchrun``), torch-free.

The launching process starts ``python -m torch.distributed.run <settings> -m ds_hydra <the job's
overrides> hydra.run.dir=<job dir>``: the job's ranks then run as any torchrun'd ds_hydra run does
(rank 0 makes the run dir, every rank logs to ``rank{N}.log`` in it; ``ds_hydra.cli.launch``).
Each rank leaves its outcome in ``<job dir>/.ranks/rank{N}.json`` (``reporting_to_launcher``, around
``cli_main``): completed with rank 0's metrics, or failed with its one-line error, exit code and
time. The launcher reads them back: a failed job is reported with the error of the rank that failed
first (the others usually fail because it did), and its traceback is in that rank's log.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ds_hydra.common import launch_env
from ds_hydra.common.overrides import CONFIG_OPTIONS, option_args
from ds_hydra.common.signals import EXIT_INTERRUPTED, EXIT_REQUEUE, Stopped, signal_name
from ds_hydra.common.startup import StartUp
from ds_hydra.cli.torchrun_config import TorchrunSettings
from ds_hydra.errors import ConfigError, UserError

log = logging.getLogger(__name__)

RANK_REPORTS_ENV = "DS_HYDRA_RANK_REPORTS"  # the folder where the ranks of a launched job leave their outcome
RANK_REPORTS_DIR = ".ranks"
LAUNCHER_TARGET = "hydra_plugins.ds_hydra_torchrun_launcher.torchrun_launcher.TorchrunLauncher"

# Hydra overrides of the launching command that the job's own command must not repeat: where the job
# runs is set here, and the job itself is a plain run (no launcher, no sweeper of its own).
_NOT_FORWARDED = ("hydra.run.", "hydra.sweep.", "hydra.output_subdir", "hydra.mode", "hydra/launcher", "hydra.launcher.",
                  "hydra/sweeper", "hydra.sweeper.", "hydra.job.name", "hydra.job.num", "hydra.job.id")


class JobFailed(UserError):
    """A torchrun'd job failed; ``exit_code`` is its first failing rank's (1 for a crash)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class SweepStopped(Stopped):
    """A stop signal reached the launching process: the running job stopped too; no further job starts."""

    def __init__(self, signum: int, done: int, total: int, sweep_dir: Path):
        Exception.__init__(
            self, f"stopped by {signal_name(signum)} after {done} of {total} jobs; continue with the same command "
            f"and hydra.sweep.dir={sweep_dir} (finished jobs are skipped)"
        )
        self.signum, self.step, self.checkpoint, self.run_dir = signum, 0, None, Path(sweep_dir)
        self.exit_code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE


@dataclass
class JobOutcome:
    """What a torchrun'd job left: ``metrics`` (rank 0's) when it completed, else the first failure."""

    completed: bool
    exit_code: int
    metrics: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    rank: Optional[int] = None


def program_args() -> List[str]:
    """How this process was started, for torchrun to start each rank the same way: ``-m <module>`` or a script."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return ["-m", module]
    return [os.path.abspath(sys.argv[0])]


def job_arguments(task_overrides: Sequence[str], hydra_overrides: Sequence[str], job_dir: Path, continue_existing: bool = False) -> List[str]:
    """The job's command line after the program: its overrides, where it runs, the launching command's
    other Hydra settings. ``continue_existing`` (sweep jobs): a job dir that holds a run already is
    continued (``resume=``), so a re-run sweep skips finished jobs and continues interrupted ones."""
    from ds_hydra.common.overrides import quote
    from ds_hydra.training.resume import OVERRIDES_FILE

    task = [o for o in task_overrides if not o.startswith("resume=")]
    forwarded = [o for o in hydra_overrides if not o.lstrip("+~").startswith(_NOT_FORWARDED)]
    resume = [o for o in task_overrides if o.startswith("resume=")]
    if not resume and continue_existing and (job_dir / OVERRIDES_FILE).is_file():
        resume = [f"resume={quote(job_dir)}"]
    where = resume or [f"hydra.run.dir={quote(job_dir)}"]
    return [*option_args(sys.argv[1:], CONFIG_OPTIONS), *task, *forwarded, *where]


def run_job(settings: TorchrunSettings, job_dir: Path, args: Sequence[str], job_key: str, env: Optional[Dict[str, str]] = None) -> JobOutcome:
    """Run one job under torchrun (its output goes to this console) and collect its ranks' outcome."""
    reports = Path(job_dir) / RANK_REPORTS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    for old in reports.glob("rank*.json"):  # an earlier attempt's outcome
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", *settings.args(job_key), *program_args(), *args]
    log.info("torchrun job in %s: %s", job_dir, shlex.join(command))
    child_env = {**os.environ, **(env or {}), RANK_REPORTS_ENV: str(reports.resolve())}
    code = subprocess.call(command, env=child_env)
    return read_outcome(reports, code, Path(job_dir))


def read_outcome(reports: Path, code: int, job_dir: Path) -> JobOutcome:
    """The job's outcome from its ranks' reports and torchrun's exit code."""
    found = []
    for path in sorted(reports.glob("rank*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    failures = sorted((r for r in found if r.get("status") != "completed"), key=lambda r: r.get("time", 0.0))
    if code == 0 and not failures:
        rank0 = next((r for r in found if r.get("rank") == 0), {})
        return JobOutcome(completed=True, exit_code=0, metrics=rank0.get("metrics"))
    if not failures:  # killed before it could say (out of memory, SIGKILL) or torchrun itself failed
        return JobOutcome(completed=False, exit_code=code or 1,
                          error=f"torchrun exited with {code}; no rank reported an error (killed?): see {job_dir}/rank*.log")
    first = failures[0]
    error = f"rank {first['rank']}: {first['error']}"
    if first.get("traceback"):
        rank_log = job_dir / f"rank{first['rank']}.log"
        with contextlib.suppress(OSError), open(rank_log, "a", encoding="utf-8") as f:
            f.write(first["traceback"])
        error += f" (traceback in {rank_log})"
    return JobOutcome(completed=False, exit_code=int(first.get("exit_code") or 1), error=error, rank=first["rank"])


# -- a single run (no -m) through the launcher ------------------------------------------------------
def launcher_runs_this() -> bool:
    """``hydra/launcher=torchrun`` on a single run, in the launching process (not in a rank it started)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or RANK_REPORTS_ENV in os.environ or launch_env.launched():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.RUN and str(hydra_cfg.launcher.get("_target_", "")) == LAUNCHER_TARGET


def run_under_torchrun(startup: Optional[StartUp]) -> Dict[str, Any]:
    """This run's ranks under torchrun, in the run dir Hydra made here; returns rank 0's final metrics."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    settings = TorchrunSettings.from_config(hydra_cfg.launcher)
    if settings.problems():
        raise ConfigError(settings.problems())
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if startup is not None and startup.run_dir_lock is not None:
        startup.run_dir_lock.release()  # rank 0 of the job takes the run dir's lock now
        startup.run_dir_lock = None
    args = job_arguments(list(hydra_cfg.overrides.task), list(hydra_cfg.overrides.hydra), run_dir)
    outcome = run_job(settings, run_dir, args, job_key="run")
    if not outcome.completed:
        raise JobFailed(f"{run_dir}: the run under torchrun failed: {outcome.error}", outcome.exit_code)
    return outcome.metrics or {}


# -- inside a rank of a launched job ---------------------------------------------------------------
@contextlib.contextmanager
def reporting_to_launcher(startup: StartUp) -> Iterator[None]:
    """Around ``cli_main`` in each rank of a torchrun'd job: leave this rank's outcome for the launcher
    (the metrics its task noted in the command's ``startup``)."""
    folder = os.environ.get(RANK_REPORTS_ENV)
    if not folder:
        yield
        return
    try:
        yield
    except BaseException as exc:
        _report(Path(folder), _failure(exc), failed_at(exc))
        raise
    _report(Path(folder), {"status": "completed", "metrics": startup.job_metrics})


def _failure(exc: BaseException) -> Dict[str, Any]:
    """A rank's failure: the error behind a ``sys.exit`` (its context), one line, and its exit code."""
    import traceback

    code, cause = 1, exc
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        cause = exc.__context__
        if code == 0:
            return {"status": "completed", "metrics": None}
    if cause is None:  # released by rank 0, which reports why
        return {"status": "failed", "exit_code": code, "error": f"exited with {code}"}
    root = cause
    while root.__cause__ is not None:  # Hydra's instantiate wraps a _target_'s error: name the error itself
        root = root.__cause__
    report = {"status": "failed", "exit_code": getattr(cause, "exit_code", code),
              "error": f"{type(root).__name__}: {' '.join(str(root).split()) or '(no message)'}"}
    if not hasattr(cause, "exit_code"):  # a crash, not a UserError or a stop: keep its traceback
        report["traceback"] = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    return report


def failed_at(exc: BaseException) -> Optional[float]:
    """When this rank failed, as its process group's teardown noted on the error (None: not noted)."""
    if "torch.distributed" not in sys.modules:  # no process group was ever up: nothing noted
        return None
    from ds_hydra.engine.process_group import failed_at as noted

    return noted(exc)


def _report(folder: Path, outcome: Dict[str, Any], failed_time: Optional[float] = None) -> None:
    rank = launch_env.rank()
    # a failure's time is when it happened (before this rank's teardown made its peers fail), not now
    when = failed_time if outcome.get("status") == "failed" else None
    outcome = {"rank": rank, "time": when or time.time(), **outcome}
    path = folder / f"rank{rank}.json"
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(outcome, default=str), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        sys.stderr.write(f"ds_hydra: rank {rank}: could not report to the launcher ({exc})\n")
