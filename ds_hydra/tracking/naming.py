"""What a run is called in plots and trackers, and which sweep it belongs to (torch-free)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from ds_hydra.tracking.base import SweepInfo

# Set by the torchrun launcher for the jobs it starts: they run as single runs, but belong to its sweep.
SWEEP_DIR_ENV = "DS_HYDRA_SWEEP_DIR"
JOB_NUM_ENV = "DS_HYDRA_JOB_NUM"

# Overrides that say where, how or to which trackers a run was launched, not what it trains.
_PLUMBING = ("hydra.", "hydra/", "~hydra", "resume=", "task=resume", "run.", "logger=", "logger.", "trainer.progress=")


def run_overrides() -> List[str]:
    """The command-line overrides that made this run (Hydra's), without the launch plumbing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = list(HydraConfig.get().overrides.task)
    return [o for o in overrides if not o.lstrip("+").startswith(_PLUMBING)]


def describe_run(name: Optional[str], run_dir: Path) -> str:
    """What the run was: its ``name``, else its overrides, else the default config (with its directory)."""
    if name:
        return str(name)
    overrides = run_overrides()
    if overrides:
        return " ".join(overrides)
    return f"default config ({short_dir(run_dir)})"


def short_dir(path: Path) -> str:
    """``path`` relative to the working directory when inside it (outputs/2024-05-01/12-00-00), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def current_sweep() -> Optional[SweepInfo]:
    """The sweep this job belongs to: Hydra's multirun, or the torchrun launcher's (environment); else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        sweep_dir, num = Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)
    elif os.environ.get(SWEEP_DIR_ENV):
        sweep_dir, num = Path(os.environ[SWEEP_DIR_ENV]), int(os.environ.get(JOB_NUM_ENV, "0"))
    else:
        return None
    return SweepInfo(sweep_dir=sweep_dir.absolute(), label=short_dir(sweep_dir), job_num=num)
