"""Schemas of the ``optimizer`` and ``scheduler`` config groups and of ``param_groups`` (torch-free).

Each optimizer option is ``_target_: torch.optim.X`` with ``_partial_: true`` and the keyword arguments
it sets (one schema for all: the optimizer class's signature is the rest of it); instantiating it gives
a ``DeepSpeedOptimizerCallable`` that takes parameters or param groups. Each scheduler option is ``_partial_`` too and gives a ``DeepSpeedSchedulerCallable`` that
takes the optimizer. ``param_groups`` says how ds_hydra splits the model's parameters into the groups
the optimizer callable receives (weight decay on or off, lr multipliers).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from numbers import Real
from typing import Any, List, Optional

from omegaconf import II, MISSING


# -- optimizers -----------------------------------------------------------------------------------
@dataclass
class OptimizerConfig:
    """Any optimizer class as a callable over param groups: its ``_target_`` and its keyword arguments.

    Only what ds_hydra itself reads is typed here. Every other key is a keyword argument of
    ``_target_`` (``optimizer.betas=[0.9,0.95]``, ``optimizer.momentum=0.9``), bound to the class's
    signature before anything is built, so a name it does not take fails naming the key and the
    closest argument (ds_hydra.validation); what a key leaves out is the class's own default
    (``task=validate`` prints every argument with its value). On CUDA, ``fused`` and ``foreach`` left
    unset are chosen by ds_hydra (ds_hydra.optim.build.kernel_kwargs).
    """

    # Open on purpose: a key beyond these fields is not a typo to refuse at composition (not a field).
    OPEN_KEYS = "any other key is a keyword argument of _target_, bound to the class's signature"

    _target_: str = MISSING
    """The optimizer class (torch.optim, or a module listed in allowed_targets); each option names one."""
    _partial_: bool = True
    """Instantiated, the node is a callable over parameters or param groups (DeepSpeedOptimizerCallable)."""
    lr: float = 1e-3
    """Peak learning rate (schedules scale it per step; param_groups.lr_rules multiply it per group)."""
    weight_decay: float = 0.0
    """Weight decay of the decayed group (matrices); biases, norm gains and param_groups.no_decay get 0."""


# -- param groups ---------------------------------------------------------------------------------
@dataclass
class LrRule:
    """Parameters whose name matches ``pattern`` train at ``lr_mult`` times the optimizer's lr."""

    pattern: str = MISSING
    """Regular expression searched in the parameter's name (``re.search``), e.g. ``^wte\\.``."""
    lr_mult: float = 1.0
    """Multiplier of optimizer.lr for these parameters (schedules scale the result)."""


@dataclass
class ParamGroupsConfig:
    """How the model's parameters are split into the optimizer's param groups.

    Weight decay goes to parameters with 2 or more dims (linear weights, and embeddings unless
    ``decay_embeddings`` is false); biases and norm gains never decay. Groups come in this order:
    decay, no_decay, then the same pair for each of ``lr_rules`` in turn (empty groups are dropped);
    per-group scheduler lists follow that order.
    """

    decay_embeddings: bool = True
    """Weight-decay embedding tables (nn.Embedding) like other matrices (nanoGPT does)."""
    no_decay: List[str] = field(default_factory=list)
    """Regular expressions of parameter names that get no weight decay, e.g. ['^wpe\\.']."""
    lr_rules: List[LrRule] = field(default_factory=list)
    """lr multipliers by parameter name; the first rule that matches a parameter applies."""


# -- schedulers -----------------------------------------------------------------------------------
class WarmupType(Enum):
    log = "log"  # lr rises as log(i + 1) / log(W): fast at first (DeepSpeed's default)
    linear = "linear"  # lr rises as i / W


class DecayShape(Enum):
    linear = "linear"  # straight line down to the floor
    cosine = "cosine"  # half a cosine
    sqrt = "sqrt"  # 1 - sqrt(progress): drops fast at first ("1-sqrt" of the WSD literature)


@dataclass
class SchedulerConfig:
    _target_: str = "ds_hydra.optim.schedules.ConstantLR"
    _partial_: bool = True


@dataclass
class ConstantSchedulerConfig(SchedulerConfig):
    """The optimizer's lr at every step."""

    _target_: str = "ds_hydra.optim.schedules.ConstantLR"


@dataclass
class CosineSchedulerConfig(SchedulerConfig):
    """Linear warmup then cosine decay to ``min_lr_ratio`` of the peak, then held (nanoGPT's schedule)."""

    _target_: str = "ds_hydra.optim.schedules.WarmupCosineDecay"
    warmup_steps: int = II("ds_hydra.fraction:0.05,${trainer.max_steps}")
    """Steps of linear warmup from lr/(warmup_steps+1) to the peak lr (default: 5% of the run)."""
    total_steps: int = II("trainer.max_steps")
    """Step at which the decay reaches its floor (defaults to the run's length)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak lr."""


