"""The default process group: created, left (noting when this rank failed), and the device each rank takes.

A launcher (torchrun, the deepspeed launcher, a cluster script) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``ds_hydra.common.launch_env`` reads them (torch-free). The process group
is created here unless a launcher-aware caller
(``ds_hydra.cli.launch``, before Hydra runs) already did; started without a launcher, an engine
that needs a group runs as a one-process group on an in-memory store.
"""
from __future__ import annotations

from datetime import timedelta

import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ds_hydra.common import launch_env
from ds_hydra.errors import UserError

__all__ = [
    "PROCESS_GROUP_TIMEOUT",
    "is_main_process",
    "init_process_group",
    "rank_device",
    "leave_process_group",
    "failed_at",
]

# Collectives wait this long before failing (a rank saving a large checkpoint keeps the others waiting).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def is_main_process() -> bool:
    """Rank 0 (the only writer of run files); true in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launch_env.rank() == 0


def init_process_group(device: torch.device) -> bool:
    """Create the default process group unless one exists; returns whether this call created it.

    Launched: from the launcher's environment (env://). Otherwise a one-process group on an
    in-memory store (no port to pick, nothing to clash with).
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launch_env.launched():
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=PROCESS_GROUP_TIMEOUT)
    return True


def rank_device(device: torch.device) -> torch.device:
    """Under a launcher every rank takes ``cuda:LOCAL_RANK``; other devices are shared as they are."""
    if device.type != "cuda":
        return device
    local = launch_env.local_rank()
    if launch_env.world_size() > 1 and device.index is not None and device.index != local:
        raise UserError(
            f"trainer.device={device}: with several processes each rank uses cuda:LOCAL_RANK; set trainer.device=cuda or auto"
        )
    if local >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local}: this machine has {torch.cuda.device_count()} GPUs; start at most that many "
            "processes per node (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


FAILED_AT = "ds_hydra_failed_at"  # the attribute leave_process_group sets on the error in flight


def leave_process_group(dist) -> None:
    """Destroy the default process group; with an exception in flight, note on it when this rank failed.

    The other ranks fail only after this (their collectives lose this peer), so the launcher can tell
    which rank failed first even when a later failure is reported sooner. The time travels up with the
    error itself (``failed_at`` reads it back): nothing of one run stays behind in the process."""
    error = sys.exc_info()[1]
    if error is not None and getattr(error, FAILED_AT, None) is None:
        try:
            setattr(error, FAILED_AT, time.time())
        except AttributeError:  # an exception type that takes no attributes: no time to report
            pass
    dist.destroy_process_group()


def failed_at(error: Optional[BaseException]) -> Optional[float]:
    """When this rank failed with its process group up (``time.time()``), or None: the earliest time
    noted on ``error`` or on the errors it was raised while handling (``sys.exit`` in an ``except``)."""
    times, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, FAILED_AT, None) is not None:
            times.append(getattr(error, FAILED_AT))
        error = error.__context__ or error.__cause__
    return min(times) if times else None
