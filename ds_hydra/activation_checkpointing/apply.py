"""``checkpoint_activations(model, **ckpt)``: recompute chosen blocks in backward instead of storing
their activations; ``remove_activation_checkpointing(model)`` undoes it.

The model is changed in place and keeps its module tree: each checkpointed block's class is swapped
for a subclass whose ``forward`` runs the original one under ``torch.utils.checkpoint`` (non-reentrant,
RNG state replayed), so parameter names and state_dict keys do not change, and ``block.compile()``
still compiles each block. A region of several blocks (``segments=K`` with K < L) is run by its first
block, which calls the others (their hooks fire there); when the parent then calls them, they hand
back the outputs already computed, after checking that the parent called them in order with the
previous block's output (the sequential contract of checkpoint_sequential and DeepSpeed, checked
rather than assumed). Hooks of those later blocks therefore fire twice per forward. Without grad (evaluation,
generation) every block runs its own forward as if nothing had changed.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torch.utils._pytree import tree_leaves

from ds_hydra.activation_checkpointing.blocks import find_blocks, original_class
from ds_hydra.activation_checkpointing.config import (
    TYPICAL_BLOCK_SAVE_RATIO,
    CkptConfig,
    deepspeed_key_notes,
    format_bytes,
    map_ckpt,
)
from ds_hydra.activation_checkpointing.counter import note_kept
from ds_hydra.activation_checkpointing.measure import (
    ActivationProfile,
    probe,
    restore_buffers,
    running_stat_buffers,
)
from ds_hydra.activation_checkpointing.offload import OffloadHooks
from ds_hydra.activation_checkpointing.policies import (
    Checkpointing,
    MemoryBudget,
    Region,
    Segments,
    describe_regions,
    from_config,
)
from ds_hydra.activation_checkpointing.rng import replaying_tracker
from ds_hydra.activation_checkpointing.selective import (
    OpRecorder,
    SaveOps,
    check_matched,
    make_context_fn,
    require_selective,
    selective_available,
)
from ds_hydra.errors import ConfigError, UserError
from ds_hydra.models.contract import leading_tensor

log = logging.getLogger(__name__)

STATE_ATTR = "_ds_hydra_checkpointing"  # on the model: its CheckpointingState
ROLE_ATTR = "_ds_hydra_ckpt_role"  # on each checkpointed block: its place in a region

__all__ = ["checkpoint_activations", "remove_activation_checkpointing", "find_blocks", "CheckpointingState", "plan_checkpointing"]


# -- the swapped classes --------------------------------------------------------------------------------
def _checkpointed_forward(self, *args, **kwargs):
    return getattr(self, ROLE_ATTR)(self, args, kwargs)


_SUBCLASSES: Dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "forward": _checkpointed_forward,
            "_ds_hydra_original_class": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        })
        _SUBCLASSES[cls] = sub
    return sub


def _original_forward(block: nn.Module):
    return functools.partial(original_class(block).forward, block)


def _hidden(output, where: str):
    """The part of a block's output the next block takes: the tensor, or the first item of a tuple."""
    hidden = leading_tensor(output)
    if hidden is not None:
        return hidden
    raise UserError(
        f"ckpt.segments: {where} returned {type(output).__name__}, and a segment of several blocks passes each "
        f"block's output (a tensor, or the first item of a tuple) to the next; use per-block checkpointing "
        f"(ckpt.full=true or ckpt.segments=<number of blocks>) for such blocks"
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (objects without a usable ==)
        return a is b


class _Pending:
    """Outputs of a multi-block region, handed out as the parent calls the region's later blocks."""

    def __init__(self, outputs, args, kwargs):
        self.outputs = outputs
        self.extra_args = args[1:]
        self.kwargs = kwargs
        self.next = 1


class _Runner:
    """Runs one checkpointed region (``state.regions[index]``)."""

    def __init__(self, state: "CheckpointingState", index: int, region: Region, blocks: List[nn.Module]):
        self.state = state
        self.index = index
        self.region = region
        self.blocks = blocks
        self.pending: Optional[_Pending] = None
        self.in_forward = False
        self.inside = False  # running a later block of the region from within the region
        self.norm_buffers = running_stat_buffers(blocks)
        self.context_fn = make_context_fn(state.save_ops, state.recorder) if region.selective else None

    # the region's blocks, run as the parent would: each takes the previous one's output
    def _run(self, *args, **kwargs):
        if _compiling():  # traced code keeps no Python state; compiled graphs run the model's calls as traced
            return self._run_blocks(*args, **kwargs)
        _REGIONS_RUNNING.depth = getattr(_REGIONS_RUNNING, "depth", 0) + 1
        try:
            return self._run_blocks(*args, **kwargs)
        finally:
            _REGIONS_RUNNING.depth -= 1

    def _run_blocks(self, *args, **kwargs):
        if self.region.size == 1:
            return _original_forward(self.blocks[0])(*args, **kwargs)
        outputs = []
        for j, block in enumerate(self.blocks):
            if j == 0:  # its hooks ran when the parent called it
                out = _original_forward(block)(*args, **kwargs)
            else:  # through the module call, so its hooks (e.g. FSDP's unshard) run where it computes
                self.inside = True
                try:
                    out = block(*args, **kwargs)
                finally:
                    self.inside = False
            outputs.append(out)
            args = (_hidden(out, f"block {self.region.start + j}"), *args[1:])
        return tuple(outputs)

    def _timed_run(self, *args, **kwargs):
        state, recompute = self.state, not self.in_forward
        sync = state.synchronize and _on_cuda(args)
        if recompute and self.norm_buffers:
            restoring = restore_buffers(self.norm_buffers)  # running stats were updated in forward already
        else:
            restoring = None
        if sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            if restoring is None:
                return self._run(*args, **kwargs)
            with restoring:
                return self._run(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            if state.profile:
                state.record(self.index, "recompute" if recompute else "forward", time.perf_counter() - started)

    def first(self, block: nn.Module, args, kwargs):
        """The parent called the region's first block: run the whole region under checkpoint."""
        if not torch.is_grad_enabled():
            return _original_forward(block)(*args, **kwargs)
        state = self.state
        if self.region.size > 1 and not (args and isinstance(args[0], torch.Tensor)):
            raise UserError(
                f"ckpt.segments: block {self.region.start} got its input as a keyword argument, and a segment of several "
                f"blocks passes each block's output to the next as the first positional argument; use per-block "
                f"checkpointing (ckpt.full=true, ckpt.every_n or ckpt.segments=<number of blocks>)"
            )
        run = self._timed_run if (state.profile or state.synchronize or self.norm_buffers) else self._run
        run = replaying_tracker(run)  # named RNG states (model-parallel dropout) replay too
        self.in_forward = True
        try:
            if state.use_reentrant:
                if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(kwargs)):
                    raise UserError(
                        f"ckpt.use_reentrant=true: block {self.region.start} gets a keyword tensor that needs a gradient, "
                        f"which the reentrant checkpoint cannot pass; use ckpt.use_reentrant=false"
                    )
                outputs = checkpoint(functools.partial(run, **kwargs), *args, use_reentrant=True,
                                     preserve_rng_state=state.preserve_rng_state)
            else:
                extra = {"context_fn": self.context_fn} if self.context_fn is not None else {}
                outputs = checkpoint(functools.partial(run, **kwargs), *args, use_reentrant=False,
                                     preserve_rng_state=state.preserve_rng_state, **extra)
        finally:
            self.in_forward = False
        # the region keeps its inputs for the recompute: positional ones through the saved-tensor hooks
        # (torch >= 2.5; a counter has seen them already) or a closure (older torch), keyword ones (masks,
        # rotary tables) in the closure that runs the region again
        note_kept((args, kwargs))
        if self.region.selective:
            state.selective_region_ran(self.index)
        if self.region.size == 1:
            return outputs
        self.pending = _Pending(outputs, args, kwargs)
        return outputs[0]

    def later(self, position: int, block: nn.Module, args, kwargs):
        """The parent called a later block of the region: hand it the output computed with the region."""
        if self.inside or not torch.is_grad_enabled():
            return _original_forward(block)(*args, **kwargs)
        index = self.region.start + position
        pending = self.pending
        if pending is None or pending.next != position:
            raise UserError(
                f"ckpt.segments: block {index} was called before block {index - 1} of its segment; segments of "
                f"several blocks need the parent to call the blocks in order; use per-block checkpointing "
                f"(ckpt.full=true) for this model"
            )
        expected = _hidden(pending.outputs[position - 1], f"block {index - 1}")
        same_input = bool(args) and args[0] is expected
        same_rest = (
            len(args[1:]) == len(pending.extra_args)
            and all(_same(a, b) for a, b in zip(args[1:], pending.extra_args))
            and pending.kwargs.keys() == kwargs.keys()
            and all(_same(kwargs[k], pending.kwargs[k]) for k in kwargs)
        )
        if not (same_input and same_rest):
            self.pending = None
            what = "the previous block's output" if not same_input else "the same other arguments as the segment's first block"
            raise UserError(
                f"ckpt.segments: block {index} was not called with {what}, so its segment cannot run it ahead of "
                f"time; use per-block checkpointing (ckpt.full=true, ckpt.every_n or ckpt.segments=<number of blocks>)"
            )
        out = pending.outputs[position]
        pending.next += 1
        if pending.next == self.region.size:
            self.pending = None  # release the outputs: the parent holds what it still needs
        return out


# Regions being run (forward or recompute) on this thread: a model's own ds_hydra.checkpointing.checkpoint
# calls inside one run their function directly, since the region recomputes it already.
_REGIONS_RUNNING = threading.local()


def inside_checkpointed_region() -> bool:
    """Whether a region checkpointed by ``checkpoint_activations`` is running on this thread."""
    return getattr(_REGIONS_RUNNING, "depth", 0) > 0


_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


def _on_cuda(args) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves(args))


