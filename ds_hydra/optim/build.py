"""Build the optimizer and scheduler from their ``_partial_`` config callables.

``optimizer_callable`` and ``scheduler_callable`` give the ``DeepSpeedOptimizerCallable`` and
``DeepSpeedSchedulerCallable`` a config describes (what ``deepspeed.initialize`` also accepts);
``build_optimizer`` calls the first with the param groups ds_hydra splits the model into, and
``build_scheduler`` calls the second with the optimizer.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from ds_hydra.errors import ConfigError, UserError
from ds_hydra.instantiate import instantiate, signature_problems
from ds_hydra.optim.param_groups import build_param_groups
from ds_hydra.optim.types import DeepSpeedOptimizerCallable, DeepSpeedSchedulerCallable

log = logging.getLogger(__name__)

def has_fused_kernel(optimizer_cls: type, device_type: str) -> bool:
    """Whether this torch build has ``optimizer_cls``'s fused kernel for ``device_type`` (cuda, cpu)."""
    op = f"aten::_fused_{optimizer_cls.__name__.lower()}_"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, device_type.upper()))
    except RuntimeError:  # no such operator: this optimizer has no fused kernel at all
        return False


def kernel_kwargs(optimizer_cls: type, spec: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    """On CUDA, with ``fused`` and ``foreach`` left null: the fused kernel when this torch has one for
    the optimizer, else the multi-tensor (foreach) one. Elsewhere, and when either is set: nothing."""
    if device.type != "cuda":
        return {}
    params = inspect.signature(optimizer_cls).parameters
    fused, foreach = spec.get("fused"), spec.get("foreach")
    if (
        "fused" in params
        and fused is None
        and foreach is None
        and not spec.get("differentiable")
        and has_fused_kernel(optimizer_cls, device.type)
    ):
        return {"fused": True}
    if "foreach" in params and foreach is None and not fused:
        return {"foreach": True}
    return {}


def optimizer_callable(cfg_optimizer, device: Optional[torch.device] = None) -> DeepSpeedOptimizerCallable:
    """The optimizer config as a callable over parameters or param groups.

    Its keys are first bound to the optimizer class's signature (a name it does not take is a
    ConfigError naming the key); on CUDA, ``fused``/``foreach`` left unset are chosen by ``kernel_kwargs``.
    """
    problems = signature_problems(cfg_optimizer, "optimizer")
    if problems:
        raise ConfigError(problems)
    factory = instantiate(cfg_optimizer)
    extra = kernel_kwargs(factory.func, factory.keywords, device) if device is not None else {}
    return functools.partial(factory, **extra) if extra else factory


def scheduler_callable(cfg_scheduler) -> DeepSpeedSchedulerCallable:
    """The scheduler config as a callable over the optimizer."""
    return instantiate(cfg_scheduler)


def param_groups_for(model: nn.Module, cfg_optimizer, cfg_param_groups=None) -> List[Dict]:
    """The model's param groups under the ``param_groups`` rules (defaults when None)."""
    rules = _plain(cfg_param_groups) if cfg_param_groups is not None else {}
    return build_param_groups(
        model,
        weight_decay=float(cfg_optimizer.get("weight_decay", 0.0)),
        lr=float(cfg_optimizer.lr) if cfg_optimizer.get("lr") is not None else None,
        decay_embeddings=rules.get("decay_embeddings", True),
        no_decay=rules.get("no_decay", []),
        lr_rules=[(r["pattern"], r.get("lr_mult", 1.0)) for r in rules.get("lr_rules", [])],
    )


def build_optimizer(cfg_optimizer, model: nn.Module, device: torch.device, param_groups=None,
                    in_backward: bool = False) -> torch.optim.Optimizer:
    """Instantiate the optimizer callable and call it with the model's param groups; log the groups.
    ``in_backward``: one optimizer per parameter, stepped by its gradient hook (``OptimizerInBackward``)."""
    factory = optimizer_callable(cfg_optimizer, device)
    groups = param_groups_for(model, cfg_optimizer, param_groups)
    try:
        if in_backward:
            from ds_hydra.optim.in_backward import OptimizerInBackward

            optimizer = OptimizerInBackward(factory, groups)
        else:
            optimizer = factory(groups)
    except ValueError as exc:  # torch's own range checks ("Invalid beta parameter ...")
        raise UserError(f"optimizer: {exc}") from None
    log_param_groups(optimizer)
    return optimizer


def build_scheduler(cfg_scheduler, optimizer: torch.optim.Optimizer):
    """Instantiate the scheduler callable and call it with the optimizer."""
    factory = scheduler_callable(cfg_scheduler)
    try:
        return factory(optimizer)
    except ValueError as exc:  # e.g. a per-group list whose length is not the number of groups
        raise UserError(f"scheduler: {exc}") from None


def param_group_table(optimizer: torch.optim.Optimizer) -> str:
    """One row per param group: name, tensors, parameters, lr, weight decay."""
    rows = [f"{'group':<22} {'tensors':>7} {'params':>12} {'lr':>10} {'weight_decay':>12}"]
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        rows.append(
            f"{group.get('name', str(i)):<22} {len(group['params']):>7} {count:>12,} "
            f"{float(group['lr']):>10.3g} {group.get('weight_decay', 0.0):>12.3g}"
        )
    return "\n".join(rows)


def log_param_groups(optimizer: torch.optim.Optimizer) -> None:
    log.info("param groups:\n%s", param_group_table(optimizer))


def _plain(node) -> Dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return dict(node)