@dataclass
class WSDSchedulerConfig(SchedulerConfig):
    """Warmup-stable-decay: linear warmup, the peak lr held, then a decay over the last steps."""

    _target_: str = "ds_hydra.optim.schedules.WarmupStableDecay"
    warmup_steps: int = II("ds_hydra.fraction:0.05,${trainer.max_steps}")
    """Steps of linear warmup from lr/(warmup_steps+1) to the peak lr."""
    decay_steps: int = II("ds_hydra.fraction:0.2,${trainer.max_steps}")
    """Length of the final decay (default: the last 20% of the run)."""
    total_steps: int = II("trainer.max_steps")
    """Step at which the decay reaches its floor (the run's length)."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak lr."""
    decay_shape: DecayShape = DecayShape.sqrt
    """linear, cosine or sqrt (1 - sqrt(progress))."""


@dataclass
class WarmupLRConfig(SchedulerConfig):
    """DeepSpeed's WarmupLR: warm up from warmup_min_lr to warmup_max_lr, then hold."""

    _target_: str = "ds_hydra.deepspeed.lr_schedules.WarmupLR"
    warmup_min_lr: Any = 0.0
    """Starting lr: a number, or a list with one per param group."""
    warmup_max_lr: Any = None
    """lr reached after the warmup: a number, a list per group, or null for each group's own lr."""
    warmup_num_steps: int = 1000
    """Warmup length in steps (at least 2 are used, as in DeepSpeed)."""
    warmup_type: WarmupType = WarmupType.log
    """log or linear rise."""


@dataclass
class WarmupDecayLRConfig(WarmupLRConfig):
    """DeepSpeed's WarmupDecayLR: WarmupLR, then linear decay to warmup_min_lr at total_num_steps."""

    _target_: str = "ds_hydra.deepspeed.lr_schedules.WarmupDecayLR"
    total_num_steps: int = II("trainer.max_steps")
    """Step at which the lr is back to warmup_min_lr (and stays)."""
    warmup_max_lr: Any = 0.001
    """Peak lr: a number, a list per group, or null for each group's own lr."""


@dataclass
class WarmupCosineLRConfig(SchedulerConfig):
    """DeepSpeed's WarmupCosineLR: each group's own lr times a warmup-then-cosine ratio."""

    _target_: str = "ds_hydra.deepspeed.lr_schedules.WarmupCosineLR"
    total_num_steps: int = II("trainer.max_steps")
    """Step at which the ratio reaches cos_min_ratio (and stays)."""
    warmup_min_ratio: float = 0.0
    """Ratio at the first warmup step."""
    warmup_num_steps: int = 1000
    """Warmup length in steps (at least 2 are used, as in DeepSpeed)."""
    cos_min_ratio: float = 0.0001
    """Floor of the cosine as a fraction of each group's lr."""
    warmup_type: WarmupType = WarmupType.log
    """log or linear rise."""


@dataclass
class OneCycleConfig(SchedulerConfig):
    """DeepSpeed's OneCycle: one triangular lr cycle (beta1 cycled inversely), then optional decay."""

    _target_: str = "ds_hydra.deepspeed.lr_schedules.OneCycle"
    cycle_min_lr: Any = MISSING
    """lr at both ends of the cycle: a number or a list per param group."""
    cycle_max_lr: Any = MISSING
    """lr at the peak of the cycle: a number or a list per param group."""
    decay_lr_rate: float = 0.0
    """After the cycle, lr = cycle_min_lr / (1 + decay_lr_rate * steps_after / decay_step_size)."""
    cycle_first_step_size: int = 2000
    """Steps of the rising half."""
    cycle_second_step_size: Optional[int] = None
    """Steps of the falling half (null: same as the rising half)."""
    cycle_first_stair_count: int = 0
    """Move the rising half in this many flat stairs (0: continuously)."""
    cycle_second_stair_count: Optional[int] = None
    """Stairs of the falling half (null: same as the rising half)."""
    decay_step_size: int = 0
    """Steps per unit of post-cycle decay (0: no decay, hold cycle_min_lr)."""
    cycle_momentum: bool = True
    """Cycle beta1 inversely to the lr (optimizers with betas only; beta2 is set to 0.99)."""
    cycle_min_mom: Any = 0.8
    """beta1 at the peak lr: a number or a list per param group."""
    cycle_max_mom: Any = 0.9
    """beta1 at the ends of the cycle: a number or a list per param group."""
    decay_mom_rate: float = 0.0
    """After the cycle, beta1 = cycle_max_mom * (1 + decay_mom_rate * steps_after / decay_step_size)."""


