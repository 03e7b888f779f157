"""Which blocks each policy recomputes, as a list of checkpointed regions.

A region is a run of consecutive blocks recomputed together in backward: between forward and
backward it keeps only its input (``b`` bytes), and its recompute briefly holds the activations of
all its blocks. With L blocks, H bytes saved outside them, A bytes saved by one block and b its input:

    policy                         kept after forward            step peak (before gradients)
    none                           H + L*A                       H + L*A
    segments=K (last not ckpt)     H + (K-1)*b + s_K*A           H + (K-1)*b + max(s_K, s_i)*A
    segments=K, checkpoint_last    H + K*b                       H + K*b + ceil(L/K)*A
    full (= per-block)             H + L*b                       H + L*b + A
    every_n=n                      H + m*b + (L-m)*A, m=L//n     about the kept bytes
    selective                      H + L*(b + S)                 + (A - S) for one block

where s_i is the number of blocks in segment i (s_K the last) and S the bytes of the saved op outputs
of one block. Leaving the last segment un-recomputed does not raise the peak (its activations are
freed by its backward before any recompute starts) but saves its recompute; recomputing it too only
lowers what is held between forward and backward (with gradient accumulation or pipelining).
For ``segments=K`` (all checkpointed) the peak H + K*b + (L/K)*A is smallest at K = sqrt(L*A/b);
transformer blocks save A = 18-30 b, so for L up to ~20 that is per-block checkpointing, not sqrt(L).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Region:
    """Blocks ``start .. end-1`` run under one checkpoint; ``selective`` keeps the saved ops' outputs."""

    start: int
    end: int
    selective: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        blocks = f"block {self.start}" if self.size == 1 else f"blocks {self.start}-{self.end - 1}"
        return blocks + (" (selective)" if self.selective else "")


def segment_sizes(n_blocks: int, segments: int) -> List[int]:
    """Contiguous segment sizes differing by at most one, the larger ones first (so an un-recomputed
    last segment is a small one)."""
    q, r = divmod(n_blocks, segments)
    return [q + 1] * r + [q] * (segments - r)


def segment_regions(n_blocks: int, segments: int, checkpoint_last: bool, selective: bool = False) -> List[Region]:
    regions, start = [], 0
    for size in segment_sizes(n_blocks, segments):
        regions.append(Region(start, start + size, selective))
        start += size
    return regions if checkpoint_last else regions[:-1]


def per_block_regions(indices, selective: bool = False) -> List[Region]:
    return [Region(i, i + 1, selective) for i in indices]


def every_n_blocks(n_blocks: int, n: int) -> List[int]:
    """Every n-th block, counting from one: n-1, 2n-1, ... (a function of the index only: no shared state)."""
    return [i for i in range(n_blocks) if (i + 1) % n == 0]


def best_segment_count(n_blocks: int, block_saved: float, block_input: float) -> int:
    """K minimizing K*b + ceil(L/K)*A, near sqrt(L*A/b), clamped to 1..L."""
    if block_input <= 0:
        return n_blocks
    return min(range(1, n_blocks + 1), key=lambda k: (k * block_input + math.ceil(n_blocks / k) * block_saved, -k))
