"""Schema of the ``ckpt`` config group: which blocks recompute their activations in backward (torch-free).

The fields are the keyword arguments of ``ds_hydra.checkpoint_activations(model, **ckpt)``, so
``python -m ds_hydra ckpt.segments=4`` and ``checkpoint_activations(model, segments=4)`` do the same.
At most one of the block-choosing policies is set (``segments``/``number_checkpoints``, ``full``,
``every_n``, ``memory_budget``); ``selective`` and ``offload`` combine with any of them.

DeepSpeed's ``activation_checkpointing`` keys are accepted with their meaning without tensor parallelism,
so that section of a DeepSpeed JSON config can be passed as it is. They also configure
``ds_hydra.checkpointing`` (DeepSpeed's checkpointing module surface) for models that call it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Union

# The policies that choose which blocks to recompute; at most one may be set.
BLOCK_POLICIES = ("segments", "number_checkpoints", "full", "every_n", "memory_budget")

# What a block of a transformer typically saves for backward, in units of its input's bytes (measured
# for GPT blocks: 18x without dropout, up to 30x with dropout masks and attention weights).
TYPICAL_BLOCK_SAVE_RATIO = 18.0

# ``memory_budget: auto`` (ckpt=auto): fitted to trainer.memory_limit before the run (ds_hydra.training.memory_fit).
AUTO_BUDGET = "auto"

# What ``selective`` keeps when ``save_ops`` is null.
DEFAULT_SAVE_OPS = ("matmul", "attention")


@dataclass
class CkptConfig:
    """Activation checkpointing policy; every field is a keyword argument of ``checkpoint_activations``."""

    segments: int = 0
    """Split the block list into this many contiguous segments and recompute them in backward (0: off).
    With ``checkpoint_last=false`` the last segment is not recomputed (what torch's
    checkpoint_sequential does): same step peak, less recompute. ``segments=1`` recomputes the whole
    block list as one segment (leaving its only segment alone would checkpoint nothing).
    ``segments`` = number of blocks is per-block checkpointing."""
    checkpoint_last: bool = False
    """With ``segments``: recompute the last segment too (what DeepSpeed's pipeline does). Lowers only
    the bytes held between forward and backward (H + K*b instead of H + (K-1)*b + last segment)."""
    full: bool = False
    """Recompute every block in backward, each on its own (per-block checkpointing)."""
    every_n: int = 0
    """Recompute every n-th block (blocks n-1, 2n-1, ...); 1 is ``full``; 0: off."""
    selective: bool = False
    """Per-op selective recompute inside checkpointed blocks: the outputs of ``save_ops`` are kept, the
    rest (pointwise ops, norms, dropout) recomputed. Alone it applies to every block."""
    save_ops: Optional[List[str]] = None
    """Ops whose outputs ``selective`` keeps: aliases ``matmul`` (mm, addmm, bmm, baddbmm) and
    ``attention`` (the fused scaled-dot-product kernels), or aten names (``aten.mm``,
    ``aten.mm.default``). Every name given must match an op the checkpointed blocks run. null: matmul
    and attention, attention only where a fused kernel runs (on CPU with dropout SDPA is plain matmuls)."""
    offload: bool = False
    """Keep saved activations in pinned host memory on CUDA (torch.autograd.graph.save_on_cpu); combines
    with the other policies. On CPU it does nothing (and says so once)."""
    memory_budget: Optional[str] = None
    """Bytes the saved-for-backward activations may take (``8GiB``, ``500MB``, ``123456789``, or ``40%``
    of what the model saves without checkpointing), or ``auto`` (``ckpt=auto``): the largest budget with
    which the whole step fits trainer.memory_limit, so the least recompute that fits (resolved to bytes
    before the run starts and written into config_resolved.yaml). A probe forward measures every block for the real
    batch shape; the plan recomputes the fewest blocks fully, then the fewest selectively, that fit."""
    blocks: Optional[str] = None
    """Dotted path of the block list (``transformer.h``, ``layer3``); null: the longest ModuleList or
    Sequential of same-type modules found in the model."""
    use_reentrant: bool = False
    """torch's older reentrant checkpoint (no keyword arguments to blocks, no ``selective``)."""
    preserve_rng_state: bool = True
    """Replay the RNG state on recompute so dropout masks match (gradients equal the un-checkpointed ones)."""
    number_checkpoints: Optional[int] = None
    """DeepSpeed's name for ``segments``."""
    cpu_checkpointing: bool = False
    """DeepSpeed's name for ``offload``."""
    synchronize_checkpoint_boundary: bool = False
    """DeepSpeed: synchronize the CUDA device before and after each checkpointed segment, in forward and in
    recompute (no-op on CPU); also for the model's own ``ds_hydra.checkpointing.checkpoint`` calls."""
    profile: bool = False
    """DeepSpeed: log every step's forward and recompute time of each checkpointed segment (and of the
    model's own ``ds_hydra.checkpointing.checkpoint`` calls)."""
    partition_activations: bool = False
    """DeepSpeed: split checkpointed activations across tensor-parallel ranks. Without tensor parallelism
    DeepSpeed keeps each input whole, and so does ds_hydra: accepted, logged, no effect."""
    contiguous_memory_optimization: bool = False
    """DeepSpeed: copy partitioned activations into one preallocated buffer; nothing is partitioned without
    tensor parallelism: accepted, logged, no effect."""


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_budget(value: Union[str, int, float, None], key: str = "ckpt.memory_budget"):
    """``"8GiB"`` -> ("bytes", 8589934592); ``"40%"`` -> ("fraction", 0.4); None -> None.

    Raises ValueError with one line naming ``key`` and the allowed forms.
    """
    if value is None:
        return None
    allowed = "allowed: a byte count (123456789), a size with a unit (500MB, 8GiB) or a percentage (40%)"
    if isinstance(value, bool):
        raise ValueError(f"{key}={value}: {allowed}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{key}={value}: must be > 0; {allowed}")
        return ("bytes", int(value))
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*|%)", text)
    if not match:
        raise ValueError(f"{key}={value}: {allowed}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise ValueError(f"{key}={value}: a percentage must be in (0, 100]")
        return ("fraction", number / 100.0)
    if unit not in _UNITS:
        raise ValueError(f"{key}={value}: unknown unit {match.group(2)!r}; {allowed}")
    if number <= 0:
        raise ValueError(f"{key}={value}: must be > 0; {allowed}")
    return ("bytes", int(number * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as allocators report)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def effective_segments(cfg) -> int:
    """``segments``, or DeepSpeed's ``number_checkpoints`` when that is the one given."""
    if cfg.number_checkpoints not in (None, 0) and not cfg.segments:
        return int(cfg.number_checkpoints)
    return int(cfg.segments)


def validate_ckpt(cfg, n_blocks: Optional[int], prefix: str = "ckpt") -> List[str]:
    """Every problem of a ``ckpt`` config, one line each; ``n_blocks`` is the model's block count if known."""
    problems: List[str] = []
    n_text = f" (the model has {n_blocks} blocks)" if n_blocks is not None else ""
    upper = n_blocks if n_blocks is not None else "n_blocks"

    for key in ("segments", "number_checkpoints", "every_n"):
        value = getattr(cfg, key)
        if value is None:
            continue
        if value < 0 or (n_blocks is not None and value > n_blocks):
            problems.append(f"{prefix}.{key}={value}: must be 0..{upper}{n_text}; 0 disables it")
    if cfg.segments and cfg.number_checkpoints and cfg.segments != cfg.number_checkpoints:
        problems.append(
            f"{prefix}.number_checkpoints={cfg.number_checkpoints}: is DeepSpeed's name for {prefix}.segments, "
            f"which is {cfg.segments}; set one of them"
        )
    segments = effective_segments(cfg) if not problems else 0
    if cfg.checkpoint_last and not segments:
        problems.append(f"{prefix}.checkpoint_last=true: applies only with {prefix}.segments=K (K >= 1)")

    budget = None
    try:
        if cfg.memory_budget != AUTO_BUDGET:  # resolved to bytes before the run (ds_hydra.training.memory_fit)
            budget = parse_budget(cfg.memory_budget, key=f"{prefix}.memory_budget")
    except ValueError as exc:
        problems.append(str(exc))

    chosen = [
        name for name, on in (
            ("segments" if cfg.segments else "number_checkpoints", bool(segments)),
            ("full", bool(cfg.full)),
            ("every_n", bool(cfg.every_n)),
            ("memory_budget", budget is not None or cfg.memory_budget is not None),
        ) if on
    ]
    if len(chosen) > 1:
        problems.append(
            f"{prefix}: {', '.join(prefix + '.' + c for c in chosen)} each choose the recomputed blocks; set one "
            f"({prefix}.selective and {prefix}.offload combine with any of them)"
        )

    if cfg.selective:
        if cfg.save_ops is not None and len(cfg.save_ops) == 0:
            problems.append(f"{prefix}.save_ops=[]: selective checkpointing needs ops to keep (e.g. [matmul, attention])")
        if cfg.use_reentrant:
            problems.append(f"{prefix}.selective=true: needs the non-reentrant checkpoint; set {prefix}.use_reentrant=false")
    return problems


def deepspeed_key_notes(cfg) -> List[str]:
    """One line for each DeepSpeed key that is set and does nothing in this run, saying why (logged, not
    refused: DeepSpeed accepts them too and, without tensor parallelism, does nothing with them either)."""
    notes = []
    if cfg.partition_activations:
        notes.append(
            "ckpt.partition_activations=true: DeepSpeed splits each checkpoint's inputs across the tensor-parallel "
            "ranks; with none (a tensor-parallel size of 1, as here) every rank keeps its whole input, as in DeepSpeed: "
            "no effect (ckpt.cpu_checkpointing=true moves them to host memory instead)"
        )
    if cfg.contiguous_memory_optimization:
        notes.append(
            "ckpt.contiguous_memory_optimization=true: DeepSpeed copies partitioned checkpoint inputs into one "
            "preallocated buffer; without tensor parallelism nothing is partitioned: no effect"
        )
    for key in ("profile", "synchronize_checkpoint_boundary"):
        if getattr(cfg, key) and not recomputes_blocks(cfg):
            notes.append(
                f"ckpt.{key}=true: no block policy is set, so it applies to the model's own "
                f"ds_hydra.checkpointing.checkpoint calls only (add ckpt.segments=K, ckpt.full=true, ... for ds_hydra's)"
            )
    return notes


def recomputes_blocks(cfg) -> bool:
    """Whether a policy chooses blocks to recompute."""
    return bool(effective_segments(cfg) or cfg.full or cfg.every_n or cfg.selective or cfg.memory_budget is not None)


def any_policy(cfg) -> bool:
    """Whether the config asks for anything at all (False: the model is left untouched)."""
    return recomputes_blocks(cfg) or bool(cfg.offload or cfg.cpu_checkpointing)
