"""Offloading saved activations to pinned host memory (``ckpt.offload`` / DeepSpeed's ``cpu_checkpointing``).

While the model's forward runs, ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` moves every
tensor autograd saves to pinned CPU memory and brings it back in backward. Inside checkpointed regions
torch's checkpoint hooks take precedence (they save nothing there); a region's input is saved through
the offload hook (torch >= 2.5). On a CPU model the activations are in host memory already, so
offload does nothing and says so once.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ds_hydra.activation_checkpointing.counter import note_kept

log = logging.getLogger(__name__)


class _CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu that also reports each offloaded tensor to the open activation counters."""

    def __init__(self, device_type: str):
        try:
            super().__init__(pin_memory=True, device_type=device_type)
        except TypeError:  # torch without the device_type argument: CUDA only
            super().__init__(pin_memory=True)
        to_host = self.pack_hook

        def pack(t: torch.Tensor):
            note_kept(t, offloaded=True)
            return to_host(t)

        self.pack_hook = pack


class Offload:
    """Forward pre-hook and hook on the model that open and close the offloading context."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stack: List[Optional[_CountingSaveOnCpu]] = []
        self.noted_cpu = False
        self.handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _device(self, args, kwargs) -> torch.device:
        tensor = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
        if tensor is None:
            tensor = next(self.model.parameters(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _enter(self, module, args, kwargs):
        device = self._device(args, kwargs)
        if device.type == "cpu" or not torch.is_grad_enabled():
            if device.type == "cpu" and not self.noted_cpu:
                log.info("ckpt.offload: the model runs on the CPU, where activations already live in host memory; "
                         "offload does nothing")
                self.noted_cpu = True
            self.stack.append(None)
            return None
        hooks = _CountingSaveOnCpu(device.type)
        hooks.__enter__()
        self.stack.append(hooks)
        return None

    def _exit(self, module, args, output):
        hooks = self.stack.pop() if self.stack else None
        if hooks is not None:
            hooks.__exit__(None, None, None)
        return None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
