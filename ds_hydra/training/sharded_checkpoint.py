"""Sharded checkpoints (``trainer.checkpoint_format=dcp``): torch.distributed.checkpoint (DCP), written by
every rank in parallel, loadable on any number of ranks, optionally written in the background.

A checkpoint of step N is the directory ``checkpoints/step_NNNNNNN/``:

* ``.metadata`` and ``__<rank>_0.distcp``: DCP's index and each rank's shards of ``{"model": ...,
  "optimizer": ...}`` as torch's ``get_state_dict`` gives them (keyed by parameter path; FSDP's DTensor
  shards, DDP's replicated tensors written once, spread over the ranks);
* ``trainer_state.pt`` (rank 0): step, schedule, loss scaler, data position, loss window, resolved config;
* ``rng_rank<r>.pt`` (each rank): that rank's random generators.

It is written as ``.step_NNNNNNN.partial/`` and renamed by rank 0 once DCP's coordinator has written
``.metadata``, which it does only after every rank reported its shards written: a checkpoint directory
under its final name is complete on every rank. Loading is safe as ``weights_only`` loading is: DCP's
index is unpickled with an allowlist of DCP's own metadata classes, non-tensor entries (param groups)
are loaded with ``torch.load(weights_only=True)``, and the small files likewise.

``async_checkpoint``: DCP's ``async_save`` copies the state into CPU buffers kept between saves
(``StagingBuffers``), returns, and writes from a thread over a gloo process group of its own (training's
collectives never share it); the small files are written by that thread too (``_writer_class``). ``PendingSave``
is finished (waited for, renamed, older ones pruned) by the next save, the end of the run, a stop
signal, or as soon as ``poll`` sees it done.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Optional

import torch

from ds_hydra.errors import UserError
from ds_hydra.common.checkpoint_files import (
    DCP_METADATA,
    TRAINER_STATE_FILE,
    is_sharded_checkpoint,
    partial_path,
)
from ds_hydra.common.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

__all__ = [
    "SHARDED_STATE_FORMAT",
    "load_checkpoint_state",
    "load_resume_state",
    "PendingSave",
    "load_sharded",
    "read_full_state",
    "read_trainer_state",
    "save_sharded",
    "write_sharded",
]

SHARDED_STATE_FORMAT = "ds_hydra.sharded_train_state.v1"
SHARDED_STATE_KEYS = ("step", "scheduler", "data", "config")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# -- reading DCP's files safely ------------------------------------------------------------------
# Every global that DCP's .metadata pickle names (torch 2.4-2.13); anything else is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's index and nothing else: a class outside DCP's metadata (and torch dtypes) is refused,
    so a crafted ``.metadata`` cannot make loading call a function."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_metadata(path: Path):
    """DCP's index of the checkpoint directory ``path``, unpickled with the allowlist above."""
    file = Path(path) / DCP_METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path}: not a sharded checkpoint (no {DCP_METADATA}: a write that never finished?)") from None
    except Exception as exc:
        raise UserError(
            f"{file}: refused or damaged ({str(exc)[:200]}); sharded checkpoints are loaded only when their index "
            f"holds DCP's own metadata; use a checkpoint written by ds_hydra"
        ) from None
    for where in (getattr(metadata, "storage_data", None) or {}).values():  # the shard files DCP will open
        name = str(getattr(where, "relative_path", ""))
        if name in ("", ".", "..") or Path(name).is_absolute() or Path(name).name != name:
            raise UserError(f"{file}: names the shard file {name!r}, outside its own directory; a checkpoint "
                            f"reads only the files beside its index; use a checkpoint written by ds_hydra")
    return metadata


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(path))
            if getattr(metadata, "storage_meta", None) is not None:  # as FileSystemReader does
                metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return SafeFileSystemReader(str(path))


def _load_planner(**kwargs):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but its non-tensor entries (param groups) load weights-only."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as exc:
                raise UserError(f"checkpoint entry {read_item.dest_index.fqn}: refused ({str(exc).splitlines()[0][:200]})") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # where DCP's own planner takes it from

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner(**kwargs)


