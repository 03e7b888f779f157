"""The frozen base of an adapter run whose base no file holds as it trains (a random initialisation,
``trainer.init_from``'s weights; ``ds_hydra.models.adapters.base_in_run_dir``), kept in the run directory,
written once when the run starts and read back on resume and by the loaders of the trained run.

Two forms:

* ``<run dir>/base_model/``: a model directory (safetensors, one file per block, transformers' index and
  ``config.json``), written by a QLoRA run (``model.quantize``) of a transformers model initialised from
  ``model.config``: each block is written as it is initialised, before it is quantized, so the base is
  never whole in memory (``ds_hydra.models.quantized_load``), and read back the same way. It is written
  into ``base_model.partial/`` while the model is built and renamed when the run starts.
* ``<run dir>/base_model.pt``: the state dict, written from the built model (every other adapter run).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch.nn as nn

BASE_FILE = "base_model.pt"
BASE_DIR = "base_model"
STAGING_DIR = "base_model.partial"


def kept_base(run_dir: Path, writes: bool):
    """How ``build_model`` gets a QLoRA base this run directory keeps (``ds_hydra.models.build.KeptBase``):
    read from ``base_model/`` where a first start wrote it; else initialised, and written into the staging
    folder by the rank that ``writes``. None where the run keeps it in ``base_model.pt`` (an older run)."""
    from ds_hydra.models.build import KeptBase

    run_dir = Path(run_dir)
    if (run_dir / BASE_DIR).is_dir():
        return KeptBase(read_from=run_dir / BASE_DIR)
    if (run_dir / BASE_FILE).is_file():
        return None
    if not writes:
        return KeptBase()
    from ds_hydra.models.quantized_load import BaseShards

    staging = run_dir / STAGING_DIR
    if staging.exists():  # left by a start that failed before the run began
        shutil.rmtree(staging)
    return KeptBase(write_to=BaseShards(staging))


def publish_base(writer, run_dir: Path) -> Path:
    """Rename the written staging folder to ``<run dir>/base_model`` (one rename: a reader sees all or none)."""
    from ds_hydra.common.files import fsync_dir

    final = Path(run_dir) / BASE_DIR
    writer.folder.rename(final)
    fsync_dir(Path(run_dir))
    return final


def discard_staging(run_dir: Path) -> None:
    """Remove a staging folder the model build started and did not use (the base was built whole instead)."""
    shutil.rmtree(Path(run_dir) / STAGING_DIR, ignore_errors=True)


def has_base(run_dir: Path) -> Optional[Path]:
    """The run directory's kept base (folder or file), or None."""
    for path in (Path(run_dir) / BASE_DIR, Path(run_dir) / BASE_FILE):
        if path.exists():
            return path
    return None


def save_base(state: Dict[str, Any], run_dir: Path) -> Path:
    """Write the frozen base weights (the model's state dict before quantization and adapters), atomically."""
    from ds_hydra.training.state import atomic_torch_save

    path = Path(run_dir) / BASE_FILE
    atomic_torch_save({"model": state}, path)
    return path


def load_base(model: nn.Module, run_dir: Path) -> None:
    """Load the run's kept base into the base ``model`` built whole (names and shapes must fit): the
    ``base_model/`` folder's safetensors, else ``base_model.pt`` (weights-only load)."""
    from ds_hydra.training import state as state_io

    folder = Path(run_dir) / BASE_DIR
    if folder.is_dir():
        from safetensors.torch import load_file

        from ds_hydra.models.quantized_load import safetensors_names

        state: Dict[str, Any] = {}
        for file in sorted(set(safetensors_names(folder).values())):
            state.update(load_file(str(file)))
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # written once, under the name they tie to
        own = model.state_dict()
        state.update({name: own[name] for name in tied if name in own and name not in state})
        state_io.load_checked_weights(model, state, str(folder), "base model folder")
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
        return
    path = Path(run_dir) / BASE_FILE
    saved = state_io.safe_torch_load(path)
    state_io.load_checked_weights(model, saved.get("model") if isinstance(saved, dict) else None, str(path), "base model file")
