"""Schema of the ``ckpt`` config group, and the one mapping of its keys to policies (torch-free).

The fields are the keyword arguments of ``ds_hydra.checkpoint_activations(model, **ckpt)``, so
``python -m ds_hydra ckpt.segments=4`` and ``checkpoint_activations(model, segments=4)`` do the same.
``map_ckpt`` turns them into the small config of each policy class
(``ds_hydra.activation_checkpointing.policies``): at most one block-choosing policy (``SegmentsConfig``,
``FullConfig``, ``EveryNConfig``, ``MemoryBudgetConfig``), plus the modifiers that combine with any of
them (``SelectiveConfig``, ``OffloadConfig``) and the options of every checkpointed region
(``RunOptions``). Which key wins, and which keys conflict, is decided there and nowhere else.

DeepSpeed's ``activation_checkpointing`` keys are fields too (``ds_hydra.deepspeed.activation_checkpointing_config``
declares them and says what each means here), so that section of a DeepSpeed JSON config can be passed as it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

from ds_hydra.deepspeed import activation_checkpointing_config as deepspeed_keys
from ds_hydra.deepspeed.activation_checkpointing_config import DeepSpeedCheckpointingKeys

# What a block of a transformer typically saves for backward, in units of its input's bytes (measured
# for GPT blocks: 18x without dropout, up to 30x with dropout masks and attention weights).
TYPICAL_BLOCK_SAVE_RATIO = 18.0

# ``memory_budget: auto`` (ckpt=auto): fitted to trainer.memory_limit before the run (ds_hydra.training.memory_fit).
AUTO_BUDGET = "auto"

# What ``selective`` keeps when ``save_ops`` is null.
DEFAULT_SAVE_OPS = ("matmul", "attention")


@dataclass
class CkptPolicyKeys:
    """ds_hydra's own keys of the ``ckpt`` group (the first fields of ``CkptConfig``)."""

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


@dataclass
class CkptConfig(DeepSpeedCheckpointingKeys, CkptPolicyKeys):
    """Activation checkpointing policy; every field is a keyword argument of ``checkpoint_activations``."""


# -- the policies' own configs (what ``map_ckpt`` makes of the keys) ------------------------------------
@dataclass(frozen=True)
class SegmentsConfig:
    """``Segments``: contiguous segments of blocks, each recomputed as one region."""

    segments: int
    """K, 1..number of blocks; K = number of blocks is per-block checkpointing."""
    checkpoint_last: bool = False
    """Recompute the last segment too (K = 1 always recomputes its only segment)."""


@dataclass(frozen=True)
class FullConfig:
    """``Full``: every block recomputed on its own."""


@dataclass(frozen=True)
class EveryNConfig:
    """``EveryN``: blocks n-1, 2n-1, ... recomputed on their own."""

    n: int
    """1..number of blocks; 1 is ``Full``."""


@dataclass(frozen=True)
class MemoryBudgetConfig:
    """``MemoryBudget``: the fewest recomputed blocks whose saved activations fit a budget."""

    budget: Union[int, str]
    """Bytes (123456789), a size (``8GiB``, ``500MB``), a share of the un-checkpointed bytes (``40%``), or
    ``auto`` (fitted to the step's memory limit by a run before it starts)."""
    save_ops: Optional[Tuple[str, ...]] = None
    """What a block the plan recomputes selectively keeps (null: ``DEFAULT_SAVE_OPS``)."""

    def parsed(self):
        """("bytes", n) or ("fraction", f); a ValueError names the key for a budget of no known form."""
        return parse_budget(self.budget)


@dataclass(frozen=True)
class SelectiveConfig:
    """``Selective``: inside each recomputed block, keep the outputs of ``save_ops`` and recompute the rest."""

    save_ops: Optional[Tuple[str, ...]] = None
    """Op aliases or aten names; null: ``DEFAULT_SAVE_OPS``."""


@dataclass(frozen=True)
class OffloadConfig:
    """``Offload``: saved activations wait for backward in pinned host memory (CUDA)."""


