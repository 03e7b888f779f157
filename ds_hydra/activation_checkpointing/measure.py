"""Measuring what each block saves for backward (the probe), and counting what a plan keeps.

``probe`` runs one forward of the model on an example batch of the real shape, one block at a time
(each block's input is detached, so only one block's activations are alive at once), and records for
every block the bytes autograd saves (saved_tensors_hooks, storages deduplicated), the bytes of its
input, and the bytes selective checkpointing would keep (outputs of the ``save_ops``). Everything
saved outside the blocks (embeddings, final norm, loss) is H. The model, its buffers and the RNG
state are left as they were.

``ActivationProfile.kept_bytes(regions)`` is the exact bytes held between forward and backward for
a plan: H, plus every un-checkpointed block's saved bytes, plus each region's input (and, for a
selective region, its saved op outputs), each storage counted once: a sum of measured bytes, not a
model (tests hold it equal to what ``SavedActivationCounter`` counts), which is what
``MemoryBudget`` plans on. The step's peak is predicted in one place only: the memory estimate
replays the whole step on fake tensors (``ds_hydra.training.memory_estimate``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ds_hydra.activation_checkpointing.config import format_bytes
from ds_hydra.activation_checkpointing.counter import storage_of
from ds_hydra.activation_checkpointing.policies import Region
from ds_hydra.activation_checkpointing.selective import OpObserver, SaveOps
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class BlockProfile:
    """What one block saves for backward, in bytes (its input and output storages kept apart)."""

    input_bytes: int
    """b: the block's input (the first tensor argument; the hidden state)."""
    output_bytes: int
    inner_bytes: int
    """Saved storages other than the input and output."""
    saves_input: bool
    saves_output: bool
    selective_inner_bytes: int
    """Selective checkpointing: saved op outputs other than the block's output."""
    selective_saves_output: bool
    param_bytes: int
    """Bytes of the block's parameters that require grad (= its gradients' bytes)."""
    largest_bytes: int
    """The largest single storage it saves (sizes backward's temporary gradients)."""

    @property
    def saved_bytes(self) -> int:
        """A: everything the block saves, its input included."""
        return self.inner_bytes + self.input_bytes * self.saves_input + self.output_bytes * self.saves_output

    @property
    def selective_bytes(self) -> int:
        """What a selectively checkpointed block keeps: its input plus the saved op outputs."""
        return self.input_bytes + self.selective_inner_bytes + self.output_bytes * self.selective_saves_output


@dataclass
class ActivationProfile:
    blocks: List[BlockProfile]
    outside_bytes: int
    """Saved outside the blocks, except the first block's input and the last block's output."""
    outside_saves_first_input: bool
    outside_saves_last_output: bool
    external_bytes: int
    """Tensors passed to the blocks besides the hidden state (masks) that the blocks save, counted once."""
    passed_bytes: int
    """Every tensor passed to the blocks besides the hidden state (masks, rotary tables), counted once: a
    checkpointed region holds them for its recompute, whether or not the blocks save them."""
    outside_param_bytes: int
    """Gradients of the parameters outside the blocks (embeddings, head)."""
    ops: Set = field(default_factory=set)
    """Every op the blocks ran (OpOverloads), for checking ``save_ops``."""
    outside_largest_bytes: int = 0
    """The largest storage saved outside the blocks (a language model's logits or log-probabilities):
    backward's first gradients are of its size."""

    # -- the quantities of the formulas ----------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def H(self) -> int:
        """Bytes saved outside the blocks."""
        b0, last = self.blocks[0], self.blocks[-1]
        return (
            self.outside_bytes + self.external_bytes
            + b0.input_bytes * self.outside_saves_first_input + last.output_bytes * self.outside_saves_last_output
        )

    @property
    def A(self) -> float:
        """Mean bytes one block saves."""
        return sum(b.saved_bytes for b in self.blocks) / self.n_blocks

    @property
    def b(self) -> float:
        """Mean bytes of one block's input."""
        return sum(b.input_bytes for b in self.blocks) / self.n_blocks

    @property
    def S(self) -> float:
        """Mean bytes a selectively checkpointed block keeps besides its input."""
        return sum(b.selective_bytes - b.input_bytes for b in self.blocks) / self.n_blocks

    @property
    def gradient_bytes(self) -> int:
        return self.outside_param_bytes + sum(b.param_bytes for b in self.blocks)

    # -- predictions -----------------------------------------------------------------------------------
    def _modes(self, regions: Sequence[Region]) -> List[Optional[str]]:
        modes: List[Optional[str]] = [None] * self.n_blocks
        for r in regions:
            for i in range(r.start, r.end):
                modes[i] = "selective" if r.selective else "full"
        return modes

    def kept_bytes(self, regions: Sequence[Region]) -> int:
        """Bytes held between forward and backward with these regions checkpointed."""
        L, blocks, modes = self.n_blocks, self.blocks, self._modes(regions)
        starts = {r.start for r in regions}
        total = self.outside_bytes + (self.passed_bytes if regions else self.external_bytes)
        for block, mode in zip(blocks, modes):
            if mode is None:
                total += block.inner_bytes
            elif mode == "selective":
                total += block.selective_inner_bytes
        for k in range(L + 1):  # the boundary storages: block k's input (k = L: the last output)
            size = blocks[k].input_bytes if k < L else blocks[L - 1].output_bytes
            held = (
                (k < L and (k in starts or (modes[k] is None and blocks[k].saves_input)))
                or (k > 0 and modes[k - 1] is None and blocks[k - 1].saves_output)
                or (k > 0 and modes[k - 1] == "selective" and blocks[k - 1].selective_saves_output)
                or (k == 0 and self.outside_saves_first_input)
                or (k == L and self.outside_saves_last_output)
            )
            total += size * held
        return total

    def describe(self) -> str:
        return (
            f"H={format_bytes(self.H)} saved outside the blocks, b={format_bytes(self.b)} per block input, "
            f"A={format_bytes(self.A)} saved per block (A/b={self.A / max(self.b, 1):.1f})"
        )