@dataclass
class LRRangeTestConfig(SchedulerConfig):
    """DeepSpeed's LRRangeTest: grow the lr linearly (or in stairs) to find the largest that trains."""

    _target_: str = "ds_hydra.deepspeed.lr_schedules.LRRangeTest"
    lr_range_test_min_lr: Any = 1e-3
    """Starting lr: a number or a list per param group."""
    lr_range_test_step_size: int = 2000
    """Steps per unit of growth: lr = min_lr * (1 + step_rate * step / step_size)."""
    lr_range_test_step_rate: float = 1.0
    """Growth per step_size steps, as a multiple of min_lr."""
    lr_range_test_staircase: bool = False
    """Grow in flat stairs of step_size steps instead of every step."""


# -- validation -----------------------------------------------------------------------------------
# Ranges of the optimizer arguments ds_hydra knows, by name (their types are checked against the class's
# defaults: ds_hydra.instantiate.signature_problems; values of the wrong type are left to that check).
_OPTIMIZER_RANGES = {
    "lr": ("> 0", lambda v: v > 0),
    "eps": ("> 0", lambda v: v > 0),
    "alpha": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
    **{key: (">= 0", lambda v: v >= 0) for key in (
        "weight_decay", "momentum", "dampening", "lr_decay", "initial_accumulator_value", "momentum_decay")},
}


def validate_optimizer(cfg, prefix: str = "optimizer") -> List[str]:
    problems = []
    for key, (rule, ok) in _OPTIMIZER_RANGES.items():
        value = cfg.get(key)
        if not _is_number(value):
            continue
        if not math.isfinite(value):  # inf passes "> 0" and turns the weights into nan at the first update
            problems.append(f"{prefix}.{key}={value}: must be a finite number {rule}")
        elif not ok(value):
            problems.append(f"{prefix}.{key}={value}: must be {rule}")
    betas = cfg.get("betas")
    if isinstance(betas, Sequence) and not isinstance(betas, str):  # (not a list: the signature check says so)
        if not (len(betas) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
            problems.append(f"{prefix}.betas={list(betas)}: must be two numbers in [0, 1), e.g. [0.9,0.999]")
    momentum, dampening = cfg.get("momentum", 0), cfg.get("dampening", 0)
    if cfg.get("nesterov") is True and _is_number(momentum) and _is_number(dampening) and not (momentum > 0 and dampening == 0):
        problems.append(f"{prefix}.nesterov=true: needs {prefix}.momentum > 0 and {prefix}.dampening=0")
    if cfg.get("fused") is True and cfg.get("foreach") is True:
        problems.append(f"{prefix}.fused=true and {prefix}.foreach=true: pick one (or leave both null)")
    if cfg.get("fused") is True and cfg.get("differentiable") is True:
        problems.append(f"{prefix}.fused=true: the fused kernel does not support {prefix}.differentiable=true")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def validate_param_groups(cfg, prefix: str = "param_groups") -> List[str]:
    problems = [_regex_problem(f"{prefix}.no_decay[{i}]", p) for i, p in enumerate(cfg.no_decay)]
    for i, rule in enumerate(cfg.lr_rules):
        problems.append(_regex_problem(f"{prefix}.lr_rules[{i}].pattern", rule.pattern))
        if not math.isfinite(rule.lr_mult):
            problems.append(f"{prefix}.lr_rules[{i}].lr_mult={rule.lr_mult}: must be a finite number > 0")
        elif not rule.lr_mult > 0:
            problems.append(f"{prefix}.lr_rules[{i}].lr_mult={rule.lr_mult}: must be > 0")
    return [p for p in problems if p]


def _regex_problem(key: str, pattern: str) -> Optional[str]:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{key}={pattern!r}: not a valid regular expression ({exc})"
    return None


def validate_scheduler(cfg, max_steps: int, prefix: str = "scheduler") -> List[str]:
    """Range and cross-field checks of every scheduler option, by the keys it has."""
    problems = []
    problems += _validate_step_schedule(cfg, max_steps, prefix)
    problems += _validate_warmup_schedule(cfg, max_steps, prefix)
    problems += _validate_one_cycle(cfg, prefix)
    if "lr_range_test_step_size" in cfg:
        problems += _lr_values(cfg, "lr_range_test_min_lr", prefix)
        if cfg.lr_range_test_step_size < 1:
            problems.append(f"{prefix}.lr_range_test_step_size={cfg.lr_range_test_step_size}: must be a positive integer")
        if cfg.lr_range_test_step_rate < 0:
            problems.append(f"{prefix}.lr_range_test_step_rate={cfg.lr_range_test_step_rate}: must be >= 0")
    return problems


def _validate_step_schedule(cfg, max_steps: int, prefix: str) -> List[str]:
    """ds_hydra's own schedules (cosine, wsd): warmup_steps, decay_steps, total_steps, min_lr_ratio."""
    problems = []
    warmup, total, decay = cfg.get("warmup_steps"), cfg.get("total_steps"), cfg.get("decay_steps")
    if warmup is not None and warmup < 0:
        problems.append(f"{prefix}.warmup_steps={warmup}: must be >= 0")
    elif warmup is not None and warmup >= max_steps > 0:
        problems.append(f"{prefix}.warmup_steps={warmup}: warmup longer than training; must be < trainer.max_steps={max_steps}")
    elif warmup is not None and total is not None and decay is None and warmup >= total:
        problems.append(f"{prefix}.warmup_steps={warmup}: must be < {prefix}.total_steps={total}")
    if decay is not None and decay < 0:
        problems.append(f"{prefix}.decay_steps={decay}: must be >= 0")
    elif decay is not None and warmup is not None and total is not None and warmup >= 0 and warmup + decay > total:
        problems.append(
            f"{prefix}.warmup_steps={warmup} + {prefix}.decay_steps={decay}: must be <= {prefix}.total_steps={total}"
        )
    if total is not None and total < 1:
        problems.append(f"{prefix}.total_steps={total}: must be >= 1")
    if "min_lr_ratio" in cfg and not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"{prefix}.min_lr_ratio={cfg.min_lr_ratio}: must be in [0, 1]")
    return problems


