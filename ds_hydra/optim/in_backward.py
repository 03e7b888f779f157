"""The optimizer step inside backward (``trainer.optimizer_in_backward=true``).

Each parameter gets an optimizer of its own (built by the run's optimizer callable, so any class
works, 8-bit ones included) and a post-accumulate-grad hook that steps it and frees the gradient as
soon as backward has finished that gradient (torchtune's ``optimizer_in_bwd``). A step then never
holds every gradient at once: the peak holds the gradients of the blocks backward is working on.

``OptimizerInBackward`` stands for the per-parameter optimizers where the trainer wants one
optimizer: its ``param_groups`` are ds_hydra's groups (decay, no_decay, lr rules, in their order),
which the schedule sets as usual; each parameter's optimizer takes its group's values (lr, betas)
just before it steps. ``step`` and ``zero_grad`` do nothing (backward did both). Its state dict
holds every parameter's optimizer state in parameter order, so a resumed run continues exactly.

What it cannot honour is refused by the config checks (``ds_hydra.training.config``): gradient
accumulation (a parameter would step on each micro-batch), global-norm clipping (the norm is known
only when every gradient exists), skipping non-finite steps (the update happened before the loss
could be checked), fp16 loss scaling, and engines that reduce or shard gradients across processes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """Per-parameter optimizers stepped by gradient hooks, behind one optimizer's face."""

    def __init__(self, make_optimizer: Callable[[List[Dict[str, Any]]], torch.optim.Optimizer], param_groups: List[Dict[str, Any]]):
        self.per_parameter: List[torch.optim.Optimizer] = []
        self._group_of: Dict[int, int] = {}  # id(parameter) -> index of its group
        groups = []
        for index, group in enumerate(param_groups):
            options = {k: v for k, v in group.items() if k != "params"}
            params = [p for p in group["params"] if p.requires_grad]
            for p in params:
                self.per_parameter.append(make_optimizer([{**options, "params": [p]}]))
                self._group_of[id(p)] = index
            filled = self.per_parameter[-1].param_groups[0] if params else {}
            # the group as the class fills it in (betas, eps, ...), so a schedule finds every key it sets
            groups.append({**{k: v for k, v in filled.items() if k != "params"}, **options, "params": params})
        defaults = dict(self.per_parameter[0].defaults) if self.per_parameter else {}
        super().__init__(groups, defaults)
        self._by_param = {id(opt.param_groups[0]["params"][0]): opt for opt in self.per_parameter}
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter)
                       for opt in self.per_parameter for p in opt.param_groups[0]["params"]]

    def _step_parameter(self, param: torch.Tensor) -> None:
        optimizer = self._by_param[id(param)]
        target = optimizer.param_groups[0]
        for key, value in self.param_groups[self._group_of[id(param)]].items():
            if key != "params":
                if isinstance(target.get(key), torch.Tensor) and not isinstance(value, torch.Tensor):
                    target[key].fill_(value)  # torchao keeps lr as a tensor (its compiled step reads it)
                elif key not in target or target[key] is not value:
                    target[key] = value
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing: each parameter stepped during backward."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to free: each gradient was freed once its parameter stepped."""

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self) -> Dict[str, Any]:
        return {
            "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
            "per_parameter": [optimizer.state_dict() for optimizer in self.per_parameter],
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict.get("per_parameter")
        if saved is None:
            raise ValueError("the optimizer state was saved without trainer.optimizer_in_backward")
        if len(saved) != len(self.per_parameter) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the optimizer state holds {len(saved)} parameters, this model trains {len(self.per_parameter)}")
        for optimizer, state in zip(self.per_parameter, saved):
            optimizer.load_state_dict(state)
        for group, values in zip(self.param_groups, state_dict["param_groups"]):
            group.update(values)
