"""Schema of the ``ckpt`` config group: which blocks to recompute in backward (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class CkptConfig:
    """Activation checkpointing policy; the fields are ``checkpoint_activations``' keyword arguments."""

    segments: int = 0
    """Split the block list into this many contiguous segments and recompute them in backward (0: off)."""
    checkpoint_last: bool = False
    """Also recompute the last segment (lower memory held between forward and backward, more time)."""
    blocks: Optional[str] = None
    """Dotted path of the block list (e.g. ``transformer.h``); null finds the longest ModuleList."""


def validate_ckpt(cfg, n_blocks: Optional[int], prefix: str = "ckpt") -> List[str]:
    problems = []
    if cfg.segments < 0:
        problems.append(f"{prefix}.segments={cfg.segments}: must be >= 0 (0 disables checkpointing)")
    elif n_blocks is not None and cfg.segments > n_blocks:
        problems.append(
            f"{prefix}.segments={cfg.segments}: must be 0..{n_blocks} (the model has {n_blocks} blocks)"
        )
    return problems
