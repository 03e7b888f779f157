"""Build the optimizer and scheduler from their ``_partial_`` config callables."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict

import torch
import torch.nn as nn

from ds_hydra.instantiate import instantiate
from ds_hydra.optim.param_groups import build_param_groups

log = logging.getLogger(__name__)


def kernel_kwargs(optimizer_factory, cfg_optimizer, device: torch.device) -> Dict[str, Any]:
    """On CUDA prefer the fused kernel, else foreach, when the config leaves them null (auto)."""
    if device.type != "cuda":
        return {}
    params = inspect.signature(optimizer_factory.func).parameters
    if "fused" in params and cfg_optimizer.get("fused", None) is None and cfg_optimizer.get("foreach") is None:
        return {"fused": True}
    if "foreach" in params and cfg_optimizer.get("foreach") is None:
        return {"foreach": True}
    return {}


def build_optimizer(cfg_optimizer, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Instantiate the optimizer callable and call it with the model's param groups."""
    optimizer_factory = instantiate(cfg_optimizer)  # a DeepSpeedOptimizerCallable
    groups = build_param_groups(model, weight_decay=cfg_optimizer.get("weight_decay", 0.0))
    optimizer = optimizer_factory(groups, **kernel_kwargs(optimizer_factory, cfg_optimizer, device))
    log_param_groups(optimizer)
    return optimizer


def build_scheduler(cfg_scheduler, optimizer: torch.optim.Optimizer):
    """Instantiate the scheduler callable and call it with the optimizer."""
    return instantiate(cfg_scheduler)(optimizer)  # a DeepSpeedSchedulerCallable


def log_param_groups(optimizer: torch.optim.Optimizer) -> None:
    rows = [f"{'group':<12} {'params':>12} {'lr':>10} {'weight_decay':>12}"]
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        rows.append(f"{group.get('name', str(i)):<12} {count:>12,} {group['lr']:>10.3g} {group.get('weight_decay', 0.0):>12.3g}")
    log.info("param groups:\n%s", "\n".join(rows))
