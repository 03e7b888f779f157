"""Offloading saved activations to pinned host memory (``ckpt.offload`` / DeepSpeed's ``cpu_checkpointing``).

While the model's forward runs, ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` moves the
tensors autograd saves to pinned CPU memory and brings them back in backward. Parameters (and views
of them) stay where they are: they live on the device anyway, and copying the weights out and back
every step would only cost transfer time. Inside checkpointed regions torch's checkpoint hooks take
precedence (they save nothing there); a region's input is saved through the offload hook (torch >=
2.5). On a CPU model the activations are in host memory already, so offload does nothing and says so
once.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Set

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ds_hydra.activation_checkpointing.counter import note_kept, storage_of

log = logging.getLogger(__name__)

_KEEP = "ds_hydra.keep"  # packed marker: the tensor was not moved


class HostOffload(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, minus parameters, reporting each offloaded tensor to the open counters."""

    def __init__(self, device_type: str, keep: Set[int], copy_cpu_tensors: bool = False):
        try:
            super().__init__(pin_memory=True, device_type=device_type)
        except TypeError:  # torch without the device_type argument: CUDA only
            super().__init__(pin_memory=True)
        to_host, from_host = self.pack_hook, self.unpack_hook

        def pack(t: torch.Tensor):
            found = storage_of(t)
            if (t.is_leaf and t.requires_grad) or (found is not None and found[0] in keep):
                return (_KEEP, t.detach())  # a parameter or a view of one
            if t.device.type == "cpu" and not copy_cpu_tensors:
                note_kept(t)
                return (_KEEP, t.detach())
            note_kept(t, offloaded=True)
            return to_host(t)

        def unpack(packed):
            if packed[0] is _KEEP:
                return packed[1]
            return from_host(packed)

        self.pack_hook, self.unpack_hook = pack, unpack


class OffloadHooks:
    """Forward pre-hook and hook on the model that open and close the offloading context."""

    def __init__(self, model: nn.Module, _copy_on_cpu: bool = False):
        self.model = model
        self.copy_on_cpu = _copy_on_cpu  # exercise the copies on a CPU-only machine (tests)
        self.stack: List[Optional[HostOffload]] = []
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
        on_cpu = device.type == "cpu" and not self.copy_on_cpu
        if on_cpu or not torch.is_grad_enabled():
            if on_cpu and not self.noted_cpu:
                log.info("ckpt.offload: the model runs on the CPU, where activations already live in host memory; "
                         "offload does nothing")
                self.noted_cpu = True
            self.stack.append(None)
            return None
        keep = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            found = storage_of(t)
            if found is not None:
                keep.add(found[0])
        hooks = HostOffload("cuda" if device.type == "cpu" else device.type, keep, copy_cpu_tensors=self.copy_on_cpu)
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