def _safe_load(path: Path) -> Dict[str, Any]:
    from ds_hydra.training.state import safe_torch_load

    return safe_torch_load(path)


def read_trainer_state(path: Path) -> Dict[str, Any]:
    """``trainer_state.pt`` of a sharded checkpoint: step, schedule, data position, config (its keys checked)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path}: not a complete sharded checkpoint (it needs {DCP_METADATA} and {TRAINER_STATE_FILE})")
    from ds_hydra.training.state import checked_state

    state = _safe_load(path / TRAINER_STATE_FILE)
    return checked_state(state, path, SHARDED_STATE_FORMAT, SHARDED_STATE_KEYS, "sharded checkpoint")


def read_rng_state(path: Path, rank: int) -> Optional[Dict[str, Any]]:
    """This rank's generators; rank 0's for a rank the saving run did not have (resumed on more ranks)."""
    for candidate in (Path(path) / rng_file(rank), Path(path) / rng_file(0)):
        if candidate.is_file():
            return _safe_load(candidate)
    return None


# -- saving ----------------------------------------------------------------------------------------
class StagingBuffers:
    """The CPU copy an asynchronous save writes from, allocated at the first save and reused by every later
    one (pinned where CUDA is available, so device-to-host copies run at full speed).

    DCP's own staging allocates a new copy at every save and, for FSDP's DTensors on the CPU, deep-copies
    each shard before copying into the new tensor: three passes over the state and fresh pages to fault in,
    all while training waits. Reused, staging is one copy into memory already mapped. At most one save is
    in flight (the trainer finishes the previous one first), so the buffers are never read while refilled.
    The price is that copy held for the whole run, not just during a save."""

    def __init__(self) -> None:
        self._layout: Optional[tuple] = None
        self._buffers: Optional[Dict[str, Any]] = None
        self.foreground_warned = False  # a state no copy can be made of was written in the foreground once already

    def stage(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """``state`` with every tensor copied into the buffers (new ones if its layout changed: the
        optimizer's moments appear at its first step); other entries as they are now (the lr of each group)."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        layout = _layout(state)
        if layout != self._layout:
            self._buffers = None  # the old copy goes before the new one is allocated
            self._buffers = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
            self._layout = layout
        return _copy_state_dict(state, self._buffers)

    @staticmethod
    def supported() -> bool:
        """torch's helpers for a reusable copy (torch >= 2.4 has them; without, DCP's own staging is used)."""
        try:
            from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict  # noqa: F401
        except ImportError:
            return False
        return True


def _unstageable(node: Any) -> Optional[str]:
    """The type of a tensor in ``node`` that no CPU copy can be made of ahead of time, else None: tensor
    subclasses other than DTensor (torchao's quantized optimizer states share their storage when copied and
    cannot be allocated empty), which DCP writes only from the live state."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch 2.4: still private
        from torch.distributed._tensor import DTensor

    if isinstance(node, torch.Tensor):
        return None if type(node) in (torch.Tensor, torch.nn.Parameter) or isinstance(node, DTensor) else type(node).__name__
    values = node.values() if isinstance(node, dict) else node if isinstance(node, (list, tuple)) else ()
    return next((found for found in map(_unstageable, values) if found is not None), None)


def _layout(node: Any) -> Any:
    """What decides the shape of the staging buffers: the nesting, and each tensor's type, shape and dtype."""
    if isinstance(node, torch.Tensor):
        local = getattr(node, "_local_tensor", node)  # a DTensor's buffer is its local shard
        return (type(node).__name__, tuple(local.shape), local.dtype)
    if isinstance(node, dict):
        return tuple((key, _layout(value)) for key, value in node.items())
    if isinstance(node, (list, tuple)):
        return tuple(_layout(value) for value in node)
    return None  # ints, floats, strings: passed through as they are at each save


def _file_writer(path: Path, files: Dict[str, bytes], staging: Optional[StagingBuffers] = None):
    """DCP's file writer for ``path``, which also writes ``files`` (name: bytes) there; with ``staging``,
    its async staging copies into those buffers."""
    return _writer_class()(str(path), files, staging if staging is not None and StagingBuffers.supported() else None)


@functools.lru_cache(maxsize=None)
def _writer_class():
    from torch.distributed.checkpoint import FileSystemWriter

    class ShardWriter(FileSystemWriter):
        """Writes this rank's small files (its generators; rank 0: the trainer's state) beside its shards,
        in ``write_data``: in the background with async saves, and before this rank reports its shards
        written, so ``.metadata`` (written once every rank has) means every rank's files are there too."""

        def __init__(self, path: str, files: Dict[str, bytes], staging: Optional[StagingBuffers]) -> None:
            super().__init__(path)
            self._files = files
            self._staging = staging

        def stage(self, state_dict):
            if self._staging is None:
                return super().stage(state_dict)
            self.per_thread_copy_ahead = 0  # as FileSystemWriter.stage: the staged state is in CPU memory
            return self._staging.stage(state_dict)

        def write_data(self, plan, planner):
            for name, data in self._files.items():
                atomic_write(Path(self.path) / name, lambda f, data=data: f.write(data), binary=True)
            return super().write_data(plan, planner)

    return ShardWriter


def _serialized(obj: Any) -> bytes:
    """``torch.save``'s bytes of ``obj``: a snapshot taken now, written later (tensors copied in)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class PendingSave:
    """An asynchronous save in flight: DCP's future, and where its directory goes once it is complete."""

    future: Any
    partial: Path
    final: Path
    is_main: bool
    on_complete: Callable[[Path], None]

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> Path:
        """Wait for the write, then (rank 0) rename the directory to its final name."""
        try:
            self.future.result()
        except OSError as exc:
            raise _write_error(self.final, exc) from None
        except Exception as exc:  # DCP wraps a rank's failure (a full disk) in its own exception
            raise UserError(f"{self.final}: the background write failed: {_first_line(exc)}") from None
        if self.is_main:
            _publish(self.partial, self.final)
            self.on_complete(self.final)
        return self.final


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _write_error(final: Path, exc: OSError) -> UserError:
    return UserError(f"{final}: cannot write the checkpoint ({exc.strerror or exc})")


def save_sharded(
    engine,
    trainer_state: Dict[str, Any],
    rng: Dict[str, Any],
    final: Path,
    asynchronous: bool = False,
    process_group=None,
    on_complete: Callable[[Path], None] = lambda path: None,
    staging: Optional[StagingBuffers] = None,
    trainable: Optional[Collection[str]] = None,
) -> Optional[PendingSave]:
    """Every rank writes its shards of the engine's model and optimizer state into ``final``'s partial
    directory; the directory gets its final name once all ranks are done. Synchronous: returns None once
    it has (``on_complete`` called on rank 0). Asynchronous: returns a ``PendingSave`` once the state is
    copied to CPU memory (into ``staging``'s buffers when given). ``trainable``: of the model, these
    parameters alone (an adapter run's). Every rank calls it at the same step."""
    import torch.distributed.checkpoint as dcp

    partial = partial_path(final)
    if engine.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted write of this step left
        partial.mkdir(parents=True)
    engine.barrier()  # the directory is fresh before any rank writes into it
    files = {rng_file(engine.rank): _serialized(rng)}
    if engine.is_main:
        files[TRAINER_STATE_FILE] = _serialized({"format": SHARDED_STATE_FORMAT, "world_size": engine.world_size, **trainer_state})
    state = engine.sharded_state_dict(trainable)
    unstageable = _unstageable(state) if asynchronous else None
    if unstageable is not None:  # the same on every rank: each writes this one before returning
        if staging is None or not staging.foreground_warned:
            log.warning("trainer.async_checkpoint: the optimizer's state holds %s tensors, which cannot be copied ahead "
                        "for a background write; checkpoints are written in the foreground", unstageable)
        if staging is not None:
            staging.foreground_warned = True
        asynchronous = False
    writer = _file_writer(partial, files, staging if asynchronous else None)
    if not asynchronous:
        try:
            with _alone():
                dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=_one_process())
        except OSError:
            raise
        except Exception as exc:  # DCP reports a rank's failed write (a full disk) as its own exception
            raise UserError(f"{final}: {_first_line(exc)}") from None
        if engine.is_main:  # .metadata exists: every rank's shards are written
            _publish(partial, final)
            on_complete(final)
        return None
    # the write runs on another thread, outside any catch_warnings: silence DCP's one-process notice there too
    warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTICE)
    with _alone():
        future = dcp.async_save(state, storage_writer=writer, process_group=process_group, no_dist=_one_process())
    return PendingSave(future, partial, final, engine.is_main, on_complete)


