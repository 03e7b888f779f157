"""The callable types ``deepspeed.initialize`` accepts for its ``optimizer`` and ``lr_scheduler`` arguments.

An optimizer config (``_partial_: true`` over ``torch.optim.X``) instantiates to a
``DeepSpeedOptimizerCallable``: called with a list of parameters or of param-group dicts, it returns the
optimizer. A scheduler config instantiates to a ``DeepSpeedSchedulerCallable``: called with the optimizer,
it returns the scheduler. The same objects work in ds_hydra's trainer and in ``deepspeed.initialize``.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Union

from torch.nn import Parameter
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

_LRScheduler = LRScheduler
"""torch's scheduler base class under its pre-2.0 name, for code written against the old name."""

DeepSpeedOptimizerCallable = Callable[[Union[Iterable[Parameter], Dict[str, Iterable]]], Optimizer]
"""Parameters (or param-group dicts) -> optimizer."""

DeepSpeedSchedulerCallable = Callable[[Optimizer], LRScheduler]
"""Optimizer -> learning-rate scheduler."""

__all__ = ["DeepSpeedOptimizerCallable", "DeepSpeedSchedulerCallable", "_LRScheduler"]
