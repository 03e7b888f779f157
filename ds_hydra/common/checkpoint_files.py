"""Where a run's checkpoints live and how their files are named and listed (torch-free, so the CLI can
inspect a run directory before importing torch)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

CHECKPOINT_DIR = "checkpoints"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a ``step_NNNNNNN.pt`` name, else None."""
    match = STEP_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints in ``run_dir`` in step order (temp files of interrupted writes are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (called only after a new one is written)."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def prune_before_writing(run_dir: Path, keep_last: int) -> List[Path]:
    """On a full disk, before writing a new checkpoint: delete the old ones that the pruning after it
    would delete anyway (all but the newest ``keep_last - 1``), never the newest, which stays intact
    until the new one is written. Returns what was deleted."""
    gone = list_checkpoints(run_dir)[:-max(1, keep_last - 1)]
    for old in gone:
        old.unlink(missing_ok=True)
    return gone
