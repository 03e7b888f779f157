"""The activation-checkpointing policies: which blocks each recomputes, as a list of checkpointed regions.

One class per policy, each built from its own small config (``ds_hydra.activation_checkpointing.config``),
or from that config's fields: ``Segments(segments=4, checkpoint_last=False)``, ``Full()``, ``EveryN(n=2)``,
``MemoryBudget(budget="8GiB")`` choose the blocks; ``Selective(save_ops=...)`` and ``Offload()`` combine
with any of them. ``Checkpointing`` is one whole policy (a block policy, its modifiers and the run
options); ``from_config`` builds it from the ``ckpt`` group's keys (the mapping, with its order of
precedence, is ``config.map_ckpt``). Everything here is plain Python: the memory budget is planned on
the probe's measurements (``ds_hydra.activation_checkpointing.measure``).

A region is a run of consecutive blocks recomputed together in backward: between forward and
backward it keeps only its input (``b`` bytes), and its recompute briefly re-creates the activations
of all its blocks. With L blocks, H bytes saved outside them, A bytes saved by one block, b its
input, S the op outputs a selective block keeps, G the parameter gradients, and 2b of backward
temporaries (bench/ckpt.py measures all of them and checks these formulas):

    policy                       kept after forward           step peak
    none                         H + L*A                      H + L*A + 2b
    segments=K, checkpoint_last  H + K*b                      H + b + ceil(L/K)*A + G + 2b
    segments=K (default)         H + (K-1)*b + s_K*A          the same as with checkpoint_last
    full (= segments=L, last)    H + L*b                      H + b + A + G + 2b
    every_n=n, m = L//n          H + m*b + (L-m)*A            kept + A + b (the last block's recompute)
    selective                    H + L*(b + S)                kept + (A - b - S) + 2b

s_K is the size of the last segment. Where blocks keep most of their activations (none, every_n,
selective) the peak comes at the start of backward, before gradients replace freed activations; with
segments it comes at the first segment's recompute, when every later segment's input is freed and
almost every gradient allocated. Leaving the last segment un-recomputed does not raise that peak
(its activations are freed by its own backward before any recompute starts): it skips the last
segment's recompute at no cost in peak. Recomputing it too only lowers what is held between forward
and backward, which matters with gradient accumulation or pipelining. Minimizing K*b + ceil(L/K)*A
gives K = sqrt(L*A/b); transformer blocks save A = 16-30 b, so for L up to ~20 that is per-block
checkpointing, not sqrt(L).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Union

from ds_hydra.activation_checkpointing.config import (
    AUTO_BUDGET,
    CkptConfig,
    EveryNConfig,
    FullConfig,
    MemoryBudgetConfig,
    OffloadConfig,
    PolicyConfigs,
    PolicySlots,
    RunOptions,
    SegmentsConfig,
    SelectiveConfig,
    format_bytes,
    map_ckpt,
)
from ds_hydra.errors import ConfigError, UserError


@dataclass(frozen=True)
class Region:
    """Blocks ``start .. end-1`` run under one checkpoint; ``selective`` keeps the saved ops' outputs."""

    start: int
    end: int
    selective: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        blocks = f"block {self.start}" if self.size == 1 else f"blocks {self.start}-{self.end - 1}"
        return blocks + (" (selective)" if self.selective else "")


def segment_sizes(n_blocks: int, segments: int) -> List[int]:
    """Contiguous segment sizes differing by at most one, the larger ones first (so an un-recomputed
    last segment is a small one)."""
    q, r = divmod(n_blocks, segments)
    return [q + 1] * r + [q] * (segments - r)


def segment_regions(n_blocks: int, segments: int, checkpoint_last: bool, selective: bool = False) -> List[Region]:
    regions, start = [], 0
    for size in segment_sizes(n_blocks, segments):
        regions.append(Region(start, start + size, selective))
        start += size
    return regions if checkpoint_last else regions[:-1]


def per_block_regions(indices, selective: bool = False) -> List[Region]:
    return [Region(i, i + 1, selective) for i in indices]


def every_n_blocks(n_blocks: int, n: int) -> List[int]:
    """Every n-th block, counting from one: n-1, 2n-1, ... (a function of the index only: no shared state)."""
    return [i for i in range(n_blocks) if (i + 1) % n == 0]


