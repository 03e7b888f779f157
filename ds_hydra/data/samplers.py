"""Samplers that go through their data in epochs: windows of a token stream, or fine-tuning rows.

Random windows (nanoGPT's ``get_batch``) are ``ds_hydra.data.batches.RandomBlocks``. A sampler's
``next_batch(device)`` returns ``{"input_ids": (B, T), "labels": (B, T)}`` (int64) where
``labels[:, t]`` is the token after ``input_ids[:, t]``; ``state_dict()``/``load_state_dict()`` capture
the position exactly, so a resumed run draws the batches the uninterrupted one would have.

Ranks share one stream of global micro-batches and split it: rank ``r``'s ``m``-th call takes global
micro-batch ``r + world_size * m``. So 2 ranks with one micro-batch each see exactly what 1 process
with ``grad_accum_steps=2`` sees, ranks never draw the same micro-batch, and every rank's state is
the same (a rank-0 checkpoint resumes all of them, at any world size).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch

from ds_hydra.data.batches import Batch, check_rank, gather_windows, mix_seed, to_device
from ds_hydra.data.token_stream import TokenSource
from ds_hydra.models.contract import IGNORE_INDEX


class _Epochs:
    """Epochs over ``n`` items in batches of ``batch_size``. The run's global batches are numbered
    from 0; rank ``r``'s ``m``-th call takes global batch ``start + r + world_size * m``, whose items
    are visits ``g * batch_size ...`` of the epoch order. The state is the number of global batches
    taken (one integer), so it resumes at any world size."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, rank: int, world_size: Optional[int], shuffle: bool):
        self.world_size = check_rank(rank, world_size)
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

    def next_batch(self, device: torch.device) -> Batch:
        starts = torch.from_numpy(self._next_items() * self.seq_len)
        windows = gather_windows(self.tokens, starts, self.seq_len + 1)  # (B, T + 1)
        return to_device({"input_ids": windows[:, :-1], "labels": windows[:, 1:]}, device, self.pin)


class RowSampler(_Epochs):
    """Epochs over fixed rows (fine-tuning examples), each epoch in its own seeded order. Packed rows also
    carry ``position_ids`` (restarting at 0 at each example)."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, positions: Optional[np.ndarray], batch_size: int, seed: int,
                 stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        if not len(inputs):
            raise ValueError("no rows to sample")
        super().__init__(len(inputs), batch_size, seed, stream, rank, world_size, shuffle=True)
        self.arrays = row_arrays(inputs, labels, positions)

    def next_batch(self, device: torch.device) -> Batch:
        rows = self._next_items()
        return to_device({key: torch.from_numpy(array[rows]) for key, array in self.arrays.items()}, device, self.pin)


def row_arrays(inputs: np.ndarray, labels: np.ndarray, positions: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    arrays = {"input_ids": inputs, "labels": labels}
    if positions is not None:
        arrays["position_ids"] = positions
    return arrays


class WholeSplit:
    """Every item of a split once, in order, in batches of ``batch_size`` (the last one shorter): how a
    split is evaluated exactly. Ranks split the batches (rank ``r`` takes batches ``r, r + world_size,
    ...``) and all make the same number of them, as FSDP's gathers need: a rank past the end gets a
    batch whose labels are all -100, which adds nothing to the token-weighted loss."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, take: Callable[[np.ndarray], Batch]):
        check_rank(rank, world_size)
        self.n, self.batch_size, self.rank, self.world_size, self.take = n, batch_size, rank, world_size, take
        self.pin = torch.cuda.is_available()

    @classmethod
    def of_rows(cls, inputs: np.ndarray, labels: np.ndarray, positions: Optional[np.ndarray], batch_size: int,
                rank: int = 0, world_size: int = 1) -> "WholeSplit":
        arrays = row_arrays(inputs, labels, positions)
        return cls(len(inputs), batch_size, rank, world_size, lambda rows: {k: torch.from_numpy(a[rows]) for k, a in arrays.items()})

    @classmethod
    def of_windows(cls, tokens, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1) -> "WholeSplit":
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < 1:
            raise ValueError(f"{len(tokens)} tokens: fewer than seq_len + 1 = {seq_len + 1}")

        def take(windows: np.ndarray) -> Batch:
            rows = gather_windows(tokens, torch.from_numpy(windows * seq_len), seq_len + 1)  # (B, T + 1)
            return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

        return cls(n_windows, batch_size, rank, world_size, take)

    def __len__(self) -> int:
        """Batches per rank."""
        return -(-(-(-self.n // self.batch_size)) // self.world_size)

    def batches(self, device: torch.device) -> Iterator[Batch]:
        for i in range(len(self)):
            start = (self.rank + self.world_size * i) * self.batch_size
            if start < self.n:
                batch = self.take(np.arange(start, min(start + self.batch_size, self.n), dtype=np.int64))
            else:  # past the end: the first batch again, carrying no loss
                batch = self.take(np.arange(min(self.batch_size, self.n), dtype=np.int64))
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            yield to_device(batch, device, self.pin)


class EpochOrder:
    """Visit ``v`` (0, 1, 2, ... over all epochs) -> item ``order_e(v mod n)`` of epoch ``e = v // n``,
    where ``order_e`` is a seeded permutation of ``[0, n)`` per epoch (the identity without shuffle)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._orders: Dict[int, Permutation] = {}  # the epochs of the last call (a batch spans one or two)

    def __call__(self, visits: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return visits % self.n
        orders = {}
        out = np.empty(len(visits), dtype=np.int64)
        for i, visit in enumerate(visits.tolist()):  # a batch's few indices: plain ints beat NumPy's per-call cost
            epoch, item = divmod(visit, self.n)
            if epoch not in orders:
                orders[epoch] = self._orders.get(epoch) or Permutation(self.n, mix_seed(self.seed, epoch + 1))
            out[i] = orders[epoch](item)
        self._orders = orders
        return out


class Permutation:
    """A pseudo-random permutation of ``[0, n)``, computed one index at a time: a balanced Feistel network
    on the smallest domain of an even number of bits that holds ``n``, applied again to values that
    land at or beyond ``n`` (cycle walking; the domain is under 4n, so walks are short). A bijection by
    construction, with no memory that grows with ``n``."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half, self.low = n, bits // 2, (1 << (bits // 2)) - 1
        self.keys = [int(k) for k in np.random.default_rng(key).integers(0, 2**63, size=self.ROUNDS, dtype=np.int64)]

    def __call__(self, item: int) -> int:
        x = self._feistel(item)
        while x >= self.n:
            x = self._feistel(x)
        return x

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.low
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.low)
        return (left << self.half) | right


_MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finalizer: a 64-bit mixing function."""
    z = (z * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
