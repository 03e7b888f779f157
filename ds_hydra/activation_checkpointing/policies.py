"""Which blocks each policy recomputes, as a list of checkpointed regions.

A region is a run of consecutive blocks recomputed together in backward: between forward and
backward it keeps only its input (``b`` bytes), and its recompute briefly re-creates the activations
of all its blocks. With L blocks, H bytes saved outside them, A bytes saved by one block, b its
input, S the op outputs a selective block keeps, G the parameter gradients, and 2b of backward
temporaries (bench/ckpt.py measures all of them and checks these formulas):

    policy                       kept after forward           step peak
    none                         H + L*A                      H + L*A + 2b
    segments=K, checkpoint_last  H + K*b                      H + b + ceil(L/K)*A + G + 2b
    segments=K (default)         H + (K-1)*b + s_K*A          the same as with checkpoint_last
    full (= segments=L, last)    H + L*b                      H + b + A + G + 2b
    every_n=n, m = L//n          H + m*b + (L-m)*A            kept + A + b (the last block's recompute)
    selective                    H + L*(b + S)                kept + (A - b - S) + 2b

s_K is the size of the last segment. Where blocks keep most of their activations (none, every_n,
selective) the peak comes at the start of backward, before gradients replace freed activations; with
segments it comes at the first segment's recompute, when every later segment's input is freed and
almost every gradient allocated. Leaving the last segment un-recomputed does not raise that peak
(its activations are freed by its own backward before any recompute starts): it skips the last
segment's recompute at no cost in peak. Recomputing it too only lowers what is held between forward
and backward, which matters with gradient accumulation or pipelining. Minimizing K*b + ceil(L/K)*A
gives K = sqrt(L*A/b); transformer blocks save A = 16-30 b, so for L up to ~20 that is per-block
checkpointing, not sqrt(L).
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
