"""Where a run writes: Hydra's output dir when run through Hydra, else a fresh ``outputs/<time>``."""
from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ds_hydra.errors import UserError
from ds_hydra.training.checkpoint_files import atomic_write_text

RESOLVED_CONFIG_FILE = "config_resolved.yaml"


def resolve_run_dir(run_dir: Optional[Path] = None) -> Path:
    if run_dir is None:
        run_dir = _hydra_output_dir() or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass  # fail now, not after an hour of training, if the directory is not writable
    except OSError as exc:
        raise UserError(f"run dir {run_dir}: not writable ({exc.strerror}); set hydra.run.dir to a writable path") from None
    return run_dir


def _hydra_output_dir() -> Optional[Path]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def write_resolved_config(cfg, run_dir: Path) -> Path:
    """The config with every interpolation resolved: what inference and resume rebuild from."""
    path = Path(run_dir) / RESOLVED_CONFIG_FILE
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
