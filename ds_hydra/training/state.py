"""Save and load resumable training state: atomically written, safely loaded (no code runs on load).

* ``atomic_torch_save``: temp file in the same folder, fsync, rename, fsync the folder. A crash or
  a full disk at any moment leaves the previous checkpoint and never a torn new one.
* ``safe_torch_load``: ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
  containers and refuses any pickle that would call a function (an object's ``__reduce__``).
  Every failure is one ``UserError`` line naming the file and what is wrong with it.
* ``rng_state`` / ``set_rng_state``: every random generator a run draws from (torch CPU, every
  CUDA device, Python's ``random``, NumPy's global one), as tensors and plain values.
* ``state_dict_mismatches``: every name and shape by which a saved state dict does not fit a model.
* ``load_train_state`` / ``checked_state`` / ``load_checked_weights``: a checkpoint file read back,
  its format and keys checked, weights loaded with every mismatch named.
* ``checkpoint_path`` / ``list_checkpoints`` / ``latest_checkpoint`` / ``prune_checkpoints``:
  ``<run dir>/checkpoints/step_NNNNNNN.pt``, in step order (torch-free, in
  ``ds_hydra.common.checkpoint_files``; re-exported here).
"""
from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ds_hydra.common.files import atomic_write
from ds_hydra.errors import UserError
from ds_hydra.common.checkpoint_files import (  # noqa: F401  (re-exported: the run's file layout)
    CHECKPOINT_DIR,
    checkpoint_path,
    checkpoint_step,
    is_sharded_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune_before_writing,
    prune_checkpoints,
    sharded_checkpoint_path,
)

TRAIN_STATE_FORMAT = "ds_hydra.train_state.v1"
TRAIN_STATE_KEYS = ("step", "model", "optimizer", "scheduler", "data", "rng", "config")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same directory, fsync it, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a torn
    one; on an error (a full disk) the temp file is removed and the error propagates.
    """
    def write(f) -> None:
        writer = _WriteErrors(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:  # torch's writer reports a failed write as a RuntimeError
                raise writer.error from None
            raise

    atomic_write(path, write, binary=True)


class _WriteErrors:
    """A file wrapper that remembers the ``OSError`` of a failed write (a full disk), which
    ``torch.save``'s zip writer would otherwise turn into an unexplained ``RuntimeError``."""

    def __init__(self, file):
        self.file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def safe_torch_load(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU: tensors and plain containers only.

    ``mmap=True`` maps tensor storage instead of reading it (cheap: for checking a file before a
    run). Errors are one line naming the file: missing, empty, truncated, not a checkpoint, or
    refused because loading it would call a function.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the checkpoint file is empty (a write that never finished); delete it")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: not a PyTorch checkpoint, or truncated (no zip directory at its end); delete it or "
            f"give another checkpoint"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a pickle that wants to run code, or damaged contents
        raise UserError(f"{path}: {_load_failure(exc)}") from None


def _load_failure(exc: Exception) -> str:
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand (\d+)", text)
    if refused:
        name = refused.group(1).removeprefix("builtins.")  # torch < 2.5 names builtins with their module
        return (
            f"refused: loading it would call {name} (checkpoints may hold only tensors and plain "
            f"containers, so files that run code on load are never loaded); use a checkpoint written by ds_hydra"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return f"not a loadable checkpoint ({first[:200]})"


def load_train_state(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """A resumable training state written by ``Trainer.save``: safely loaded, its keys checked."""
    return checked_state(safe_torch_load(path, mmap=mmap), path, TRAIN_STATE_FORMAT, TRAIN_STATE_KEYS, "training checkpoint")


def checked_state(state: Any, path: Path, expected_format: str, keys, what: str) -> Dict[str, Any]:
    """``state`` if it is a dict of ``expected_format`` holding every one of ``keys``; else one line naming
    ``path`` and what is wrong (a file of another kind, or one written only in part)."""
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a ds_hydra {what} (format {found!r}, expected {expected_format})")
    missing = [key for key in keys if key not in state]
    if missing:
        raise UserError(f"{path}: incomplete {what} (no {', '.join(missing)})")
    return state


def load_checked_weights(model: nn.Module, weights: Any, where: str, what: str) -> None:
    """Load ``weights`` (a state dict read from a file) into ``model``, strictly; one line naming ``where``
    when it is not a state dict of ``what`` or does not fit the model (every mismatch listed)."""
    if not isinstance(weights, dict):
        raise UserError(f"{where} is not a ds_hydra {what} (it has no 'model' weights)")
    problems = state_dict_mismatches(model, weights)
    if problems:
        raise UserError(f"{where} does not fit this model: {'; '.join(problems)}")
    model.load_state_dict(weights, strict=True)


def seed_everything(seed: int) -> None:
    """Seed every global generator a checkpoint records (torch with CUDA, Python's, NumPy's), so that
    two runs with one seed draw the same numbers wherever a model or dataset draws them."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def rng_state() -> Dict[str, Any]:
    """Every global random generator's state, as tensors and plain values (loadable weights-only)."""
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy_state = _numpy_rng_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    else:  # the first format kept only the internal state
        random.setstate((3, tuple(python), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        _set_numpy_rng_state(state["numpy"])


def _numpy_rng_state() -> Optional[Dict[str, Any]]:
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: Dict[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def state_dict_mismatches(model: nn.Module, saved: Dict[str, Any]) -> List[str]:
    """Every difference between a saved state dict and ``model``'s: missing and unexpected names, shapes.

    Names that differ only in a layer index are listed once with the indices (``blocks.[0-11].attn.bias``),
    so a whole mismatch fits in one line however deep the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(compact_names(missing))}")
    if unexpected:
        problems.append(f"unexpected {', '.join(compact_names(unexpected))}")
    shapes: Dict[tuple, List[str]] = {}
    for k, v in expected.items():
        if k in saved and (not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape):
            was = tuple(saved[k].shape) if isinstance(saved[k], torch.Tensor) else type(saved[k]).__name__
            shapes.setdefault((was, tuple(v.shape)), []).append(k)
    for (was, now), keys in shapes.items():
        problems.append(f"{', '.join(compact_names(keys))} {'is' if len(keys) == 1 else 'are'} {was} in the checkpoint but {now} in the model")
    return problems


def compact_names(names: List[str]) -> List[str]:
    """Parameter names with their layer indices folded: ``h.0.w, h.1.w, h.2.w`` -> ``h.[0-2].w``."""
    groups: Dict[str, List[int]] = {}
    order: List[str] = []
    for name in names:
        parts = name.split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        if not numbered:
            key, index = name, None
        else:
            at = numbered[0]
            key, index = ".".join(parts[:at] + ["{}"] + parts[at + 1:]), int(parts[at])
        if key not in groups:
            groups[key] = []
            order.append(key)
        if index is not None:
            groups[key].append(index)
    return [key.format(_ranges(groups[key])) if groups[key] else key for key in order]


def _ranges(indices: List[int]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    runs, start, prev = [], indices[0], indices[0]
    for i in sorted(set(indices))[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return "[" + ",".join(runs) + "]"
