"""Closed-form learning-rate schedules as ``LRScheduler`` subclasses.

Each ``lr_factor(step)`` is the multiplier of every group's base lr for the optimizer step with
index ``step`` (0-based): the scheduler is stepped once after each optimizer step. DeepSpeed's five
schedules, with DeepSpeed's own object API, are ``ds_hydra.deepspeed.lr_schedules``.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class FactorSchedule(LRScheduler):
    """Base: lr of each group = its initial lr times ``lr_factor(last_epoch)``."""

    def lr_factor(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self):
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class ConstantLR(FactorSchedule):
    """The optimizer's own lr, every step."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        return 1.0


class WarmupCosineDecay(FactorSchedule):
    """nanoGPT's schedule, as numbered cases of the step:

    1. step < warmup_steps: linear warmup, factor (step + 1) / (warmup_steps + 1);
    2. step > total_steps: hold the floor, factor min_lr_ratio;
    3. otherwise cosine from 1 down to min_lr_ratio over [warmup_steps, total_steps].
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 100,
        total_steps: int = 2000,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ):
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step > self.total_steps:
            return self.min_lr_ratio
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + cosine * (1.0 - self.min_lr_ratio)


DECAY_SHAPES = ("linear", "cosine", "sqrt")


class WarmupStableDecay(FactorSchedule):
    """Warmup-stable-decay: hold the peak lr for most of the run and decay only at the end, so a run can
    be extended (or branched off into a decay) without restarting the schedule. By case of the step:

    1. step < warmup_steps: linear warmup, factor (step + 1) / (warmup_steps + 1);
    2. step < total_steps - decay_steps: the peak, factor 1;
    3. step >= total_steps: hold the floor, factor min_lr_ratio;
    4. otherwise decay over p = (step - (total_steps - decay_steps)) / decay_steps in [0, 1):
       factor = min_lr_ratio + (1 - min_lr_ratio) * shape(p), shape = 1 - p (linear),
       (1 + cos(pi p)) / 2 (cosine) or 1 - sqrt(p) (sqrt).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 100,
        decay_steps: int = 400,
        total_steps: int = 2000,
        min_lr_ratio: float = 0.0,
        decay_shape: str = "sqrt",
        last_epoch: int = -1,
    ):
        decay_shape = getattr(decay_shape, "value", decay_shape)  # a config enum member or its string
        if decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={decay_shape!r}: allowed values: {', '.join(DECAY_SHAPES)}")
        if warmup_steps < 0 or decay_steps < 0 or warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"need warmup_steps, decay_steps >= 0 and warmup_steps + decay_steps <= total_steps, "
                f"got {warmup_steps}, {decay_steps} and {total_steps}"
            )
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.decay_shape = decay_shape
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        decay_start = self.total_steps - self.decay_steps
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step < decay_start:
            return 1.0
        if step >= self.total_steps:
            return self.min_lr_ratio
        progress = (step - decay_start) / self.decay_steps
        if self.decay_shape == "linear":
            shape = 1.0 - progress
        elif self.decay_shape == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - math.sqrt(progress)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
