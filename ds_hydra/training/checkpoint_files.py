"""Where a run's checkpoints live and how their files are named and listed (torch-free, so the CLI can
inspect a run directory before importing torch)."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable, List, Optional

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


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``.

    Readers see the old content or the new, never half of it; on an error (a full disk) the temp
    file is removed and the error propagates, leaving ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