# -- KV caches in checkpointed calls ------------------------------------------------------------------
# A checkpointed region must be a pure function of its inputs: backward replays it. A key/value cache
# passed into a block is not: the block appends its keys and values to it, and the replay appends them
# again, so the cache doubles and per-op (selective) recompute meets ops that never ran in forward.
# Hugging Face layers get such a cache whenever the model's config has use_cache=True (the default).
# Training needs no cache, so a checkpointed block runs without one while gradients are recorded, as
# transformers' own checkpointing does; evaluation and generation (no grad) keep theirs.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_cache(value) -> bool:
    """A mutable key/value cache: transformers' ``Cache`` objects, or anything that updates and reports a length."""
    if value is None or isinstance(value, (torch.Tensor, tuple, list, dict, str, int, float, bool)):
        return False
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


def _without_caches(block: nn.Module, args, kwargs):
    """``args, kwargs`` with every KV cache replaced by None and ``use_cache`` off (logged once per class)."""
    dropped = [i for i, a in enumerate(args) if _is_cache(a)]
    keys = [k for k in CACHE_KWARGS if _is_cache(kwargs.get(k))]
    if not dropped and not keys and not kwargs.get("use_cache"):
        return args, kwargs
    if dropped:
        args = tuple(None if i in dropped else a for i, a in enumerate(args))
    kwargs = {**kwargs, **{k: None for k in keys}}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    cls = original_class(block)
    if (dropped or keys) and cls not in _WARNED_CACHE:
        _WARNED_CACHE.add(cls)
        log.info(
            "ckpt: %s gets a KV cache while training; checkpointed blocks run without it (the recompute would "
            "write it twice); set use_cache=False in the model's config to build none", cls.__name__,
        )
    return args, kwargs


