"""``logger=[jsonl,mlflow]``: an MLflow run, in a local SQLite store under ``outputs/`` by default."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ds_hydra.tracking.base import FAILED, FINISHED, STOPPED, RunInfo, Tracker, numeric
from ds_hydra.tracking.mlflow_store import (
    RUN_DIR_TAG,
    SINGLE_RUN_EXPERIMENT,
    SWEEP_DIR_TAG,
    client_for,
    experiment_id,
    tracking_uri,
)
from ds_hydra.tracking.sweep import mlflow_parent_run

log = logging.getLogger(__name__)

_STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", STOPPED: "KILLED"}
_BATCH = 100  # MLflow takes at most 100 params per log_batch call
_METRICS_PER_BATCH = 1000  # and at most 1000 metrics
SEND_EVERY_S = 5.0  # metrics reach MLflow at most this late (and all of them when the run ends)
_PARAM_VALUE_LIMIT = 6000  # characters of one param value MLflow stores


class MlflowTracker(Tracker):
    """The flattened config as params, every metric at its step, the final metrics (``final/<name>``),
    the loss curve and resolved config as artifacts; sweep jobs are children of one parent run per sweep."""

    key = "mlflow"
    append_only = True

    def __init__(self, cfg) -> None:
        self.cfg = cfg.mlflow
        self.client = None
        self.run_id: Optional[str] = None
        self.last_step = 0
        self.pending: List[Any] = []  # metrics not sent yet
        self.sent_at = time.monotonic()

    def start(self, run: RunInfo) -> Dict[str, Any]:
        uri = tracking_uri(self.cfg)
        self.client = client_for(uri)
        previous = run.previous if run.previous.get("tracking_uri") == uri else {}
        if previous.get("run_id"):
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_new_params(run.params)
            log.info("MLflow: continuing run %s in %s", self.run_id, uri)
            return {**previous}
        name = self.cfg.experiment_name or (run.sweep.label if run.sweep is not None else SINGLE_RUN_EXPERIMENT)
        experiment = experiment_id(self.client, name, uri)
        tags = {RUN_DIR_TAG: str(run.run_dir), **{str(k): str(v) for k, v in self.cfg.tags.items()}}
        if run.sweep is not None:
            tags["mlflow.parentRunId"] = mlflow_parent_run(self.client, uri, experiment, run.sweep)
            tags[SWEEP_DIR_TAG] = str(run.sweep.sweep_dir)
        created = self.client.create_run(experiment, run_name=(self.cfg.run_name or run.name)[:250], tags=tags)
        self.run_id = created.info.run_id
        self._log_params(run.params)
        log.info("MLflow run %s in experiment '%s' of %s", self.run_id, name, uri)
        return {"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id}

    def log(self, step: int, record: Dict[str, Any]) -> None:
        """Metrics are sent in batches, every few seconds: one MLflow write is a database commit (about
        25 ms on a local SQLite store, a request to a server), far more than a training step can spare."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), stamp, step) for k, v in numeric(record).items()]
        self.last_step = max(self.last_step, step)
        if len(self.pending) >= _METRICS_PER_BATCH or time.monotonic() - self.sent_at >= SEND_EVERY_S:
            self._send()

    def _send(self) -> None:
        pending, self.pending = self.pending, []
        self.sent_at = time.monotonic()
        for chunk in _chunks(pending, _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def finish(self, final: Dict[str, Any], files: Sequence[Path], status: str) -> None:
        from mlflow.entities import Metric, RunTag

        try:
            self._send()
            stamp = int(time.time() * 1000)
            metrics = [Metric(f"final/{k}", float(v), stamp, self.last_step) for k, v in numeric(final).items()]
            tags = [RunTag(f"ds_hydra.{k}", str(v)) for k, v in final.items() if isinstance(v, str)]
            if metrics or tags:
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            for path in files:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
        finally:
            self.client.set_terminated(self.run_id, status=_STATUS.get(status, "FAILED"))

    def _log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, _BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def _log_new_params(self, params: Dict[str, Any]) -> None:
        """A continued run: params are write-once in MLflow, so only new keys are logged and changed
        values are recorded as ``continued_with.<key>`` tags."""
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, _param_value(v)) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"continued_with.{k}", _param_value(v)) for k, v in params.items() if k in logged and logged[k] != _param_value(v)]
        for chunk in _chunks(new, _BATCH):
            self.client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(changed, _BATCH):
            self.client.log_batch(self.run_id, tags=chunk)


def _param_value(value: Any) -> str:
    return str(value)[:_PARAM_VALUE_LIMIT]


def _chunks(items: List[Any], size: int) -> Iterator[List[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
