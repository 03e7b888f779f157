"""A sweep in the trackers: its jobs under one MLflow parent run (W&B groups need no state).

Jobs may run in several processes at once (joblib, the torchrun launcher, submitit), so the parent
run is created by whichever job comes first, under a file lock in the sweep dir, and its id is kept
in ``<sweep dir>/trackers.json`` for the others. When the sweep ends, the launching process marks
the parent finished (or failed) and attaches the sweep summary to it.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence

from ds_hydra.tracking.base import SweepInfo

log = logging.getLogger(__name__)

SWEEP_TRACKERS_FILE = "trackers.json"
_LOCK_FILE = ".trackers.lock"


def mlflow_parent_run(client, uri: str, experiment_id: str, sweep: SweepInfo) -> str:
    """The id of the sweep's parent run in ``experiment_id`` (created by the first job that asks)."""
    from ds_hydra.tracking.mlflow_store import SWEEP_DIR_TAG

    with _locked(sweep.sweep_dir):
        saved = _read(sweep.sweep_dir).get("mlflow") or {}
        if saved.get("tracking_uri") == uri and saved.get("experiment_id") == experiment_id:
            if client.get_run(saved["run_id"]).info.status != "RUNNING":
                client.update_run(saved["run_id"], status="RUNNING")  # the sweep is being re-run
            return saved["run_id"]
        parent = client.create_run(experiment_id, run_name=f"sweep {sweep.label}", tags={SWEEP_DIR_TAG: str(sweep.sweep_dir)})
        _write(sweep.sweep_dir, {"mlflow": {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": parent.info.run_id}})
        return parent.info.run_id


def finish_sweep(sweep_dir: Path, failed: int, files: Sequence[Path] = ()) -> None:
    """The sweep ended: its MLflow parent run (if a job made one) gets the summary files and its status."""
    saved = _read(Path(sweep_dir)).get("mlflow")
    if not saved:
        return
    try:
        from ds_hydra.tracking.mlflow_store import client_for

        client = client_for(saved["tracking_uri"])
        for path in files:
            if path is not None and Path(path).is_file():
                client.log_artifact(saved["run_id"], str(path))
        client.set_terminated(saved["run_id"], status="FAILED" if failed else "FINISHED")
    except Exception as exc:  # the report on disk matters more than its copy in MLflow
        log.warning("logger=mlflow: could not close the sweep's parent run %s (%s: %s)", saved.get("run_id"), type(exc).__name__, exc)


def _read(sweep_dir: Path) -> Dict[str, Any]:
    path = sweep_dir / SWEEP_TRACKERS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _write(sweep_dir: Path, update: Dict[str, Any]) -> None:
    from ds_hydra.common.files import atomic_write_text

    atomic_write_text(sweep_dir / SWEEP_TRACKERS_FILE, json.dumps({**_read(sweep_dir), **update}, indent=1) + "\n")


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """An exclusive lock between the jobs of one sweep (POSIX ``flock``; no lock where there is none)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): jobs starting at the same moment may each make a parent
        yield
        return
    with open(sweep_dir / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