def best_segment_count(n_blocks: int, block_saved: float, block_input: float) -> int:
    """K minimizing K*b + ceil(L/K)*A, near sqrt(L*A/b), clamped to 1..L."""
    if block_input <= 0:
        return n_blocks
    return min(range(1, n_blocks + 1), key=lambda k: (k * block_input + math.ceil(n_blocks / k) * block_saved, -k))


def describe_regions(regions: Sequence[Region], n_blocks: int) -> str:
    if not regions:
        return "no block recomputed"
    covered = sum(r.size for r in regions)
    parts = ", ".join(r.describe() for r in regions) if len(regions) <= 12 else (
        f"{len(regions)} regions ({sum(r.selective for r in regions)} selective)"
    )
    return f"{covered}/{n_blocks} blocks recomputed: {parts}"


# -- the policy classes ------------------------------------------------------------------------------------
class Policy:
    """A policy built from its config (``Segments(SegmentsConfig(4))``) or that config's fields
    (``Segments(segments=4)``); equal policies have equal configs."""

    Config: type = type(None)

    def __init__(self, config=None, **config_fields):
        if config is not None and config_fields:
            raise TypeError(f"{type(self).__name__}: pass a {self.Config.__name__} or its fields, not both")
        config = self.Config(**config_fields) if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__}: expected a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        problems = self.problems(None)
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self, n_blocks: Optional[int]) -> List[str]:
        """What is wrong with this policy for a model of ``n_blocks`` blocks (None: not known yet)."""
        return []

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.config == self.config

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in fields(self.config))
        return f"{type(self).__name__}({args})"


def _count_problem(policy: Policy, name: str, value: int, n_blocks: Optional[int]) -> List[str]:
    if value < 1 or (n_blocks is not None and value > n_blocks):
        upper = n_blocks if n_blocks is not None else "the number of blocks"
        return [f"{policy!r}: {name} must be 1..{upper}" + (f" (the model has {n_blocks} blocks)" if n_blocks is not None else "")]
    return []


class BlockPolicy(Policy):
    """A policy that chooses which blocks recompute in backward."""

    needs_profile = False
    """Whether ``regions`` needs the probe's measurements (an example batch)."""

    def regions(self, n_blocks: int, selective: bool = False, profile=None) -> List[Region]:
        """The checkpointed regions for ``n_blocks`` blocks; ``selective``: each keeps its saved ops' outputs."""
        raise NotImplementedError


class Segments(BlockPolicy):
    """K contiguous segments; the last one is not recomputed unless ``checkpoint_last`` (or K = 1)."""

    Config = SegmentsConfig

    def problems(self, n_blocks):
        return _count_problem(self, "segments", self.config.segments, n_blocks)

    def regions(self, n_blocks, selective=False, profile=None):
        k = self.config.segments
        # One segment is always recomputed: "leave the last one" would mean checkpointing nothing.
        return segment_regions(n_blocks, k, self.config.checkpoint_last or k == 1, selective)

    def advice(self, n_blocks: int, ratio: float) -> Optional[str]:
        """A hint when K is far from the memory-optimal K = sqrt(L*A/b) (ratio = A/b)."""
        segments = self.config.segments
        k_opt = math.sqrt(n_blocks * ratio)
        best = min(n_blocks, max(1, round(k_opt)))
        if segments == best or 0.5 <= segments / k_opt <= 2.0:
            return None
        per_block = " (per-block checkpointing)" if best == n_blocks else ""
        return (
            f"ckpt.segments={segments}: the step peak H + K*b + ceil(L/K)*A is smallest near K = sqrt(L*A/b) = "
            f"sqrt({n_blocks}*{ratio:.1f}) = {k_opt:.1f}; consider ckpt.segments={best}{per_block}"
        )


class Full(BlockPolicy):
    """Every block recomputed on its own (per-block checkpointing)."""

    Config = FullConfig

    def regions(self, n_blocks, selective=False, profile=None):
        return per_block_regions(range(n_blocks), selective)


