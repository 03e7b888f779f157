"""Turn a device option (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a ``torch.device``."""
from __future__ import annotations

import torch

from ds_hydra.errors import UserError


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one names ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name}: CUDA is not available on this machine (use auto or cpu)")
    return device
