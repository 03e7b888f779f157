"""DeepSpeed's learning-rate schedules as torch ``LRScheduler`` subclasses, in closed form.

``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` take the
constructor arguments of ``deepspeed.runtime.lr_schedules`` (DeepSpeed 0.19.8), with the same names and
defaults, and after ``n`` calls of ``step()`` leave every param group with the lr (and, for ``OneCycle``,
the betas) DeepSpeed's class leaves after ``n`` calls. They keep DeepSpeed's public object API with its
values, before the first step included: ``get_lr()``, ``get_last_lr()``, ``OneCycle.get_mom()``,
``WarmupCosineLR.get_lr_ratio()``, ``step(last_batch_iteration=...)``, ``last_batch_iteration`` and
a ``state_dict`` holding DeepSpeed's ``last_batch_iteration`` key (``load_state_dict`` takes DeepSpeed's
own). Being ``LRScheduler``s they also resume exactly through torch's ``state_dict``.

Counting. DeepSpeed's schedules count ``last_batch_iteration``: -1 at construction, +1 per ``step()``.
torch counts ``last_epoch``: 0 right after construction (its constructor takes one step), +1 per
``step()``. So here ``iteration = last_epoch - 1``, and each class's ``lrs_at(iteration)`` is the
numbered case analysis of one schedule, ``iteration = -1`` being the value set at construction.

Differences from DeepSpeed, all deliberate: an unknown ``warmup_type`` raises instead of falling back
to ``'log'``; a ``bool`` is not accepted as a step count; when built with ``last_batch_iteration >= 0``
(DeepSpeed-style resume) the groups get that iteration's lr at once instead of keeping theirs until the
next ``step()``. Resuming through ``load_state_dict`` is the usual path and needs none of that.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

log = logging.getLogger(__name__)

WARMUP_TYPES = ("log", "linear")
ONE_CYCLE_BETA2 = 0.99
"""OneCycle overwrites each group's ``betas`` with ``(cycled beta1, 0.99)``, as DeepSpeed does."""

FloatOrList = Union[float, Sequence[float]]


# -- argument checks shared by the schedules -------------------------------------------------------
def per_group(optimizer: Optimizer, value, name: str) -> List[float]:
    """``value`` for each param group: a scalar is broadcast, a list/tuple must have one per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} values (one per param group), got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * n


def positive_int(value, name: str) -> int:
    """DeepSpeed requires ``isinstance(value, int) and value > 0``; a bool is refused here too."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_warmup_type(value) -> str:
    value = getattr(value, "value", value)  # a config enum member or its string
    if value not in WARMUP_TYPES:
        raise ValueError(f"warmup_type={value!r}: allowed values: {', '.join(WARMUP_TYPES)}")
    return value


