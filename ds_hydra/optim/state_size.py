"""How many bytes an optimizer keeps for a set of parameters, without building it at their size.

8-bit and 4-bit optimizers (bitsandbytes, torchao) quantize a tensor's state only above a size
(4,096 elements) and keep a scale per block; Adafactor keeps a row and a column vector per matrix.
So the state is not a fixed multiple of the parameter bytes, and a probe on one small tensor
(what an fp32 AdamW allows) is wrong for them by up to 4x. ``optimizer_state_bytes`` asks the
optimizer itself, for each distinct (shape, dtype) among the trainable parameters:

* a parameter of at most ``PROBE_ELEMENTS`` elements is probed at its real shape: one real step of
  the real optimizer class, and the bytes of the state it then holds (tensor subclasses counted by
  their inner tensors);
* a larger one is probed at two shapes with fewer rows (its leading dimension cut so that each has
  at most ``PROBE_ELEMENTS`` elements) and the state extrapolated linearly in the rows: exact for
  elementwise states, blockwise-quantized ones (above their threshold, as both probes are) and
  factored ones (rows + columns);
* torchao's low-bit optimizers (``_new_buffer``) are asked for their state buffers directly, on the
  meta device: their step compiles a kernel per shape, which would make a probe take minutes.

State the optimizer shares between parameters (bitsandbytes' quantization maps) is counted once.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

PROBE_ELEMENTS = 1 << 18  # per probe tensor (1 MiB in fp32): large enough to be above every quantization threshold

Shape = Tuple[int, ...]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (quantized states and weights) by its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _leaves(t: torch.Tensor) -> Iterable[torch.Tensor]:
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def state_bytes_by_parameter(optimizer: torch.optim.Optimizer) -> Tuple[Dict[int, int], int]:
    """({id(parameter): bytes of its own state}, bytes of state shared by several parameters), for
    an optimizer that has stepped. Scalars (a step count) are left out: they are a few bytes."""
    owners: Dict[int, set] = {}
    sizes: Dict[int, int] = {}
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                for leaf in _leaves(value):
                    key = leaf.untyped_storage().data_ptr() if leaf.device.type != "meta" else id(leaf)
                    owners.setdefault(key, set()).add(id(param))
                    sizes[key] = leaf.untyped_storage().nbytes() if leaf.device.type != "meta" else tensor_bytes(leaf)
    own: Dict[int, int] = {id(p): 0 for p in optimizer.state}
    shared = 0
    for key, holders in owners.items():
        if len(holders) > 1:
            shared += sizes[key]
        else:
            own[next(iter(holders))] += sizes[key]
    return own, shared


def optimizer_state_bytes(make_optimizer: Callable[[List[torch.Tensor]], torch.optim.Optimizer],
                          params: Sequence[Tuple[Shape, torch.dtype]], per_parameter: bool = False) -> Tuple[int, str]:
    """(bytes of state ``make_optimizer`` keeps for trainable parameters of these (shape, dtype)s, the
    step's kernel it is built with: fused, foreach or loop). ``per_parameter``: one optimizer per
    parameter (``optimizer_in_backward``), so state an optimizer shares is held once per parameter."""
    counts: Dict[Tuple[Shape, torch.dtype], int] = {}
    for shape, dtype in params:
        key = (tuple(int(d) for d in shape), dtype)
        counts[key] = counts.get(key, 0) + 1
    probe = _Probe(make_optimizer, per_parameter)
    for shape, dtype in counts or {((1,), torch.float32): 0}:  # no trainable parameters: still its kernel
        probe.add(shape, dtype)
    per_shape, shared, kind = probe.run()
    return (shared + sum(per_shape[key] * n for key, n in counts.items()) if counts else 0), kind


class _Probe:
    """One optimizer over small real tensors standing for each (shape, dtype); see the module docstring."""

    def __init__(self, make_optimizer, per_parameter: bool = False):
        self.make_optimizer = make_optimizer
        self.per_parameter = per_parameter  # one optimizer per tensor: nothing is shared between them
        self.tensors: List[Tuple[Tuple[Shape, torch.dtype], int, nn.Parameter]] = []  # (key, rows, tensor)

    def add(self, shape: Shape, dtype: torch.dtype) -> None:
        numel = 1
        for d in shape:
            numel *= d
        if numel <= PROBE_ELEMENTS or not shape:
            rows_list = [shape[0] if shape else 1] * 2  # twice: state shared between parameters shows as such
        else:
            row = numel // shape[0]
            high = max(2, PROBE_ELEMENTS // row)
            rows_list = [high // 2, high]
        for rows in rows_list:
            probe_shape = (rows, *shape[1:]) if shape else ()
            self.tensors.append(((shape, dtype), rows, nn.Parameter(torch.zeros(probe_shape, dtype=dtype))))

    def run(self) -> Tuple[Dict[Tuple[Shape, torch.dtype], int], int, str]:
        params = [t for _, _, t in self.tensors]
        own: Dict[int, int] = {}
        shared = 0
        for group in ([p] for p in params) if self.per_parameter else [params]:
            optimizer = self._stepped(group)
            group_own, group_shared = state_bytes_by_parameter(optimizer)
            own.update(group_own)
            shared += group_shared
        by_key: Dict[Tuple[Shape, torch.dtype], List[Tuple[int, int]]] = {}
        for key, rows, t in self.tensors:
            by_key.setdefault(key, []).append((rows, own.get(id(t), 0)))
        result = {}
        for (shape, dtype), samples in by_key.items():
            (r1, b1), (r2, b2) = samples
            if r1 == r2:
                result[(shape, dtype)] = b1
            else:  # linear in the rows, out to the real leading dimension
                result[(shape, dtype)] = int(round(b1 + (b2 - b1) * (shape[0] - r1) / (r2 - r1)))
        defaults = optimizer.defaults
        kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "loop"
        return result, shared, kind

    def _stepped(self, params: List[nn.Parameter]) -> torch.optim.Optimizer:
        if hasattr(_optimizer_class(self.make_optimizer), "_new_buffer"):
            return self._torchao_state(params)
        optimizer = self.make_optimizer(params)
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()
        return optimizer

    def _torchao_state(self, params: List[nn.Parameter]) -> torch.optim.Optimizer:
        """torchao's low-bit AdamW: its state buffers as its step would create them (no compile)."""
        optimizer = self.make_optimizer(params)
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state[p]
                state["exp_avg"] = optimizer._new_buffer(p, True)
                state["exp_avg_sq"] = optimizer._new_buffer(p, False)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = optimizer._new_buffer(p, False)
        return optimizer


# Temporaries of one tensor's step that the optimizer's own kernel allocates outside torch (so no probe on
# fake or real tensors sees them), in bytes per element of that tensor, measured by the peak resident size
# of a step on a 28M-element tensor (bitsandbytes 0.50's CPU backend dequantizes both moments and the
# gradient to fp32 copies: 24 bytes per element in bf16, 20 in fp32; on CUDA its fused kernel has none).
KERNEL_TEMPORARIES_PER_ELEMENT = {("bitsandbytes.", "cpu"): 24}


def kernel_temporaries_per_element(make_optimizer, device_type: str) -> int:
    """Bytes per element of the tensor being stepped that the optimizer's kernel allocates unseen (0: none known)."""
    module = getattr(_optimizer_class(make_optimizer), "__module__", "") or ""
    return next((n for (prefix, dev), n in KERNEL_TEMPORARIES_PER_ELEMENT.items()
                 if module.startswith(prefix) and dev == device_type), 0)


def _optimizer_class(make_optimizer):
    """The class under a (nested) ``functools.partial``."""
    while hasattr(make_optimizer, "func"):
        make_optimizer = make_optimizer.func
    return make_optimizer