class EveryN(BlockPolicy):
    """Blocks n-1, 2n-1, ... recomputed on their own."""

    Config = EveryNConfig

    def problems(self, n_blocks):
        return _count_problem(self, "n", self.config.n, n_blocks)

    def regions(self, n_blocks, selective=False, profile=None):
        return per_block_regions(every_n_blocks(n_blocks, self.config.n), selective)


class MemoryBudget(BlockPolicy):
    """The fewest recomputed blocks (fully, then selectively) whose saved activations fit the budget,
    planned on the probe's measurements of the real batch shape."""

    Config = MemoryBudgetConfig
    needs_profile = True

    def problems(self, n_blocks):
        if self.config.budget == AUTO_BUDGET:
            return []
        try:
            self.config.parsed()
        except ValueError as exc:
            return [str(exc)]
        return []

    def limit(self, profile) -> int:
        """The budget in bytes (a share is of what the model saves without checkpointing)."""
        if self.config.budget == AUTO_BUDGET:  # a run resolves it first (ds_hydra.training.memory_fit); a library call cannot
            raise ValueError(
                "memory_budget='auto' is fitted to trainer.memory_limit when a run starts; called directly, "
                "checkpoint_activations needs the budget itself (memory_budget='2GiB', or a percentage such as '40%')"
            )
        kind, value = self.config.parsed()
        return int(value * profile.kept_bytes([])) if kind == "fraction" else value

    def regions(self, n_blocks, selective=False, profile=None):
        """``selective``: the plan may recompute blocks selectively (the selective API is there)."""
        return plan_for_budget(profile, self.limit(profile), selective=selective)


class Selective(Policy):
    """Inside each recomputed block keep the outputs of ``save_ops`` (matmuls, attention), recompute the rest;
    with no block policy, every block."""

    Config = SelectiveConfig

    def problems(self, n_blocks):
        if self.config.save_ops is not None and len(self.config.save_ops) == 0:
            return ["Selective(save_ops=()): selective checkpointing needs ops to keep (e.g. ('matmul', 'attention'))"]
        return []


class Offload(Policy):
    """Saved activations wait for backward in pinned host memory (CUDA; nothing to do on the CPU)."""

    Config = OffloadConfig


_CLASS_OF = {cls.Config: cls for cls in (Segments, Full, EveryN, MemoryBudget, Selective, Offload)}


@dataclass(frozen=True)
class Checkpointing(PolicySlots):
    """One whole activation-checkpointing policy: a block policy, its modifiers, the run options."""

    block: Optional[BlockPolicy] = None
    selective: Optional[Selective] = None
    offload: Optional[Offload] = None
    options: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def of(cls, policies: Union["Checkpointing", Policy, Sequence[Policy]], **options) -> "Checkpointing":
        """From policy objects: ``Checkpointing.of([Full(), Selective()], blocks="transformer.h")``."""
        if isinstance(policies, Checkpointing):
            return policies if not options else cls(policies.block, policies.selective, policies.offload, RunOptions(**options))
        items = list(policies) if isinstance(policies, (list, tuple)) else [policies]
        found = {}
        for item in items:
            slot = "block" if isinstance(item, BlockPolicy) else "selective" if isinstance(item, Selective) else (
                "offload" if isinstance(item, Offload) else None)
            if slot is None:
                raise TypeError(f"checkpoint_activations: {item!r} is not a policy (Segments, Full, EveryN, MemoryBudget, Selective, Offload)")
            if slot in found:
                raise UserError(f"checkpoint_activations: {found[slot]!r} and {item!r} each choose the recomputed blocks; pass one"
                                if slot == "block" else f"checkpoint_activations: {item!r} given twice")
            found[slot] = item
        return cls(**found, options=RunOptions(**options))

    def problems(self, n_blocks: Optional[int]) -> List[str]:
        found = self.block.problems(n_blocks) if self.block is not None else []
        if self.selective is not None and self.options.use_reentrant:
            found.append("Selective: needs the non-reentrant checkpoint; use_reentrant must be false")
        return found

    def saves_ops(self, selective_available: bool) -> bool:
        """Whether the plan keeps op outputs (``Selective``, or a budget that may plan selective blocks)."""
        wants = self.selective is not None or isinstance(self.block, MemoryBudget)
        return wants and selective_available and not self.options.use_reentrant

    def save_ops(self):
        """The ``save_ops`` names of ``Selective`` or of the budget (None: the defaults)."""
        if self.selective is not None:
            return self.selective.config.save_ops
        return self.block.config.save_ops if isinstance(self.block, MemoryBudget) else None

    def regions(self, n_blocks: int, profile=None, saves_ops: bool = False) -> List[Region]:
        """The regions for ``n_blocks`` blocks (``profile``: the probe's measurements, for a budget;
        ``saves_ops``: whether the op outputs to keep are resolved, see ``saves_ops``)."""
        if self.block is None:
            return per_block_regions(range(n_blocks), True) if self.selective is not None else []
        if isinstance(self.block, MemoryBudget):
            return self.block.regions(n_blocks, selective=saves_ops, profile=profile)
        return self.block.regions(n_blocks, selective=self.selective is not None)


