"""Preparing a run dir to continue from a checkpoint: the metrics after it are dropped (the continuation
writes them again), newer checkpoints are set aside, a stale completion marker goes. Torch-free."""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ds_hydra.errors import UserError
from ds_hydra.common.checkpoint_files import CHECKPOINT_DIR, checkpoint_step, latest_checkpoint, list_checkpoints
from ds_hydra.common.files import atomic_write_text
from ds_hydra.training.resume.completion import clear_completion_marker

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # the name ds_hydra.training.metrics writes (kept torch-free here)


def continue_from(run_dir: Path, step: int, checkpoint: Path) -> List[Dict[str, Any]]:
    """Prepare ``run_dir`` to continue from ``checkpoint`` (at ``step``); returns the metrics records kept.

    Newer checkpoints (when an older one was chosen) are set aside, records after ``step`` are
    dropped (the continuation writes them again) and a stale completion marker is removed.
    """
    if Path(checkpoint) != latest_checkpoint(run_dir):
        set_aside_newer(run_dir, step)
    kept = truncate_metrics(run_dir, step)
    clear_completion_marker(run_dir)
    return kept


def truncate_metrics(run_dir: Path, step: int) -> List[Dict[str, Any]]:
    """Keep the ``metrics.jsonl`` records up to ``step`` (the checkpoint's); returns them.

    Records after it came from the interrupted part, which the resumed run writes again. A torn
    last line (the process died mid-write) is dropped; damage anywhere else is an error.
    """
    kept, dropped = _split_metrics(Path(run_dir), step)
    if dropped:
        _rewrite_metrics(Path(run_dir), kept)
        log.info("metrics.jsonl: dropped %d records after step %d (recomputed now)", len(dropped), step)
    return kept


def set_aside_newer(run_dir: Path, step: int) -> Optional[Path]:
    """Move checkpoints and metrics newer than ``step`` into ``checkpoints/superseded_<time>/``.

    Used when continuing from an older checkpoint than the newest: nothing of the abandoned
    continuation is deleted.
    """
    run_dir = Path(run_dir)
    newer = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    kept, dropped = _split_metrics(run_dir, step)
    if not newer and not dropped:
        return None
    folder = run_dir / CHECKPOINT_DIR / f"superseded_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    folder.mkdir(parents=True)
    for path in newer:
        os.replace(path, folder / path.name)
    if dropped:
        (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in dropped), encoding="utf-8")
        _rewrite_metrics(run_dir, kept)
    log.warning("continuing from step %d: moved %d newer checkpoints and %d metrics records to %s", step, len(newer), len(dropped), folder)
    return folder


def _split_metrics(run_dir: Path, step: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    kept: List[Dict[str, Any]] = []
    dropped: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                dropped.append({"torn_line": line})
                continue
            raise UserError(f"{path}: line {number} is not JSON; repair or delete that line, then resume") from None
        later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        (dropped if later else kept).append(record)
    return kept, dropped


def _rewrite_metrics(run_dir: Path, records: List[Dict[str, Any]]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


