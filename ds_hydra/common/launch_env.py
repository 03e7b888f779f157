"""This process's place among launched processes, read from the environment a launcher sets
(torchrun, the deepspeed launcher, a cluster script: RANK, WORLD_SIZE, LOCAL_RANK). Torch-free, so
the CLI can ask before it imports torch; the one place that reads these variables."""
from __future__ import annotations

import os

__all__ = ["launched", "world_size", "rank", "local_rank", "local_world_size", "multi_process", "other_rank"]


def launched() -> bool:
    """Whether a launcher started this process (it sets both RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def rank() -> int:
    return int(os.environ["RANK"]) if launched() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def local_world_size() -> int:
    """How many processes the launcher started on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def multi_process() -> bool:
    """Whether a launcher started several processes."""
    return world_size() > 1


def other_rank() -> bool:
    """A process of a multi-process launch other than rank 0 (rank 0 alone checks and writes shared files)."""
    return multi_process() and rank() != 0
