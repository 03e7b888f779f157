"""Turn a device option (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a ``torch.device``, and a precision
option (``auto``, ``fp32``, ``bf16``, ``fp16``) into the autocast dtype it means there."""
from __future__ import annotations

from typing import Optional

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


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``trainer.precision``, or None for plain fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None
        # bf16 needs Ampere (compute capability 8) or newer; older GPUs get fp16 with loss scaling
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16: needs CUDA (use fp32 or bf16 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """fp32, bf16 or fp16: the name of an autocast dtype (None is fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
