"""Schemas of the ``logger`` config group: where a run's metrics go besides ``metrics.jsonl`` (torch-free).

``logger`` takes several options at once (``'logger=[jsonl,csv,tensorboard,wandb,mlflow]'``); each
option turns on one destination. ``metrics.jsonl`` is written whatever is chosen: the run directory
is the source of truth, the trackers are views of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from importlib.util import find_spec
from typing import Dict, List, Optional


class WandbMode(Enum):
    offline = "offline"  # files under <run dir>/wandb only; upload later with `wandb sync <run dir>/wandb/offline-run-*`
    online = "online"  # stream to the W&B server (needs network and `wandb login`)


@dataclass
class WandbConfig:
    """Weights & Biases (``logger=[jsonl,wandb]``, needs ``pip install 'ds-hydra[wandb]'``)."""

    enabled: bool = False
    """Set by the ``wandb`` option of ``logger``."""
    mode: WandbMode = WandbMode.offline
    """offline (default: nothing leaves the machine) or online."""
    project: str = "ds_hydra"
    """The W&B project the run belongs to."""
    entity: Optional[str] = None
    """The W&B user or team (null: your default entity)."""
    name: Optional[str] = None
    """The run's display name (null: the run's ``name``, else its command-line overrides)."""
    group: Optional[str] = None
    """Runs shown together (null: the sweep directory for sweep jobs, no group for single runs)."""
    tags: List[str] = field(default_factory=list)
    """Free-form labels of the run."""


@dataclass
class MlflowConfig:
    """MLflow (``logger=[jsonl,mlflow]``, needs ``pip install 'ds-hydra[mlflow]'``)."""

    enabled: bool = False
    """Set by the ``mlflow`` option of ``logger``."""
    tracking_uri: Optional[str] = None
    """Where runs are stored, e.g. http://mlflow.example:5000 or sqlite:///path/mlflow.db (null: the
    MLFLOW_TRACKING_URI environment variable, else the local store sqlite:///<cwd>/outputs/mlflow.db,
    with artifacts in <cwd>/outputs/mlartifacts; browse it with `mlflow ui --backend-store-uri <uri>`)."""
    experiment_name: Optional[str] = None
    """The experiment the run goes into (null: "ds_hydra" for single runs; for sweep jobs, one experiment
    per sweep, named after the sweep directory)."""
    run_name: Optional[str] = None
    """The run's display name (null: the run's ``name``, else its command-line overrides)."""
    tags: Dict[str, str] = field(default_factory=dict)
    """Extra tags of the run."""


@dataclass
class LoggerConfig:
    """metrics.jsonl and the loss-curve PNG are always written; each option of ``logger`` adds a destination."""

    csv: bool = False
    """Also write <run dir>/metrics.csv (one row per record, for spreadsheets)."""
    tensorboard: bool = False
    """Also write TensorBoard event files into <run dir>/tensorboard (needs the tensorboard package)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


# logger option -> (the package it imports, the ds-hydra extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def chosen_trackers(cfg) -> List[str]:
    """The destinations ``cfg`` (the ``logger`` node) turns on, besides metrics.jsonl, in a fixed order."""
    chosen = [name for name in ("csv", "tensorboard") if cfg.get(name, False)]
    return chosen + [name for name in ("wandb", "mlflow") if cfg[name].enabled]


def validate_logger(cfg, task: str) -> List[str]:
    """A chosen tracker whose package is not installed: one line naming the extra (train tasks only)."""
    if task not in ("train", "resume"):
        return []
    problems = []
    for name in chosen_trackers(cfg):
        if name in EXTRAS and not _installed(EXTRAS[name][0]):
            package, extra = EXTRAS[name]
            problems.append(f"logger={name}: needs the {package} package, which is not installed: pip install 'ds-hydra[{extra}]'")
    return problems


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False