def warmup_fraction(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """Fraction of the warmup done at ``0 <= iteration < warmup_num_steps``: 0 at the first iteration,
    log(i + 1) / log(W) (reaches 1 at i = W - 1) or i / W (linear)."""
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


def torch_optimizer(optimizer) -> Optimizer:
    """The torch optimizer itself, or the one a wrapper holds in ``.optimizer`` (as DeepSpeed accepts)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")


def group_lrs(optimizer: Optimizer) -> List[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


# -- the base class -------------------------------------------------------------------------------
DEEPSPEED_STATE_KEY = "last_batch_iteration"
"""The one key of a DeepSpeed schedule's ``state_dict``; ours carry it too, and load DeepSpeed's."""


class DeepSpeedSchedule(LRScheduler):
    """Base: each group's lr is ``lrs_at(iteration)``, a closed form of DeepSpeed's batch iteration.

    DeepSpeed's public object API, with its values from construction on: ``get_lr()`` (the lrs at the
    current iteration, computed, as DeepSpeed computes them), ``get_last_lr()`` (the lrs last written
    into the optimizer), ``step(last_batch_iteration=None)`` (also spelt ``batch_iteration``, DeepSpeed's
    name in ``OneCycle`` and ``LRRangeTest``), the ``last_batch_iteration`` counter (readable and
    settable), and ``state_dict()``/``load_state_dict()`` with DeepSpeed's ``last_batch_iteration`` key.
    """

    def __init__(self, optimizer: Optimizer, last_batch_iteration: int = -1):
        if last_batch_iteration != -1:
            # DeepSpeed-style resume: like DeepSpeed, the groups' current lrs are the base lrs.
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, last_batch_iteration)  # takes one step: last_epoch = iteration + 1

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's counter: -1 after construction, n - 1 after n calls of ``step()``. Setting it (as
        DeepSpeed's ``load_state_dict`` does) moves the schedule; the optimizer's lrs follow at the next
        ``step()``."""
        return self.last_epoch - 1

    @last_batch_iteration.setter
    def last_batch_iteration(self, value: int) -> None:
        self.last_epoch = int(value) + 1

    def lrs_at(self, iteration: int) -> List[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> List[float]:
        """Each group's lr at the current iteration (DeepSpeed's ``get_lr``: before the first step too)."""
        return self.lrs_at(self.last_batch_iteration)

    def step(self, last_batch_iteration: Optional[int] = None, batch_iteration: Optional[int] = None) -> None:
        """Advance one iteration, or jump to ``last_batch_iteration`` (DeepSpeed's ``step`` argument;
        ``batch_iteration`` is its name in DeepSpeed's ``OneCycle`` and ``LRRangeTest``)."""
        if last_batch_iteration is not None and batch_iteration is not None and last_batch_iteration != batch_iteration:
            raise ValueError(
                f"step(last_batch_iteration={last_batch_iteration}, batch_iteration={batch_iteration}): two names "
                "of the same argument; give one"
            )
        target = last_batch_iteration if last_batch_iteration is not None else batch_iteration
        if target is not None:
            self.last_epoch = int(target)  # the base step adds the one
        super().step()

    def state_dict(self) -> Dict[str, Any]:
        """torch's state (every attribute but the optimizer) plus DeepSpeed's ``last_batch_iteration``."""
        state = super().state_dict()
        state[DEEPSPEED_STATE_KEY] = self.last_batch_iteration
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Our own ``state_dict``, or a DeepSpeed schedule's (``{'last_batch_iteration': n}``, e.g. from a
        DeepSpeed checkpoint): the schedule continues from iteration n."""
        state = dict(state_dict)
        iteration = state.pop(DEEPSPEED_STATE_KEY, None)
        super().load_state_dict(state)
        if iteration is not None:
            self.last_batch_iteration = iteration


# -- WarmupLR and WarmupDecayLR -------------------------------------------------------------------
class WarmupLR(DeepSpeedSchedule):
    """Warm each group's lr up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``
    iterations, then hold it. ``warmup_max_lr=None`` means each group's own lr at construction.

    lr = min_lr + (max_lr - min_lr) * gamma(i), with gamma by case of the iteration i:

    0. i = -1 (construction): gamma = 0;
    1. i < W: the warmup fraction (log by default: log(i + 1) / log(W)), W = max(2, warmup_num_steps);
    2. afterwards: gamma = 1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_min_lr: FloatOrList = 0.0,
        warmup_max_lr: Optional[FloatOrList] = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        optimizer = torch_optimizer(optimizer)
        self.warmup_num_steps = max(2, positive_int(warmup_num_steps, "warmup_num_steps"))
        self.warmup_type = check_warmup_type(warmup_type)
        self.min_lrs = per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        if warmup_max_lr is None:
            warmup_max_lr = group_lrs(optimizer)
        self.max_lrs = per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        super().__init__(optimizer, last_batch_iteration)

    def gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def lrs_at(self, iteration: int) -> List[float]:
        if iteration < 0:
            return list(self.min_lrs)
        gamma = self.gamma(iteration)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """``WarmupLR``, then a linear decay that reaches ``warmup_min_lr`` at iteration ``total_num_steps``
    and holds it there. After the warmup (case 2 of ``WarmupLR``):

    2. gamma = max(0, (T - i) / max(1, T - W)), T = total_num_steps.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_lr: FloatOrList = 0.0,
        warmup_max_lr: Optional[FloatOrList] = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        if total_num_steps < self.warmup_num_steps:
            log.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)

    def gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
        return max(0.0, (self.total_num_steps - iteration) / max(1.0, self.total_num_steps - self.warmup_num_steps))


# -- WarmupCosineLR -------------------------------------------------------------------------------
class WarmupCosineLR(DeepSpeedSchedule):
    """Scale each group's own lr by a ratio: warm up from ``warmup_min_ratio`` to 1, then cosine down to
    ``cos_min_ratio`` at iteration ``total_num_steps`` and hold it. Ratio by case of the iteration i:

    0. i = -1 (construction): 0, whatever ``warmup_min_ratio`` is;
    1. i < W: warmup_min_ratio + (1 - warmup_min_ratio) * warmup fraction, W = max(2, warmup_num_steps);
    2. afterwards: p = min(1, (i - W + 1) / max(1, T - W)),
       ratio = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi p)) / 2).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ):
        optimizer = torch_optimizer(optimizer)
        self.warmup_num_steps = max(2, positive_int(warmup_num_steps, "warmup_num_steps"))
        self.warmup_type = check_warmup_type(warmup_type)
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.cos_min_ratio = float(cos_min_ratio)
        if total_num_steps < self.warmup_num_steps:
            log.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)
        self.org_lrs = group_lrs(optimizer)
        super().__init__(optimizer, last_batch_iteration)

    def lr_ratio(self, iteration: int) -> float:
        if iteration < 0:
            return 0.0
        if iteration < self.warmup_num_steps:
            done = warmup_fraction(iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * done
        progress = min(1.0, (iteration - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def lrs_at(self, iteration: int) -> List[float]:
        ratio = self.lr_ratio(iteration)
        return [lr * ratio for lr in self.org_lrs]

    def get_lr_ratio(self) -> float:
        """The ratio at the current iteration (DeepSpeed's ``get_lr_ratio``; 0 before the first step)."""
        return self.lr_ratio(self.last_batch_iteration)


# -- LRRangeTest ----------------------------------------------------------------------------------
class LRRangeTest(DeepSpeedSchedule):
    """Grow each group's lr from ``lr_range_test_min_lr``, to find the largest lr that still trains:

    lr = min_lr * (1 + step_rate * n), n = (i + 1) / step_size, floored when ``lr_range_test_staircase``
    (so the lr changes once every ``lr_range_test_step_size`` iterations).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_range_test_min_lr: FloatOrList = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ):
        optimizer = torch_optimizer(optimizer)
        self.min_lr = per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        super().__init__(optimizer, last_batch_iteration)

    def lrs_at(self, iteration: int) -> List[float]:
        intervals = (iteration + 1) / self.step_size
        if self.staircase:
            intervals = math.floor(intervals)
        increase = 1.0 + self.step_rate * intervals
        return [lr * increase for lr in self.min_lr]


# -- OneCycle -------------------------------------------------------------------------------------
class OneCycle(DeepSpeedSchedule):
    """One triangular cycle of the lr (and, inversely, of Adam's beta1), then an optional decay.

    The cycle rises over ``cycle_first_step_size`` iterations from ``cycle_min_lr`` to ``cycle_max_lr``
    and falls back over ``cycle_second_step_size`` (default: the first). With a stair count > 0 that
    half moves in that many flat stairs. lr = min_lr + (max_lr - min_lr) * h and
    beta1 = max_mom - (max_mom - min_mom) * h, with the height h by case of b = i + 1 (S = both halves):

    0. i = -1 (construction): h = 0, and beta1 = cycle_min_mom (DeepSpeed's initial value);
    1. i < S, stairs: h = floor(c * k / first) / k rising (c <= first), else floor((S - c) * k / second) / k,
       c = b mod S, k = that half's stair count (which half picks k: x <= first / S, x as in 2 and 3);
    2. i < S, rising (x = b/S - floor(b/S) <= first / S): h = x / (first / S);
    3. i < S, falling: h = (x - 1) / (first / S - 1);
    4. i >= S, decay: lr = min_lr / (1 + decay_lr_rate * d / decay_step_size) and
       beta1 = max_mom * (1 + decay_mom_rate * d / decay_step_size), d = i - S + 1; a zero rate or a
       zero ``decay_step_size`` holds min_lr and max_mom instead.

    Momentum is cycled only for optimizers with ``betas`` (beta2 is set to 0.99); for others (SGD) it
    is left alone with a warning, as DeepSpeed does.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        cycle_min_lr: FloatOrList,
        cycle_max_lr: FloatOrList,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: Optional[int] = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: Optional[int] = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: FloatOrList = 0.8,
        cycle_max_mom: FloatOrList = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ):
        optimizer = torch_optimizer(optimizer)
        first = float(cycle_first_step_size)
        second = first if cycle_second_step_size is None else float(cycle_second_step_size)
        if not first > 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {cycle_first_step_size!r}")
        if not second >= 0:
            raise ValueError(f"cycle_second_step_size must be non-negative, got {cycle_second_step_size!r}")
        self.first_step_size = first
        self.second_step_size = second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        self.decay_step_size = decay_step_size

        self.min_lrs = per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = float(decay_lr_rate)
        self.skip_lr_decay = decay_step_size == 0 or self.decay_lr_rate == 0

        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum and "betas" not in optimizer.defaults:
            log.warning("OneCycle: %s has no betas; cycle_momentum is disabled", type(optimizer).__name__)
            self.cycle_momentum = False
        self.min_moms = per_group(optimizer, cycle_min_mom, "cycle_min_mom")
        self.max_moms = per_group(optimizer, cycle_max_mom, "cycle_max_mom")
        self.decay_mom_rate = float(decay_mom_rate)
        self.skip_mom_decay = decay_step_size == 0 or self.decay_mom_rate == 0
        super().__init__(optimizer, last_batch_iteration)

    def height(self, iteration: int) -> float:
        """h in [0, 1]: where in the cycle iteration ``iteration`` (< total_size) is (cases 0-3)."""
        batch = iteration + 1
        cycle = math.floor(1.0 + batch / self.total_size)
        x = 1.0 + batch / self.total_size - cycle
        rising = x <= self.step_ratio
        stairs = self.first_stair_count if rising else self.second_stair_count
        if stairs is not None and stairs > 0:
            # Stairs are counted from the integer offset in the cycle, not from x: x can land a hair
            # under an exact stair, and the floor would then drop a whole stair.
            offset = batch % self.total_size
            if offset <= self.first_step_size:
                position = offset * stairs / self.first_step_size
            else:
                position = (self.total_size - offset) * stairs / self.second_step_size
            return math.floor(position) / stairs
        if rising:
            return x / self.step_ratio
        return (x - 1.0) / (self.step_ratio - 1.0)

    def lrs_at(self, iteration: int) -> List[float]:
        if iteration < self.total_size:
            h = self.height(iteration)
            return [lo + (hi - lo) * h for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        decayed = iteration - self.total_size + 1
        factor = 1.0 + self.decay_lr_rate * (decayed / self.decay_step_size)
        return [lo / factor for lo in self.min_lrs]

    def cycle_moms_at(self, iteration: int) -> List[float]:
        """Each group's beta1 by the cycle's formula at ``iteration`` (at -1: ``cycle_max_mom``, h = 0)."""
        if iteration < self.total_size:
            h = self.height(iteration)
            return [hi - (hi - lo) * h for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        decayed = iteration - self.total_size + 1
        factor = 1.0 + self.decay_mom_rate * (decayed / self.decay_step_size)
        return [hi * factor for hi in self.max_moms]

    def betas_at(self, iteration: int) -> List[Tuple[float, float]]:
        """Each group's ``(beta1, beta2)`` in the optimizer after iteration ``iteration``; at construction
        (-1) DeepSpeed writes ``cycle_min_mom``, not the formula's value."""
        beta1s = self.min_moms if iteration < 0 else self.cycle_moms_at(iteration)
        return [(b, ONE_CYCLE_BETA2) for b in beta1s]

    def get_mom(self) -> Optional[List[Tuple[float, float]]]:
        """DeepSpeed's ``get_mom``: each group's ``(beta1, 0.99)`` by the formula at the current iteration
        (``cycle_max_mom`` before the first step, while the optimizer holds ``cycle_min_mom``, as in
        DeepSpeed), or None when momentum is not cycled."""
        if not self.cycle_momentum:
            return None
        return [(b, ONE_CYCLE_BETA2) for b in self.cycle_moms_at(self.last_batch_iteration)]

    def step(self, last_batch_iteration: Optional[int] = None, batch_iteration: Optional[int] = None) -> None:
        super().step(last_batch_iteration, batch_iteration)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.betas_at(self.last_batch_iteration)):
                group["betas"] = betas


__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest", "DeepSpeedSchedule"]