@dataclass(frozen=True)
class RunOptions:
    """How every checkpointed region runs, whatever the policy."""

    blocks: Optional[str] = None
    """Dotted path of the block list; None: found in the model."""
    use_reentrant: bool = False
    """torch's reentrant checkpoint (no keyword tensors that need gradients, no ``Selective``)."""
    preserve_rng_state: bool = True
    """Replay the RNG state on recompute, so dropout masks match."""
    synchronize: bool = False
    """Synchronize the CUDA device around each region's forward and recompute."""
    profile: bool = False
    """Log each region's forward and recompute time every step."""


BlockConfig = Union[SegmentsConfig, FullConfig, EveryNConfig, MemoryBudgetConfig]


class PolicySlots:
    """What a whole checkpointing policy answers from its slots (``block``, ``selective``, ``offload``),
    whether they hold policy configs (``PolicyConfigs``) or policy objects (``policies.Checkpointing``)."""

    block: Any
    selective: Any
    offload: Any

    @property
    def recomputes_blocks(self) -> bool:
        return self.block is not None or self.selective is not None

    @property
    def any(self) -> bool:
        """Whether anything is asked at all (False: the model is left untouched)."""
        return self.recomputes_blocks or self.offload is not None


@dataclass(frozen=True)
class PolicyConfigs(PolicySlots):
    """What one ``ckpt`` config asks for, as the configs of the policy classes."""

    block: Optional[BlockConfig] = None
    """The block-choosing policy; None: none (with ``selective`` alone every block is recomputed selectively)."""
    selective: Optional[SelectiveConfig] = None
    offload: Optional[OffloadConfig] = None
    options: RunOptions = field(default_factory=RunOptions)


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


def map_ckpt(cfg, n_blocks: Optional[int] = None, prefix: str = "ckpt") -> Tuple[PolicyConfigs, List[str]]:
    """The policy configs a ``ckpt`` config (``CkptConfig`` or its DictConfig) asks for, and every problem of
    it, one line each (an empty list: valid); ``n_blocks`` is the model's block count if known.

    At most one block-choosing policy may be set; ``selective`` and ``offload`` combine with any of them.
    With problems the configs are what the keys ask for taken in the order segments, full, every_n,
    memory_budget (callers refuse the config then)."""
    problems: List[str] = []
    n_text = f" (the model has {n_blocks} blocks)" if n_blocks is not None else ""
    upper = n_blocks if n_blocks is not None else "n_blocks"

    for key in ("segments", "number_checkpoints", "every_n"):
        value = getattr(cfg, key)
        if value is None:
            continue
        if value < 0 or (n_blocks is not None and value > n_blocks):
            problems.append(f"{prefix}.{key}={value}: must be 0..{upper}{n_text}; 0 disables it")
    deepspeed = deepspeed_keys.translate(cfg, prefix)  # number_checkpoints is segments, cpu_checkpointing offload
    problems += deepspeed.problems
    segments = deepspeed.segments if not problems else 0
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
            (deepspeed.segments_key, bool(segments)),
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

    save_ops = tuple(cfg.save_ops) if cfg.save_ops is not None else None
    block: Optional[BlockConfig] = None
    if deepspeed.segments:
        block = SegmentsConfig(deepspeed.segments, bool(cfg.checkpoint_last))
    elif cfg.full:
        block = FullConfig()
    elif cfg.every_n:
        block = EveryNConfig(int(cfg.every_n))
    elif cfg.memory_budget is not None:
        block = MemoryBudgetConfig(cfg.memory_budget, save_ops)
    configs = PolicyConfigs(
        block=block,
        selective=SelectiveConfig(save_ops) if cfg.selective else None,
        offload=OffloadConfig() if deepspeed.offload else None,
        options=RunOptions(
            blocks=cfg.blocks, use_reentrant=bool(cfg.use_reentrant), preserve_rng_state=bool(cfg.preserve_rng_state),
            synchronize=bool(cfg.synchronize_checkpoint_boundary), profile=bool(cfg.profile),
        ),
    )
    return configs, problems


def validate_ckpt(cfg, n_blocks: Optional[int], prefix: str = "ckpt") -> List[str]:
    """Every problem of a ``ckpt`` config, one line each; ``n_blocks`` is the model's block count if known."""
    return map_ckpt(cfg, n_blocks, prefix)[1]


def deepspeed_key_notes(cfg) -> List[str]:
    """One line for each DeepSpeed key that is set and does nothing in this run (logged, not refused)."""
    return deepspeed_keys.notes(cfg, map_ckpt(cfg)[0].recomputes_blocks)