_WARNED_CACHE: set = set()


class _Role:
    """What a checkpointed block does when called: run its region, or hand out its precomputed output."""

    def __init__(self, runner: _Runner, position: int):
        self.runner = runner
        self.position = position

    def __call__(self, block, args, kwargs):
        if torch.is_grad_enabled():
            args, kwargs = _without_caches(block, args, kwargs)
        if self.position == 0:
            return self.runner.first(block, args, kwargs)
        return self.runner.later(self.position, block, args, kwargs)


# -- per-model state ------------------------------------------------------------------------------------
class CheckpointingState:
    """Everything checkpointing keeps for one model: its policy, plan, profile and timing records."""

    def __init__(self, policy: Checkpointing, path: str, regions: List[Region], n_blocks: int,
                 save_ops: Optional[SaveOps], profile: Optional[ActivationProfile]):
        self.policy = policy
        self.path = path
        self.regions = regions
        self.n_blocks = n_blocks
        self.save_ops = save_ops
        self.activation_profile = profile
        self.use_reentrant = policy.options.use_reentrant
        self.preserve_rng_state = policy.options.preserve_rng_state
        self.synchronize = policy.options.synchronize
        self.profile = policy.options.profile
        self.recorder = OpRecorder() if policy.selective is not None else None
        self.offload: Optional[OffloadHooks] = None
        self.blocks: List[nn.Module] = []
        self.times: Dict[int, Dict[str, float]] = {}
        self.last_times: Dict[int, Dict[str, float]] = {}

    @property
    def checkpointed_blocks(self) -> List[int]:
        return [i for r in self.regions for i in range(r.start, r.end)]

    def selective_region_ran(self, index: int) -> None:
        recorder = self.recorder
        if recorder is None or recorder.checked:
            return
        recorder.regions_run.add(index)
        if len(recorder.regions_run) == sum(r.selective for r in self.regions):
            recorder.checked = True
            check_matched(self.save_ops, recorder.ops)

    def record(self, index: int, phase: str, seconds: float) -> None:
        self.times.setdefault(index, {})[phase] = seconds * 1e3
        if phase == "recompute" and index == 0:  # backward recomputes the first region last
            self.last_times = self.times
            self.times = {}
            parts = []
            for i, region in enumerate(self.regions):
                t = self.last_times.get(i, {})
                parts.append(
                    f"{region.describe()}: forward {t.get('forward', float('nan')):.1f} ms, "
                    f"recompute {t.get('recompute', float('nan')):.1f} ms"
                )
            log.info("ckpt.profile: %s", "; ".join(parts))


