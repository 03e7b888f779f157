"""``completed.json``: a finished run's final metrics and config (what a sweep re-run returns). Torch-free."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ds_hydra.errors import UserError
from ds_hydra.common.files import atomic_write_text
from ds_hydra.training.resume.config_diff import flat_config

COMPLETED_FILE = "completed.json"
COMPLETED_FORMAT = "ds_hydra.completed.v1"


def write_completion_marker(run_dir: Path, cfg, metrics: Dict[str, Any]) -> Path:
    """``completed.json``: the run finished; its final metrics and config (what a sweep re-run returns)."""
    from hydra.core.hydra_config import HydraConfig

    overrides: List[str] = []
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    record = {
        "format": COMPLETED_FORMAT,
        "step": int(metrics.get("step", cfg.trainer.max_steps)),
        "metrics": metrics,
        "overrides": overrides,
        "config": flat_config(cfg),
    }
    path = Path(run_dir) / COMPLETED_FILE
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_completion_marker(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / COMPLETED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable completion marker ({exc}); delete it to continue the run from its checkpoint") from None
    if not isinstance(record, dict) or record.get("format") != COMPLETED_FORMAT:
        raise UserError(f"{path}: not a ds_hydra completion marker; delete it to continue the run from its checkpoint")
    return record


def clear_completion_marker(run_dir: Path) -> None:
    """The run continues past its old end: its marker no longer describes it."""
    (Path(run_dir) / COMPLETED_FILE).unlink(missing_ok=True)
