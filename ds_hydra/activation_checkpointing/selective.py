"""Per-op selective checkpointing: keep the outputs of expensive ops, recompute the cheap ones.

Built on torch's ``create_selective_checkpoint_contexts`` (torch >= 2.5). ``save_ops`` names are
resolved to aten operators once; a name that is not an operator is an error at once, and a name
that matches no op the checkpointed blocks run is an error after the first forward (or at
``checkpoint_activations`` time when an example input lets the probe see the ops).

Random ops are never saved, whatever the list says: the recompute replays the RNG state from the
start of the block, so skipping one random op would shift every later dropout mask. Attention with
``dropout_p > 0`` is therefore recomputed; with ``dropout_p == 0`` it is saved.
"""
from __future__ import annotations

import difflib
from contextlib import ExitStack
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ds_hydra.activation_checkpointing.config import DEFAULT_SAVE_OPS
from ds_hydra.activation_checkpointing.counter import active_counters, note_kept
from ds_hydra.errors import UserError

_sac = getattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts", None)
_Policy = getattr(torch.utils.checkpoint, "CheckpointPolicy", None)


def is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def selective_available() -> bool:
    """Whether this torch has the selective-checkpoint API (2.5 and later)."""
    return _sac is not None and _Policy is not None


def require_selective() -> None:
    """Refuse ckpt.selective, naming the torch it needs, when this torch lacks the API."""
    if not selective_available():
        raise UserError(
            f"ckpt.selective=true: needs torch >= 2.5 (torch.utils.checkpoint.create_selective_checkpoint_contexts); "
            f"this is torch {torch.__version__}"
        )


ALIASES = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "_int_mm"),
    "attention": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ),
}


def _namespace_op(namespace: str, name: str):
    ns = getattr(torch.ops, namespace, None)
    if ns is None:
        return None
    try:
        return getattr(ns, name)
    except (AttributeError, RuntimeError):
        return None


class SaveOps:
    """The resolved ``save_ops`` list: each entry becomes a set of operator packets or overloads."""

    def __init__(self, names: Optional[Iterable[str]]):
        self.strict = names is not None
        """Every entry must match an op (a list the user gave); the default needs only one match."""
        if names is None:
            names = DEFAULT_SAVE_OPS
        self.entries: Dict[str, Tuple[FrozenSet, FrozenSet]] = {}
        for name in names:
            self.entries[str(name)] = self._resolve(str(name))
        self.packets = frozenset().union(*(p for p, _ in self.entries.values())) if self.entries else frozenset()
        self.overloads = frozenset().union(*(o for _, o in self.entries.values())) if self.entries else frozenset()

    @staticmethod
    def _resolve(name: str):
        if name in ALIASES:
            packets = [_namespace_op("aten", op) for op in ALIASES[name]]
            return frozenset(p for p in packets if p is not None), frozenset()
        text = name.replace("::", ".")
        parts = text.split(".")
        if len(parts) == 1:
            parts = ["aten", *parts]
        namespace, op_name, overload = parts[0], parts[1], ".".join(parts[2:]) or None
        packet = _namespace_op(namespace, op_name)
        if packet is None or not hasattr(packet, "overloads"):
            known = list(ALIASES) + [f"aten.{n}" for n in ("mm", "addmm", "bmm", "baddbmm", "convolution")]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"ckpt.save_ops: {name!r} is not an operator{hint}; use the aliases {', '.join(ALIASES)} or aten "
                f"names like aten.mm or aten.mm.default"
            )
        if overload is None:
            return frozenset([packet]), frozenset()
        try:
            return frozenset(), frozenset([getattr(packet, overload)])
        except AttributeError:
            raise UserError(
                f"ckpt.save_ops: {name!r}: {namespace}.{op_name} has no overload {overload!r}; "
                f"it has {', '.join(packet.overloads())}"
            ) from None

    def matches(self, func) -> bool:
        return func in self.overloads or getattr(func, "overloadpacket", None) in self.packets

    def unmatched(self, ops_run: Set) -> List[str]:
        """Entries that match none of the ops in ``ops_run`` (OpOverloads)."""
        packets_run = {getattr(f, "overloadpacket", None) for f in ops_run}
        return [
            name for name, (packets, overloads) in self.entries.items()
            if not (packets & packets_run or overloads & ops_run)
        ]


