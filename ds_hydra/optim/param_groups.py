"""Split a model's parameters into weight-decayed and non-decayed groups."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn


def build_param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Matrices (dim >= 2: linear weights, embeddings) decay; biases and norm gains (dim < 2) do not.

    Tied weights appear once (``named_parameters`` de-duplicates them). Each group records a ``name``
    so logs and schedulers can tell them apart; optimizers ignore the extra key.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
