"""Batches of token windows: random windows (nanoGPT's ``get_batch``) or sequential epochs.

A sampler's ``next_batch(device)`` returns ``{"input_ids": (B, T), "labels": (B, T)}`` (int64) where
``labels[:, t]`` is the token after ``input_ids[:, t]``; ``state_dict()``/``load_state_dict()`` capture
the position exactly, so a resumed run draws the batches the uninterrupted one would have.

Ranks share one stream of global micro-batches and split it: rank ``r``'s ``m``-th call takes global
micro-batch ``r + world_size * m``. So 2 ranks with one micro-batch each see exactly what 1 process
with ``grad_accum_steps=2`` sees, ranks never draw the same micro-batch, and every rank's state is
the same (a rank-0 checkpoint resumes all of them, at any world size).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ds_hydra.data.token_source import TokenSource


def _check_rank(rank: int, world_size: Optional[int]) -> int:
    world_size = rank + 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
    return world_size


def to_device(batch: Dict[str, torch.Tensor], device: torch.device, pin: bool) -> Dict[str, torch.Tensor]:
    """The batch on ``device``; through pinned memory on CUDA, so the copy overlaps compute."""
    if device.type == "cuda":
        return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def shifted(windows: np.ndarray) -> Dict[str, torch.Tensor]:
    """Windows of T + 1 tokens as inputs (the first T) and labels (the last T)."""
    blocks = torch.from_numpy(windows.astype(np.int64, copy=False))  # (B, T + 1)
    return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}


class RandomWindows:
    """``batch_size`` windows of ``seq_len + 1`` tokens at uniform random offsets (nanoGPT's ``get_batch``).

    The generator is seeded from (seed, stream): each split has its own reproducible sequence. Every
    rank draws all ranks' offsets, in the same order, and keeps its own.
    """

    def __init__(self, tokens: TokenSource, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        if len(tokens) <= seq_len:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than seq_len + 1 = {seq_len + 1}")
        self.world_size = _check_rank(rank, world_size)
        self.tokens, self.seq_len, self.batch_size, self.rank = tokens, seq_len, batch_size, rank
        self.generator = torch.Generator().manual_seed(mix_seed(seed, stream))
        self.pin = torch.cuda.is_available()

    def next_batch(self, device: torch.device) -> Dict[str, torch.Tensor]:
        high = len(self.tokens) - self.seq_len
        for r in range(self.world_size):
            drawn = torch.randint(high, (self.batch_size,), generator=self.generator)
            if r == self.rank:
                offsets = drawn
        return to_device(shifted(self.tokens.windows(offsets.numpy(), self.seq_len + 1)), device, self.pin)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class _Epochs:
    """Epochs over ``n`` items in batches of ``batch_size``. The run's global batches are numbered
    from 0; rank ``r``'s ``m``-th call takes global batch ``start + r + world_size * m``, whose items
    are visits ``g * batch_size ...`` of the epoch order. The state is the number of global batches
    taken (one integer), so it resumes at any world size."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, rank: int, world_size: Optional[int], shuffle: bool):
        self.world_size = _check_rank(rank, world_size)
        self.batch_size, self.rank = batch_size, rank
        self.order = EpochOrder(n, mix_seed(seed, stream), shuffle)
        self.start, self.calls = 0, 0  # global batches taken before this sampler; its calls since
        self.pin = torch.cuda.is_available()

    def _next_items(self) -> np.ndarray:
        global_batch = self.start + self.rank + self.world_size * self.calls
        self.calls += 1
        return self.order(global_batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64))

    def batches_taken(self) -> int:
        """Global batches drawn by all ranks together so far."""
        return self.start + self.world_size * self.calls

    def epoch(self) -> float:
        """Epochs completed by the whole run so far."""
        return self.batches_taken() * self.batch_size / self.order.n

    def state_dict(self) -> Dict[str, int]:
        return {"batches": self.batches_taken()}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.start, self.calls = int(state["batches"]), 0


class SequentialWindows(_Epochs):
    """Epochs over the non-overlapping windows of the stream: window ``i`` is tokens
    ``[i*T, i*T + T + 1)``, so every token is an input once per epoch (the last ``< T`` are left out).

    With ``shuffle`` each epoch visits the windows in its own seeded order (a permutation computed
    per index: no memory that grows with the corpus), else in file order.
    """

    def __init__(self, tokens: TokenSource, seq_len: int, batch_size: int, seed: int, stream: int = 0,
                 rank: int = 0, world_size: Optional[int] = None, shuffle: bool = True):
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < 1:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than seq_len + 1 = {seq_len + 1}")
        super().__init__(n_windows, batch_size, seed, stream, rank, world_size, shuffle)
        self.tokens, self.seq_len = tokens, seq_len

    def next_batch(self, device: torch.device) -> Dict[str, torch.Tensor]:
        starts = self._next_items() * self.seq_len
        return to_device(shifted(self.tokens.windows(starts, self.seq_len + 1)), device, self.pin)


class RowSampler(_Epochs):
    """Epochs over fixed rows (fine-tuning examples), each epoch in its own seeded order."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, stream: int = 0,
                 rank: int = 0, world_size: Optional[int] = None):
        if not len(inputs):
            raise ValueError("no rows to sample")
        super().__init__(len(inputs), batch_size, seed, stream, rank, world_size, shuffle=True)
        self.inputs, self.labels = inputs, labels

    def next_batch(self, device: torch.device) -> Dict[str, torch.Tensor]:
        rows = self._next_items()
        batch = {"input_ids": torch.from_numpy(self.inputs[rows]), "labels": torch.from_numpy(self.labels[rows])}
        return to_device(batch, device, self.pin)


class EpochOrder:
    """Visit ``v`` (0, 1, 2, ... over all epochs) -> item ``order_e(v mod n)`` of epoch ``e = v // n``,
    where ``order_e`` is a seeded permutation of ``[0, n)`` per epoch (the identity without shuffle)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle

    def __call__(self, visits: np.ndarray) -> np.ndarray:
        epochs, items = np.divmod(visits, self.n)
        if not self.shuffle:
            return items
        out = np.empty_like(items)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = permute(items[where], self.n, key=mix_seed(self.seed, int(epoch) + 1))
        return out


_ROUNDS = 4


def permute(items: np.ndarray, n: int, key: int) -> np.ndarray:
    """A pseudo-random permutation of ``[0, n)`` applied to ``items``, one index at a time: a balanced
    Feistel network on the smallest domain of an even number of bits that holds ``n``, applied again to
    values that land at or beyond ``n`` (cycle walking; the domain is under 4n, so walks are short).
    A bijection by construction, in memory proportional to ``len(items)`` only."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, low = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(k) for k in np.random.default_rng(key).integers(0, 2**63, size=_ROUNDS, dtype=np.int64)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & low)
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = feistel(np.asarray(items, dtype=np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = feistel(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit mixing function (splitmix64's finalizer) of ``x`` and the round key."""
    z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix_seed(seed: int, stream: int) -> int:
    """The generator seed of a (seed, stream) pair; the odd-multiplier mix keeps streams far apart."""
    return (seed * 1_000_003 + stream * 7_919) % (2**63 - 1)
