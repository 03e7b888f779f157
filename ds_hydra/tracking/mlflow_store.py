"""Where MLflow runs go: the tracking URI (a local SQLite store under ``outputs/`` by default), the
client, experiments (torch-free; imports mlflow only when a client is made)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

# No usage telemetry; a server that does not answer fails in seconds (one warning), not after
# MLflow's default 7 retries with backoff (minutes). The user's environment wins where it sets them.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
SINGLE_RUN_EXPERIMENT = "ds_hydra"
LOCAL_STORE = "mlflow.db"  # in <cwd>/outputs, beside the run dirs
LOCAL_ARTIFACTS = "mlartifacts"
SWEEP_DIR_TAG = "ds_hydra.sweep_dir"
RUN_DIR_TAG = "ds_hydra.run_dir"


def tracking_uri(cfg) -> str:
    """``logger.mlflow.tracking_uri``, else MLFLOW_TRACKING_URI, else the local store under ./outputs."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store_dir() / LOCAL_STORE}"


def local_store_dir() -> Path:
    return Path.cwd().absolute() / "outputs"


def client_for(uri: str):
    """An ``MlflowClient`` on ``uri`` (telemetry off, bounded retries); makes the local store's folder."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables" lines
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed (artifacts beside the local store when it is ours)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri == f"sqlite:///{local_store_dir() / LOCAL_STORE}":
        location = (local_store_dir() / LOCAL_ARTIFACTS).as_uri()
    return client.create_experiment(name, artifact_location=location)