def from_configs(configs: PolicyConfigs) -> Checkpointing:
    """The policy objects of ``map_ckpt``'s configs."""
    build = lambda config: _CLASS_OF[type(config)](config) if config is not None else None  # noqa: E731
    return Checkpointing(build(configs.block), build(configs.selective), build(configs.offload), configs.options)


def from_config(cfg, n_blocks: Optional[int] = None, prefix: str = "ckpt") -> Checkpointing:
    """The policy a ``ckpt`` config (``CkptConfig``, its DictConfig, or a dict of its keys) asks for; a
    ConfigError lists every problem (``n_blocks``: the model's block count, if known)."""
    if isinstance(cfg, dict):
        cfg = CkptConfig(**cfg)
    configs, problems = map_ckpt(cfg, n_blocks, prefix)
    if problems:
        raise ConfigError(problems)
    return from_configs(configs)


# -- the budget planner -------------------------------------------------------------------------------
def _regions_of(modes: Sequence[Optional[str]]) -> List[Region]:
    return [Region(i, i + 1, mode == "selective") for i, mode in enumerate(modes) if mode is not None]


def plan_for_budget(profile, budget: int, selective: bool) -> List[Region]:
    """The cheapest plan whose kept bytes (``profile.kept_bytes``, the probe's exact count) fit ``budget``:
    fewest fully recomputed blocks first, then fewest selectively recomputed ones (when ``selective``),
    each chosen where it saves the most. If recomputing every block on its own does not fit, blocks are
    merged into fewer segments; if even one segment does not fit, a UserError says by how much."""
    L = profile.n_blocks
    none: List[Optional[str]] = [None] * L

    def kept(modes) -> int:
        return profile.kept_bytes(_regions_of(modes))

    if kept(none) <= budget:
        return []

    def ranked(mode: str, fixed: Sequence[Optional[str]]) -> List[int]:
        base = kept(fixed)
        gains = []
        for i in range(L):
            if fixed[i] is None:
                trial = list(fixed)
                trial[i] = mode
                gains.append((base - kept(trial), -i))
        return [-neg_i for _, neg_i in sorted(gains, reverse=True)]

    full_order = ranked("full", none)
    for m in range(L + 1):
        modes = list(none)
        for i in full_order[:m]:
            modes[i] = "full"
        filled = [mode or ("selective" if selective else None) for mode in modes]
        if kept(filled) > budget:
            continue
        if selective:
            order = ranked("selective", modes)
            for s in range(len(order) + 1):
                trial = list(modes)
                for i in order[:s]:
                    trial[i] = "selective"
                if kept(trial) <= budget:
                    return _regions_of(trial)
        return _regions_of(modes)
    for k in range(L - 1, 0, -1):  # every block recomputed and still too much: fewer, longer segments
        regions = segment_regions(L, k, checkpoint_last=True)
        if profile.kept_bytes(regions) <= budget:
            return regions
    least = profile.kept_bytes(segment_regions(L, 1, checkpoint_last=True))
    raise UserError(
        f"ckpt.memory_budget={format_bytes(budget)}: does not fit even with every block recomputed as one segment, "
        f"which keeps {format_bytes(least)} ({format_bytes(least - budget)} over; {profile.describe()}); raise the "
        f"budget, lower the batch size, or add ckpt.offload=true on CUDA"
    )
