"""Batches of token windows: ``RandomBlocks`` (random windows of a token stream, nanoGPT's ``get_batch``,
deterministic from a seed and resumable), and what every sampler shares (``ds_hydra.data.samplers``):
gathering windows, a rank's share of the global micro-batches, per-stream seeds, the copy to the device."""
from __future__ import annotations

from typing import Dict, Optional

import torch

Batch = Dict[str, torch.Tensor]


class RandomBlocks:
    """Samples ``batch_size`` windows of ``seq_len + 1`` tokens at uniform random offsets.

    ``next_batch`` gives ``{"input_ids": window[:-1], "labels": window[1:]}``, each (B, T): the label
    of a position is the token that follows it (nanoGPT's ``get_batch``). ``tokens`` is a 1-D torch
    tensor, a NumPy array, or a ``TokenSource`` (a token file mapped afresh for each batch: see
    ``ds_hydra.data.token_stream``). The generator is
    seeded from (seed, stream), so each split has its own reproducible sequence; ``state_dict``
    captures the position.

    Ranks share that sequence and split it: each call draws ``world_size`` micro-batches' offsets,
    one after another, and rank ``r`` keeps the ``r``-th. So the global micro-batch ``g`` of a run is
    the same whatever the number of processes: ``r + world_size * m`` for rank ``r``'s ``m``-th call.
    Two ranks with one micro-batch each see exactly what one process with ``grad_accum_steps=2``
    sees, and every rank's generator state is the same (a rank-0 checkpoint resumes them all, at
    any world size). ``world_size`` defaults to ``rank + 1``, the fewest ranks that include ``rank``.
    """

    def __init__(
        self,
        tokens,
        seq_len: int,
        batch_size: int,
        seed: int,
        stream: int = 0,
        rank: int = 0,
        world_size: Optional[int] = None,
    ):
        if len(tokens) <= seq_len:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than seq_len + 1 = {seq_len + 1}")
        world_size = check_rank(rank, world_size)
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(mix_seed(seed, stream))
        # Pinned memory lets the copy to the GPU overlap with compute (non_blocking=True).
        self.pin = torch.cuda.is_available()

    def next_batch(self, device: torch.device) -> Batch:
        high = len(self.tokens) - self.seq_len
        for r in range(self.world_size):  # every rank draws all ranks' offsets, in the same order
            drawn = torch.randint(high, (self.batch_size,), generator=self.generator)
            if r == self.rank:
                offsets = drawn
        windows = gather_windows(self.tokens, offsets, self.seq_len + 1)  # (B, T + 1)
        return to_device({"input_ids": windows[:, :-1], "labels": windows[:, 1:]}, device, self.pin)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]):
        self.generator.set_state(state["generator"])


def check_rank(rank: int, world_size: Optional[int]) -> int:
    """``world_size`` (None: ``rank + 1``, the fewest ranks that include ``rank``), checked against ``rank``."""
    world_size = rank + 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
    return world_size


def gather_windows(tokens, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens[o : o + length]`` for every offset, as one (len(offsets), length) int64 tensor."""
    if isinstance(tokens, torch.Tensor):
        return tokens[offsets[:, None] + torch.arange(length)].long()
    import numpy as np

    index = offsets.numpy()[:, None] + np.arange(length)
    return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))


def to_device(batch: Batch, device: torch.device, pin: bool = False) -> Batch:
    """The batch on ``device``; on CUDA through pinned memory, so the copy overlaps compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def mix_seed(seed: int, stream: int) -> int:
    """The generator seed of a (seed, stream) pair; the odd-multiplier mix keeps the streams far apart."""
    return (seed * 1_000_003 + stream * 7_919) % (2**63 - 1)
