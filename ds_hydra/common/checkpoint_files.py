"""Where a run's checkpoints live and how their files are named and listed (torch-free, so the CLI can
inspect a run directory before importing torch).

A checkpoint of step N is either one file, ``checkpoints/step_NNNNNNN.pt`` (``trainer.checkpoint_format=full``),
or one directory, ``checkpoints/step_NNNNNNN/`` (``dcp``: torch.distributed.checkpoint shards written by
every rank, plus the trainer's own state). A directory is written as ``.step_NNNNNNN.partial/`` and renamed
only once every rank has finished, so a name that matches is always a complete checkpoint; partial
directories of interrupted writes are ignored (and removed by the next save).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

CHECKPOINT_DIR = "checkpoints"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
STEP_DIR = re.compile(r"^step_(\d+)$")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index, written last by its coordinator
TRAINER_STATE_FILE = "trainer_state.pt"  # beside the shards: step, schedule, data position, config
PARTIAL_SUFFIX = ".partial"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def sharded_checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def partial_path(final: Path) -> Path:
    """Where a sharded checkpoint is written before it is complete on every rank."""
    return final.parent / f".{final.name}{PARTIAL_SUFFIX}"


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete ``dcp`` checkpoint directory (DCP's index and the trainer's state are both there)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / TRAINER_STATE_FILE).is_file()


def checkpoint_step(path: Path) -> Optional[int]:
    """The step in a ``step_NNNNNNN.pt`` or ``step_NNNNNNN`` name, else None."""
    match = STEP_FILE.match(Path(path).name) or STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints in ``run_dir`` in step order, files (``full``) and directories (``dcp``) alike; temp files
    and partial directories of interrupted writes are ignored."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if (m := STEP_FILE.match(p.name)) and p.is_file():
            found.append((int(m.group(1)), p))
        elif (m := STEP_DIR.match(p.name)) and is_sharded_checkpoint(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or directory (a directory is first renamed to a partial name, so a crash
    halfway through never leaves a damaged directory under a checkpoint's name)."""
    path = Path(path)
    if path.is_dir():
        doomed = path.parent / f".{path.name}.deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove what interrupted writes of sharded checkpoints left (never a complete checkpoint)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(".step_") and p.name.endswith((PARTIAL_SUFFIX, ".deleting")):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (called only after a new one is written)."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove_checkpoint(old)


def prune_before_writing(run_dir: Path, keep_last: int) -> List[Path]:
    """On a full disk, before writing a new checkpoint: delete the old ones that the pruning after it
    would delete anyway (all but the newest ``keep_last - 1``), never the newest, which stays intact
    until the new one is written. Returns what was deleted."""
    gone = list_checkpoints(run_dir)[:-max(1, keep_last - 1)]
    for old in gone:
        remove_checkpoint(old)
    return gone
