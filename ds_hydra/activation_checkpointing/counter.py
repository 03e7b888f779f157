"""Counting the bytes a forward pass keeps for backward, at no cost to the pass itself.

``SavedActivationCounter`` is a ``saved_tensors_hooks`` context: every tensor autograd saves is passed
to its pack hook, which records the bytes of the tensor's storage (each storage once, however many
views of it are saved) and hands the tensor back unchanged. Parameters and buffers are not
activations and are left out. Checkpointed regions keep their inputs and, under selective
checkpointing, the outputs of the saved ops; the checkpointing code reports those through
``note_kept`` so the count is the whole of what is held between forward and backward.

    with SavedActivationCounter(model) as saved:
        loss = loss_fn(model(x), y)
    saved.bytes          # what backward will need, in bytes
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

# The open counters, innermost last (a plain module list: torch.compile reads it without a graph break).
_ACTIVE: List["SavedActivationCounter"] = []


def active_counters() -> List["SavedActivationCounter"]:
    """The open counters (innermost last); empty almost always."""
    return _ACTIVE


def storage_of(t: torch.Tensor):
    """(key, bytes, storage) of the memory behind ``t``, or None if it has none to count.

    The key is the data pointer; tensors without data (meta and fake tensors: shapes only, what the
    memory preflight probes with) are told apart by their storage object instead, which every view
    of one storage shares."""
    try:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        key = ("storage", storage._cdata) if _shapes_only(t) else storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse or functional tensors
        return None
    if nbytes == 0:
        return None
    return key, nbytes, storage


def _shapes_only(t: torch.Tensor) -> bool:
    return t.is_meta or isinstance(t, FakeTensor)


def note_kept(obj, offloaded: bool = False) -> None:
    """Tell the open counters that the tensors in ``obj`` (any nesting) are kept for backward."""
    counters = active_counters()
    if not counters:
        return
    for leaf in tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            for counter in counters:
                counter.add(leaf, offloaded=offloaded)


class SavedActivationCounter(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes saved for backward inside the ``with`` block (storages deduplicated).

    ``bytes``: everything kept for backward; ``offloaded_bytes``: the part moved to host memory by
    ``offload``; ``tensors``: how many saved tensors were seen. Storages of ``model``'s parameters and
    buffers, and leaf tensors that require grad, are not counted.
    """

    def __init__(self, model: Optional[nn.Module] = None):
        self.bytes = 0
        self.offloaded_bytes = 0
        self.tensors = 0
        self._seen: Dict[int, object] = {}
        self._exclude = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                found = storage_of(t)
                if found is not None:
                    self._exclude.add(found[0])
        super().__init__(self._pack, _unpack)

    def _pack(self, t: torch.Tensor):
        self.add(t)
        return t.detach()  # an alias: the graph keeps the same memory, with no reference cycle through grad_fn

    def add(self, t: torch.Tensor, offloaded: bool = False) -> None:
        self.tensors += 1
        if t.is_leaf and t.requires_grad:
            return  # a parameter (or another leaf the caller owns): not an activation
        found = storage_of(t)
        if found is None or found[0] in self._exclude or found[0] in self._seen:
            return
        ptr, nbytes, storage = found
        self._seen[ptr] = storage  # held until exit, so a freed address cannot be mistaken for a new one
        self.bytes += nbytes
        if offloaded:
            self.offloaded_bytes += nbytes

    def __enter__(self):
        super().__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._seen = {}
        return False


def _unpack(t):
    return t


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        found = storage_of(t)
        if found is not None:
            seen[found[0]] = found[1]
    return sum(seen.values())
