"""What every tracker is given and must do: the ``Tracker`` interface and ``RunInfo``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# How a run ended, as the trackers are told.
FINISHED, FAILED, STOPPED = "finished", "failed", "stopped"


@dataclass
class SweepInfo:
    """The sweep a job belongs to: trackers group its jobs (a W&B group, an MLflow parent run)."""

    sweep_dir: Path
    label: str  # how the sweep is named in the trackers (its directory, relative to the cwd when inside it)
    job_num: int


@dataclass
class RunInfo:
    """What a tracker needs to start (or continue) its view of one run."""

    run_dir: Path
    name: str  # what the run was: its ``name``, else its overrides, else its directory
    config: Dict[str, Any]  # the resolved config, nested (without ``hydra``)
    params: Dict[str, Any]  # the same, flattened to ``dotted.key: value``
    sweep: Optional[SweepInfo] = None
    previous: Dict[str, Any] = field(default_factory=dict)  # this tracker's entry in trackers.json, if the run had one
    start_step: int = 0  # the step training continues from (0: a new run)
    records: List[Dict[str, Any]] = field(default_factory=list)  # the metrics records kept from before start_step
    last_logged_step: Optional[int] = None  # the last step the trackers were sent before an interruption


class Tracker:
    """One destination of a run's metrics besides metrics.jsonl.

    The ``Trackers`` fan-out calls these on rank 0 only, and turns any exception into a warning
    that ends this tracker, never the run.
    """

    key = ""  # the ``logger`` option that chooses it
    append_only = False  # True: a record cannot be replaced, so a resumed run does not send one twice

    def start(self, run: RunInfo) -> Optional[Dict[str, Any]]:
        """Open (or continue) the tracker's run; returns what identifies it, kept in ``trackers.json``."""
        return None

    def log(self, step: int, record: Dict[str, Any]) -> None:
        """One metrics record (the values of one ``metrics.jsonl`` line, without ``step``)."""

    def finish(self, final: Dict[str, Any], files: Sequence[Path], status: str) -> None:
        """The run ended (``status``: finished, failed or stopped): its final metrics and files (the loss curve)."""


def numeric(values: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers among ``values`` (trackers plot numbers; strings and bools stay in the JSONL)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out