# -- the API ----------------------------------------------------------------------------------------------
def ckpt_config(ckpt: Dict[str, Any]) -> CkptConfig:
    names = [f.name for f in fields(CkptConfig)]
    unknown = sorted(set(ckpt) - set(names))
    if unknown:
        raise UserError(f"checkpoint_activations: unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    return CkptConfig(**ckpt)


@dataclass
class CheckpointPlan:
    """Which blocks a policy recomputes, and (given a batch) what they save."""

    path: str
    """Dotted path of the block list."""
    blocks: List[nn.Module]
    regions: List[Region]
    profile: Optional[ActivationProfile]
    """The probe's measurements on the example batch; None without one (unless a policy needs it)."""
    save_ops: Optional[SaveOps]
    policy: Checkpointing
    """The policy the plan is of."""


def plan_checkpointing(model: nn.Module, policy, example_input: Any = None, forward: Optional[Callable] = None,
                       measure: bool = False) -> CheckpointPlan:
    """The plan of ``policy`` (a ``Checkpointing``, or a ``CkptConfig`` of the ``ckpt`` group's keys) for
    ``model``'s blocks, without applying it.

    ``example_input``: a batch of the real shape, run through ``forward`` (default: the model itself;
    the trainer passes model plus loss, so the loss's saved tensors are measured too). The probe runs
    when a policy needs it, or always with ``measure`` (what the memory preflight asks)."""
    if isinstance(policy, Checkpointing):
        path, container = find_blocks(model, policy.options.blocks)
        problems = policy.problems(len(container))
        if problems:
            raise ConfigError(problems)
    else:  # the ckpt keys: checked against the model's block count, in their own names
        path, container = find_blocks(model, policy.blocks)
        policy = from_config(policy, n_blocks=len(container))
    blocks = list(container)
    budget = policy.block if isinstance(policy.block, MemoryBudget) else None
    if policy.selective is not None:
        require_selective()
    saves_ops = policy.saves_ops(selective_available())
    save_ops = SaveOps(policy.save_ops()) if saves_ops else None
    if budget is not None and example_input is None:
        raise UserError(
            f"ckpt.memory_budget={budget.config.budget}: the plan is measured on a batch; pass "
            f"checkpoint_activations(model, example_input=<a batch>, ...) (the trainer does)"
        )
    profile = None
    if example_input is not None and (measure or policy.recomputes_blocks):
        profile = probe(model, blocks, example_input, save_ops, forward=forward)
        if policy.selective is not None:
            check_matched(save_ops, profile.ops)
    regions = policy.regions(len(blocks), profile, saves_ops=save_ops is not None)
    return CheckpointPlan(path, blocks, regions, profile, save_ops, policy)


def checkpoint_activations(model: nn.Module, example_input: Any = None, forward: Optional[Callable] = None,
                           policy=None, **ckpt) -> nn.Module:
    """Apply an activation-checkpointing policy to ``model`` in place and return it: either the
    ``ckpt`` group's keys as keyword arguments (the fields of ``CkptConfig``: ``segments=4``,
    ``full=True``, ...), or ``policy``: policy objects (``Segments(segments=4)``, ``[Full(), Selective()]``)
    or a whole ``Checkpointing``. ``example_input``: a batch of the real shape (a tensor, a tuple of
    arguments, a dict of keyword arguments, or a callable returning one); ``memory_budget`` needs it,
    and with it the plan's memory is measured and logged. ``forward`` runs the example (default: the
    model; the trainer passes model plus loss, so the plan counts the loss's memory too). Applying
    again replaces the previous plan; with every policy off the model is left untouched."""
    remove_activation_checkpointing(model)
    if policy is not None:
        if ckpt:
            raise UserError(
                f"checkpoint_activations: pass policy objects or the ckpt keywords, not both (got policy={policy!r} "
                f"and {', '.join(sorted(ckpt))})"
            )
        policy = Checkpointing.of(policy)
        asked = policy.any
    else:
        policy = ckpt_config(ckpt)
        configs, problems = map_ckpt(policy)
        for note in deepspeed_key_notes(policy):
            log.info(note)
        asked = configs.any
        if not asked and problems:  # e.g. profile=true with nothing to profile
            raise ConfigError(problems)
    if not asked:
        return model
    plan = plan_checkpointing(model, policy, example_input, forward=forward)
    policy, path, blocks, regions, save_ops, profile = plan.policy, plan.path, plan.blocks, plan.regions, plan.save_ops, plan.profile

    state = CheckpointingState(policy, path, regions, len(blocks), save_ops, profile)
    if profile is not None and state.recorder is not None:
        state.recorder.checked = True
    for index, region in enumerate(regions):
        members = blocks[region.start:region.end]
        runner = _Runner(state, index, region, members)
        for position, block in enumerate(members):
            if "forward" in block.__dict__:
                raise UserError(
                    f"ckpt: block {region.start + position} of {path} has its forward replaced on the instance; "
                    f"checkpointing needs the class's forward"
                )
            setattr(block, ROLE_ATTR, _Role(runner, position))
            block.__class__ = _checkpointed_class(type(block))
            state.blocks.append(block)
    if policy.offload is not None:
        state.offload = OffloadHooks(model)
    model.__dict__[STATE_ATTR] = state
    _log_plan(state, path, blocks)
    return model


def _log_plan(state: CheckpointingState, path: str, blocks: Sequence[nn.Module]) -> None:
    n = len(blocks)
    kind = original_class(blocks[0]).__name__
    line = f"activation checkpointing: {path} ({n} x {kind}): {describe_regions(state.regions, n)}"
    if state.offload is not None:
        line += "; saved activations offloaded to host memory on CUDA"
    profile, block = state.activation_profile, state.policy.block
    if profile is not None:  # measured bytes; the step's peak is the memory estimate's (ds_hydra.training.memory_estimate)
        none = profile.kept_bytes([])
        kept = profile.kept_bytes(state.regions)
        line += (
            f"; kept for backward {format_bytes(kept)} (none: {format_bytes(none)}, {kept / max(none, 1):.2f}x); "
            f"{profile.describe()}"
        )
        if isinstance(block, MemoryBudget):
            line += f"; budget {format_bytes(block.limit(profile))}"
    log.info(line)
    if isinstance(block, Segments):
        ratio = profile.A / max(profile.b, 1) if profile is not None else TYPICAL_BLOCK_SAVE_RATIO
        advice = block.advice(n, ratio)
        if advice:
            assumed = "" if profile is not None else f" (A/b assumed {ratio:.0f}; pass example_input to measure it)"
            log.info("%s%s", advice, assumed)


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Undo ``checkpoint_activations`` in place (blocks get their classes back); returns the model."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None and state.offload is not None:
        state.offload.remove()
    for module in model.modules():
        if ROLE_ATTR in module.__dict__:
            del module.__dict__[ROLE_ATTR]
            module.__class__ = original_class(module)
    return model


def checkpointing_state(model: nn.Module) -> Optional[CheckpointingState]:
    """The model's checkpointing state (plan, profile, timings), or None."""
    return model.__dict__.get(STATE_ATTR)