def is_random(func, args, kwargs) -> bool:
    """Whether running ``func`` draws random numbers (SDPA kernels only when their dropout_p > 0)."""
    tags = getattr(func, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    schema = getattr(func, "_schema", None)
    if schema is not None:
        for i, arg in enumerate(schema.arguments):
            if arg.name == "dropout_p":
                value = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
                return bool(value)
    return True


def saved_by_policy(save_ops: SaveOps, func, args, kwargs) -> bool:
    return save_ops.matches(func) and not is_random(func, args, kwargs)


class OpRecorder:
    """Collects the ops the selective policy sees, so ``save_ops`` entries can be checked once."""

    def __init__(self):
        self.ops: Set = set()
        self.regions_run: Set[int] = set()
        self.checked = False


def make_context_fn(save_ops: SaveOps, recorder: Optional[OpRecorder]):
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: torch's selective contexts, plus a
    counting mode (only while a ``SavedActivationCounter`` is open) that reports the saved outputs."""
    require_selective()
    must_save, recompute = _Policy.MUST_SAVE, _Policy.PREFER_RECOMPUTE

    def policy(ctx, func, *args, **kwargs):
        if recorder is not None and not recorder.checked:
            recorder.ops.add(func)
        return must_save if saved_by_policy(save_ops, func, args, kwargs) else recompute

    def context_fn():
        forward_ctx, recompute_ctx = _sac(policy)
        if active_counters() and not is_compiling():
            return _Both(forward_ctx, _CountSaved(save_ops)), recompute_ctx
        return forward_ctx, recompute_ctx

    return context_fn


class _CountSaved(TorchDispatchMode):
    """Above torch's caching mode: reports the outputs the policy saves to the open counters."""

    def __init__(self, save_ops: SaveOps):
        super().__init__()
        self.save_ops = save_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if saved_by_policy(self.save_ops, func, args, kwargs):
            note_kept(out)
        return out


class _Both:
    """Enter two context managers as one (the second innermost)."""

    def __init__(self, first, second):
        self.contexts = (first, second)
        self._stack = None

    def __enter__(self):
        self._stack = ExitStack()
        for ctx in self.contexts:
            self._stack.enter_context(ctx)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


class OpObserver(TorchDispatchMode):
    """For the probe: records each op run and the outputs the selective policy would keep."""

    def __init__(self, save_ops: Optional[SaveOps], on_saved):
        super().__init__()
        self.save_ops = save_ops
        self.on_saved = on_saved
        self.ops: Set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.add(func)
        if self.save_ops is not None and saved_by_policy(self.save_ops, func, args, kwargs):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.on_saved(leaf)
        return out


def check_matched(save_ops: SaveOps, ops_run: Set) -> None:
    """Raise if an entry of a given ``save_ops`` list (or, for the default list, every entry) matched
    none of the ops the checkpointed blocks ran."""
    missing = save_ops.unmatched(ops_run)
    if not missing or (not save_ops.strict and len(missing) < len(save_ops.entries)):
        return
    names = sorted({str(getattr(f, "overloadpacket", f)) for f in ops_run})
    interesting = [n for n in names if not n.startswith(("aten.view", "aten.t", "aten.detach", "aten._unsafe"))]
    raise UserError(
        f"ckpt.save_ops: {', '.join(missing)} matched no op run by the checkpointed blocks, so selective "
        f"checkpointing would keep nothing for {'it' if len(missing) == 1 else 'them'}; the blocks ran: "
        f"{', '.join(interesting[:40])}"
    )
