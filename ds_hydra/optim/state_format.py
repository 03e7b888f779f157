"""An optimizer's state dict in its two layouts, and the way between them.

* numbered: ``optimizer.state_dict()``, parameters numbered in param-group order (what ``step_N.pt``
  holds, and what one process loads);
* by path: the same with each number replaced by its parameter's path in the model (what
  torch.distributed.checkpoint's ``get_optimizer_state_dict`` gives and ``set_optimizer_state_dict`` takes:
  FSDP's full state dict, the ``dcp`` checkpoint format).

A checkpoint records the path of each number (``param_names``), so either layout can be rebuilt from it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn

from ds_hydra.errors import UserError


def optimizer_param_names(model: nn.Module, optimizer) -> Optional[List[str]]:
    """The path of each parameter the optimizer steps, in its numbering (param-group order); None where the
    optimizer holds other tensors than the model's (DeepSpeed's flat partitions)."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if None in order else order


def indexed_optimizer_state(named: Dict[str, Any]) -> Dict[str, Any]:
    """Number the parameters of a path-keyed optimizer state dict in param-group order, as
    ``torch.optim.Optimizer.state_dict()`` does; the inverse of ``named_optimizer_state``."""
    index: Dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


def named_optimizer_state(indexed: Dict[str, Any], names: Optional[Sequence[str]], mismatch: str = "") -> Dict[str, Any]:
    """Key an ``optimizer.state_dict()``-format state by parameter path: ``names[i]`` is number ``i``'s.
    When the state numbers another count of parameters (or ``names`` is None: the optimizer steps
    tensors the model does not name), ``UserError(mismatch)`` (a default message when empty)."""
    count = sum(len(group["params"]) for group in indexed["param_groups"])
    if names is None or count != len(names):
        raise UserError(mismatch or f"optimizer state numbers {count} parameters but the checkpoint names {len(names or ())}")
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in indexed["state"].items()}, "param_groups": groups}