_ONE_PROCESS_NOTICE = r"torch\.distributed is (disabled, )?unavailable or uninitialized"


@contextlib.contextmanager
def _alone():
    """DCP warns on every read or write without a process group that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTICE)
        yield


def _one_process() -> bool:
    """No process group: DCP reads and writes alone (said explicitly, or it warns that it assumes so)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def _publish(partial: Path, final: Path) -> None:
    """Rename the complete directory to its checkpoint name (replacing one of the same step)."""
    if final.exists():
        from ds_hydra.common.checkpoint_files import remove_checkpoint

        remove_checkpoint(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


def checkpoint_process_group(world_size: int):
    """A gloo group for background writes, so their collectives never interleave with training's on the
    default group (created collectively: every rank calls it); None in one process."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")


# -- loading ---------------------------------------------------------------------------------------
def load_sharded(engine, path: Path, trainable: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """Load model and optimizer shards into ``engine`` (any number of ranks: DCP reshards), and return
    the trainer's state with this rank's generators under ``rng``. ``trainable``: the model's parameters
    the checkpoint holds (an adapter run's); the others stay as they are."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    trainer_state = read_trainer_state(path)
    state = engine.sharded_state_dict(trainable)  # the layout this run holds (its shards), filled in place
    with _alone(), _rank_failure_as_error():
        dcp.load(state, storage_reader=_reader(path), planner=_load_planner(), no_dist=_one_process())
    engine.load_sharded_state_dict(state, strict=trainable is None)
    trainer_state["rng"] = read_rng_state(path, engine.rank)
    return trainer_state


@contextlib.contextmanager
def _rank_failure_as_error():
    """DCP reports a rank's failure (a key this run has and the checkpoint lacks) as a CheckpointException, a
    BaseException whose text is every rank's traceback: re-raised as a RuntimeError with the first rank's reason."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = [pair[0] for pair in exc.failures.values()]  # (exception, traceback) per failed rank
        raise RuntimeError(_first_line(failures[0]) if failures else type(exc).__name__) from None


def read_sharded_state(path: Path, only: Optional[str] = None) -> Dict[str, Any]:
    """Every tensor and entry of a sharded checkpoint, whole, in this process (no process group):
    ``{"model": {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]}}``;
    ``only="model"`` reads the model's entries alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    metadata = read_metadata(path)
    where = lambda key: metadata.planner_data.get(key, (key,)) if metadata.planner_data else (key,)  # noqa: E731
    nested: Dict[str, Any] = {}  # the saved layout, tensors empty, other entries None: DCP fills it in place
    for key, meta in metadata.state_dict_metadata.items():
        if only is not None and where(key)[0] != only:
            continue
        empty = torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
        _set_nested(nested, where(key), empty)
    with _alone():
        dcp.load(nested, storage_reader=_reader(path), planner=_load_planner(), no_dist=True)
    return nested


def saved_model_shapes(path: Path) -> Dict[str, torch.Tensor]:
    """The model entries a sharded checkpoint holds, as empty tensors of their shapes (nothing read but
    the index): to check an adapter checkpoint against the adapter being resumed."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(Path(path))
    shapes = {}
    for key, meta in metadata.state_dict_metadata.items():
        where = metadata.planner_data.get(key, (key,)) if metadata.planner_data else (key,)
        if where[0] == "model" and len(where) == 2 and isinstance(meta, TensorStorageMetadata):
            shapes[where[1]] = torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
    return shapes


def _set_nested(root: Dict[str, Any], where, value: Any) -> None:
    """Put ``value`` at the path ``where`` (dict keys and list indices), creating containers on the way."""
    node: Any = root
    for i, key in enumerate(where):
        last = i == len(where) - 1
        nxt = None if last else ([] if isinstance(where[i + 1], int) else {})
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if last:
                node[key] = value
            elif node[key] is None:
                node[key] = nxt
            node = node[key]
        else:
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, nxt)


def load_checkpoint_state(path: Path, with_optimizer: bool = True) -> Dict[str, Any]:
    """A checkpoint in the ``full`` format's layout (``model``: one process's state dict, ...), whether it is
    a ``step_N.pt`` file or a sharded ``step_N/`` directory (read whole, in this process)."""
    if Path(path).is_dir():
        return read_full_state(path, with_optimizer=with_optimizer)
    return _safe_load(path)


def load_resume_state(path: Path, mmap: bool = False) -> Dict[str, Any]:
    """What resuming from ``path`` reads first: a full checkpoint's whole state (checked), or a sharded one's
    trainer state (step, schedule, data position, config)."""
    if Path(path).is_dir():
        return read_trainer_state(path)
    from ds_hydra.training.state import load_train_state

    return load_train_state(path, mmap=mmap)


def read_full_state(path: Path, with_optimizer: bool = True) -> Dict[str, Any]:
    """A sharded checkpoint as the ``full`` format holds it (one process's state dict; the optimizer's
    parameters numbered in param-group order), read in this process: no process group, no training."""
    from ds_hydra.optim.state_format import indexed_optimizer_state
    from ds_hydra.training.state import TRAIN_STATE_FORMAT

    path = Path(path)
    trainer_state = read_trainer_state(path)
    tensors = read_sharded_state(path, only=None if with_optimizer else "model")
    if "model" not in tensors:
        raise UserError(f"{path}: a sharded checkpoint without model weights")
    full = {k: v for k, v in trainer_state.items() if k != "world_size"}
    full["format"] = TRAIN_STATE_FORMAT
    full["model"] = tensors["model"]
    if with_optimizer and tensors.get("optimizer"):
        named = tensors["optimizer"]
        full["optimizer"] = indexed_optimizer_state(named)
        full["param_names"] = [name for group in named["param_groups"] for name in group["params"]]
    full["rng"] = read_rng_state(path, 0)
    return full


def write_sharded(full_state: Dict[str, Any], named_optimizer: Dict[str, Any], target: Path) -> Path:
    """Write a one-process state (a ``full`` checkpoint's contents, its optimizer state keyed by parameter
    path) as a sharded checkpoint directory, atomically, in this process."""
    import torch.distributed.checkpoint as dcp

    from ds_hydra.training.state import atomic_torch_save

    partial = partial_path(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        keep = ("format", "model", "optimizer", "rng", "param_names")
        atomic_torch_save({"format": SHARDED_STATE_FORMAT, "world_size": 1, **{k: v for k, v in full_state.items() if k not in keep}},
                          partial / TRAINER_STATE_FILE)
        if full_state.get("rng") is not None:
            atomic_torch_save(full_state["rng"], partial / rng_file(0))
        with _alone():
            dcp.save({"model": full_state["model"], "optimizer": named_optimizer}, storage_writer=dcp.FileSystemWriter(str(partial)), no_dist=True)
        _publish(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target
