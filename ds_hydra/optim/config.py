"""Schemas of the ``optimizer`` and ``scheduler`` config groups (torch-free).

Each optimizer option is ``_target_: torch.optim.X`` with ``_partial_: true``: instantiating it gives
a ``DeepSpeedOptimizerCallable`` that takes parameters or param groups. Each scheduler option is
``_partial_`` too and gives a ``DeepSpeedSchedulerCallable`` that takes the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import II


@dataclass
class OptimizerConfig:
    """Fields every optimizer has; ``weight_decay`` applies only to the decayed param group."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-3
    """Peak learning rate (schedules scale it per step)."""
    weight_decay: float = 0.0
    """L2 / decoupled weight decay for the decayed group (matrices); biases and norms get 0."""
    foreach: Optional[bool] = None
    """Multi-tensor kernels; null lets ds_hydra choose (on for CUDA when fused is unavailable)."""


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    amsgrad: bool = False
    """Use the maximum of past second moments (AMSGrad)."""
    fused: Optional[bool] = None
    """Single fused CUDA kernel; null lets ds_hydra choose (on for CUDA)."""


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.01


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.0
    """Momentum factor (0 is plain SGD)."""
    dampening: float = 0.0
    """Dampening for momentum."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening 0)."""
    fused: Optional[bool] = None
    """Single fused CUDA kernel; null lets ds_hydra choose."""


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


def validate_optimizer(cfg, prefix: str = "optimizer") -> List[str]:
    problems = []
    if "lr" in cfg and not cfg.lr > 0:
        problems.append(f"{prefix}.lr={cfg.lr}: must be > 0")
    if "weight_decay" in cfg and cfg.weight_decay < 0:
        problems.append(f"{prefix}.weight_decay={cfg.weight_decay}: must be >= 0")
    if "betas" in cfg:
        betas = list(cfg.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            problems.append(f"{prefix}.betas={betas}: must be two numbers in [0, 1)")
    if "eps" in cfg and not cfg.eps > 0:
        problems.append(f"{prefix}.eps={cfg.eps}: must be > 0")
    if "momentum" in cfg and cfg.momentum < 0:
        problems.append(f"{prefix}.momentum={cfg.momentum}: must be >= 0")
    return problems


def validate_scheduler(cfg, max_steps: int, prefix: str = "scheduler") -> List[str]:
    problems = []
    warmup, total = cfg.get("warmup_steps"), cfg.get("total_steps")
    if warmup is not None and warmup < 0:
        problems.append(f"{prefix}.warmup_steps={warmup}: must be >= 0")
    elif warmup is not None and warmup >= max_steps > 0:
        problems.append(f"{prefix}.warmup_steps={warmup}: warmup longer than training; must be < trainer.max_steps={max_steps}")
    elif warmup is not None and total is not None and warmup >= total:
        problems.append(f"{prefix}.warmup_steps={warmup}: must be < {prefix}.total_steps={total}")
    if total is not None and total < 1:
        problems.append(f"{prefix}.total_steps={total}: must be >= 1")
    if "min_lr_ratio" in cfg and not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"{prefix}.min_lr_ratio={cfg.min_lr_ratio}: must be in [0, 1]")
    return problems
