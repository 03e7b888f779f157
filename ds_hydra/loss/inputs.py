"""What a model is called with: a batch's inputs, without its labels."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

# Batch keys the model takes besides input_ids (packed rows: positions restarting at 0 per example).
MODEL_KEYS = ("position_ids",)


def run_model(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Any:
    """``model(input_ids)`` (the model contract), plus ``position_ids=`` for packed rows, whose positions
    restart at 0 at each example: the built-in GPT and Hugging Face models then attend within an example
    only (``ds_hydra.models.packing`` says which models do)."""
    extra = {key: batch[key] for key in MODEL_KEYS if key in batch}
    return model(batch["input_ids"], **extra)