# -- the probe ------------------------------------------------------------------------------------------
def _split_example(example_input) -> Tuple[tuple, dict]:
    if callable(example_input) and not isinstance(example_input, torch.Tensor):
        example_input = example_input()
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise UserError(
        f"example_input: expected a tensor, a tuple of arguments, a dict of keyword arguments or a callable "
        f"returning one, got {type(example_input).__name__}"
    )


def _first_tensor(obj) -> Optional[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def _detach(obj):
    def cut(t):
        if not isinstance(t, torch.Tensor):
            return t
        out = t.detach()
        return out.requires_grad_(True) if (t.requires_grad and out.is_floating_point()) else out

    return tree_map(cut, obj)


class _Probe:
    """Per-block bookkeeping of saved storages during the probe forward."""

    def __init__(self, model: nn.Module, save_ops: Optional[SaveOps]):
        self.exclude = set()
        for t in list(model.parameters()) + list(model.buffers()):
            found = storage_of(t)
            if found is not None:
                self.exclude.add(found[0])
        self.current: Optional[int] = None
        self.outside: Dict[int, tuple] = {}
        self.saved: Dict[int, tuple] = {}
        self.selected: Dict[int, tuple] = {}
        self.external: Dict[int, tuple] = {}
        self.passed: Dict[int, tuple] = {}
        self.external_ptrs: Set[int] = set()
        self.inputs: Dict[int, tuple] = {}
        self.keep_alive: List[object] = []
        self.profiles: Dict[int, BlockProfile] = {}
        self.last_output = None
        self.ops: Set = set()
        self.observer = OpObserver(save_ops, self._on_selected) if save_ops is not None else None

    def pack(self, t: torch.Tensor):
        found = storage_of(t)
        if found is not None and found[0] not in self.exclude:
            if found[0] in self.external_ptrs:
                self.external[found[0]] = found[1:]
            elif self.current is None:
                self.outside[found[0]] = found[1:]
            else:
                self.saved[found[0]] = found[1:]
        return t.detach()

    def _on_selected(self, t: torch.Tensor):
        if self.current is None:
            return
        found = storage_of(t)
        if found is not None and found[0] not in self.exclude and found[0] not in self.external_ptrs:
            self.selected[found[0]] = found[1:]

    def before(self, index: int, block: nn.Module, args, kwargs):
        args, kwargs = _detach(args), _detach(kwargs)
        hidden = _first_tensor((args, kwargs))
        if hidden is None:
            raise UserError(f"ckpt: block {index} ({type(block).__name__}) got no tensor argument; nothing to checkpoint")
        self.inputs[index] = storage_of(hidden)
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf is not hidden:
                found = storage_of(leaf)
                if found is not None and found[0] != self.inputs[index][0] and found[0] not in self.exclude:
                    self.external_ptrs.add(found[0])
                    self.passed[found[0]] = found[1:]
        if index == 0:
            self.keep_alive.append(self.inputs[0])
        self.current, self.saved, self.selected = index, {}, {}
        if self.observer is not None:
            self.observer.__enter__()
        return args, kwargs

    def after(self, index: int, block: nn.Module, output):
        if self.observer is not None:
            self.observer.__exit__(None, None, None)
            self.ops |= self.observer.ops
            self.observer.ops = set()
        out = _first_tensor(output)
        out_found = storage_of(out) if out is not None else None
        in_ptr, in_bytes = self.inputs[index][0], self.inputs[index][1]
        out_ptr, out_bytes = (out_found[0], out_found[1]) if out_found else (None, 0)
        boundary = {in_ptr, out_ptr}
        inner = sum(v[0] for k, v in self.saved.items() if k not in boundary)
        sel_inner = sum(v[0] for k, v in self.selected.items() if k not in boundary)
        params = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
        self.profiles[index] = BlockProfile(
            input_bytes=in_bytes,
            output_bytes=out_bytes,
            inner_bytes=inner,
            saves_input=in_ptr in self.saved,
            saves_output=out_ptr in self.saved,
            selective_inner_bytes=sel_inner,
            selective_saves_output=out_ptr in self.selected,
            param_bytes=params,
            largest_bytes=max((v[0] for v in self.saved.values()), default=0),
        )
        self.last_output = out_found
        self.current, self.saved, self.selected = None, {}, {}
        return _detach(output)


def running_stat_buffers(modules) -> List[torch.Tensor]:
    """Buffers a forward pass updates in place: running statistics of batch/instance norms."""
    found = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
                found += [b for b in (sub.running_mean, sub.running_var, sub.num_batches_tracked) if b is not None]
    return found


class restore_buffers:
    """Put the given buffers back as they were on exit (a recompute or probe must not update them twice).

    The copies are made outside any dispatch mode: inside a selective recompute, torch's caching mode
    would otherwise take them for ops of the block."""

    def __init__(self, buffers: List[torch.Tensor]):
        self.buffers = buffers

    def __enter__(self):
        with _no_dispatch_modes(), torch.no_grad():
            self.copies = [b.clone() for b in self.buffers]
        return self

    def __exit__(self, *exc):
        with _no_dispatch_modes(), torch.no_grad():
            for b, c in zip(self.buffers, self.copies):
                b.copy_(c)
        return False


def _no_dispatch_modes():
    from torch.utils import _python_dispatch

    disable = getattr(_python_dispatch, "_disable_current_modes", None)
    return disable() if disable is not None else contextlib.nullcontext()


def probe(
    model: nn.Module, blocks: Sequence[nn.Module], example_input, save_ops: Optional[SaveOps] = None,
    forward: Optional[Callable] = None,
) -> ActivationProfile:
    """Measure what each block saves for backward on ``example_input`` (see the module docstring).

    ``forward(*args, **kwargs)`` runs the example (default: the model itself); the trainer passes its
    loss step, so that the loss's saved bytes are counted with what lies outside the blocks."""
    args, kwargs = _split_example(example_input)
    state = _Probe(model, save_ops)
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: state.before(i, m, a, k), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: state.after(i, m, o)))
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), restore_buffers(list(model.buffers())), \
                torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(state.pack, lambda t: t):
            output = (forward or model)(*args, **kwargs)
            last_output = state.last_output
            del output
    finally:
        for handle in handles:
            handle.remove()
        if state.observer is not None and state.current is not None:
            state.observer.__exit__(None, None, None)
    if len(state.profiles) != len(blocks):
        missing = sorted(set(range(len(blocks))) - set(state.profiles))
        raise UserError(
            f"ckpt: the probe forward did not run blocks {missing[:10]} of the block list; checkpointing needs "
            f"every block to run once per forward (name the right list with ckpt.blocks)"
        )
    first_ptr = state.inputs[0][0]
    last_ptr = last_output[0] if last_output else None
    outside = {k: v for k, v in state.outside.items() if k not in (first_ptr, last_ptr)}
    block_params = {id(p) for block in blocks for p in block.parameters()}
    outside_params = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and id(p) not in block_params
    )
    return ActivationProfile(
        blocks=[state.profiles[i] for i in range(len(blocks))],
        outside_bytes=sum(v[0] for v in outside.values()),
        outside_largest_bytes=max((v[0] for v in outside.values()), default=0),
        outside_saves_first_input=first_ptr in state.outside,
        outside_saves_last_output=last_ptr in state.outside,
        # a tensor saved outside the blocks too (position ids, indexed by an embedding) is counted there only
        external_bytes=sum(v[0] for k, v in state.external.items() if k not in state.outside),
        passed_bytes=sum(v[0] for k, v in state.passed.items() if k not in state.outside),
        outside_param_bytes=outside_params,
        ops=state.ops,
    )