def _validate_warmup_schedule(cfg, max_steps: int, prefix: str) -> List[str]:
    """DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR."""
    if "warmup_num_steps" not in cfg:
        return []
    problems = []
    warmup, total = cfg.warmup_num_steps, cfg.get("total_num_steps")
    if warmup < 1:
        problems.append(f"{prefix}.warmup_num_steps={warmup}: must be a positive integer")
    elif total is not None and warmup > total:
        problems.append(
            f"{prefix}.warmup_num_steps={warmup}: warmup longer than the schedule; must be <= {prefix}.total_num_steps={total}"
        )
    elif total is None and warmup > max_steps:
        problems.append(f"{prefix}.warmup_num_steps={warmup}: warmup longer than training; must be <= trainer.max_steps={max_steps}")
    if total is not None and total < 1:
        problems.append(f"{prefix}.total_num_steps={total}: must be >= 1")
    if "warmup_min_lr" in cfg:
        problems += _lr_values(cfg, "warmup_min_lr", prefix)
        problems += _lr_values(cfg, "warmup_max_lr", prefix, nullable=True)
    for key in ("warmup_min_ratio", "cos_min_ratio"):
        if key in cfg and not 0.0 <= cfg[key] <= 1.0:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be in [0, 1]")
    return problems


def _validate_one_cycle(cfg, prefix: str) -> List[str]:
    if "cycle_first_step_size" not in cfg:
        return []
    problems = _lr_values(cfg, "cycle_min_lr", prefix) + _lr_values(cfg, "cycle_max_lr", prefix)
    problems += _lr_values(cfg, "cycle_min_mom", prefix, upper=1.0) + _lr_values(cfg, "cycle_max_mom", prefix, upper=1.0)
    if cfg.cycle_first_step_size < 1:
        problems.append(f"{prefix}.cycle_first_step_size={cfg.cycle_first_step_size}: must be a positive integer")
    second = cfg.cycle_second_step_size
    if second is not None and second < 0:
        problems.append(f"{prefix}.cycle_second_step_size={second}: must be >= 0 (or null: same as the first)")
    for key in ("cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "decay_lr_rate", "decay_mom_rate"):
        if cfg[key] is not None and cfg[key] < 0:
            problems.append(f"{prefix}.{key}={cfg[key]}: must be >= 0")
    return problems


def _lr_values(cfg, key: str, prefix: str, nullable: bool = False, upper: Optional[float] = None) -> List[str]:
    """A number >= 0 (below ``upper`` if given), or a non-empty list of them (one per param group)."""
    value = cfg[key]
    if value is None and nullable:
        return []
    values = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else [value]
    numbers = all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
    in_range = numbers and all(v >= 0 and (upper is None or v < upper) for v in values)
    if values and in_range:
        return []
    bounds = f"in [0, {upper})" if upper is not None else ">= 0"
    what = "a number" + (", null" if nullable else "")
    return [f"{prefix}.{key}={value}: must be {what} or a list of numbers (one per param group), each {bounds}"]
