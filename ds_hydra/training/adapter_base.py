"""``<run dir>/base_model.pt``: the frozen base of an adapter run whose base no file holds as it trains (a
random initialisation, ``trainer.init_from``'s weights; ``ds_hydra.models.adapters.base_in_run_dir``),
written once when the run starts and read back on resume and by the loaders of the trained run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch.nn as nn


BASE_FILE = "base_model.pt"


def save_base(state: Dict[str, Any], run_dir: Path) -> Path:
    """Write the frozen base weights (the model's state dict before quantization and adapters), atomically."""
    from ds_hydra.training.state import atomic_torch_save

    path = Path(run_dir) / BASE_FILE
    atomic_torch_save({"model": state}, path)
    return path


def load_base(model: nn.Module, run_dir: Path) -> None:
    """Load ``<run_dir>/base_model.pt`` into the base ``model`` (weights-only load; names and shapes must fit)."""
    from ds_hydra.training import state as state_io

    path = Path(run_dir) / BASE_FILE
    saved = state_io.safe_torch_load(path)
    state_io.load_checked_weights(model, saved.get("model") if isinstance(saved, dict) else None, str(path), "base model file")
