"""DeepSpeed's own checkpoints (ZeRO shards, fp32 master weights, optimizer state), loaded as data.

DeepSpeed's checkpoint engine unpickles its files with ``torch.load(weights_only=False)``: a file planted
in a run directory could run code. ``weights_only_loads`` makes it read with ``weights_only=True``,
admitting the few classes DeepSpeed pickles besides tensors and plain containers, each rebuilt from
plain fields. The engine that writes and resumes these checkpoints is ``ds_hydra.engine.deepspeed_engine``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from typing import Iterator, Tuple

import torch

from ds_hydra.errors import UserError

__all__ = ["deepspeed_checkpoint_classes", "weights_only_loads"]


def deepspeed_checkpoint_classes() -> Tuple[type, ...]:
    """The classes DeepSpeed pickles into its own checkpoints besides tensors and plain containers, each
    rebuilt from plain fields (a scale, a flag, a stage number, an offset): a weights_only load allows
    exactly these, so a file naming any other class or function is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


@contextmanager
def weights_only_loads(ds_engine) -> Iterator[None]:
    """While DeepSpeed loads its checkpoint, its checkpoint engine reads with ``torch.load(weights_only=True)``
    instead of its own ``weights_only=False``: a run directory is data, and a pickle in it must not run code.
    A refused or damaged file is one line naming it."""
    checkpoint_engine = getattr(ds_engine, "checkpoint_engine", None)
    if checkpoint_engine is None or not callable(getattr(checkpoint_engine, "load", None)):
        import deepspeed

        raise UserError(
            f"engine=deepspeed: DeepSpeed {deepspeed.__version__} has no checkpoint engine ds_hydra can make load "
            f"with weights_only=True, so its checkpoint is not loaded; install a DeepSpeed with one (0.10 or newer)"
        )
    classes = list(deepspeed_checkpoint_classes())

    def load(path, map_location=None):
        scoped = getattr(torch.serialization, "safe_globals", None)  # torch 2.4: only the process-wide list
        if scoped is None:
            torch.serialization.add_safe_globals(classes)
        try:
            with scoped(classes) if scoped is not None else nullcontext():
                return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as exc:  # a pickle naming another class or a function, or a damaged file
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = (
                f"refused: loading it would call {found.group(1).removeprefix('builtins.')} (a DeepSpeed checkpoint "
                f"may hold only tensors, plain containers and DeepSpeed's loss scaler, ZeRO stage and fragment "
                f"address); use a checkpoint written by ds_hydra"
                if found else f"not a loadable DeepSpeed checkpoint ({lines[0][:200] if lines else type(exc).__name__})"
            )
            raise UserError(f"{path}: {reason}") from None

    checkpoint_engine.load = load  # this instance only: shadows the class's method
    try:
        yield
    finally:
        del checkpoint_engine.load
