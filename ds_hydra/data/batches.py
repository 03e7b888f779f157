"""Random contiguous blocks of a token stream, deterministic from a seed and resumable."""
from __future__ import annotations

from typing import Dict, Optional

import torch


class RandomBlocks:
    """Samples ``batch_size`` windows of ``block_size + 1`` tokens at uniform random offsets.

    Inputs are the first ``block_size`` tokens of each window, targets the last ``block_size``
    (nanoGPT's ``get_batch``). The generator is seeded from (seed, stream), so each split has its own
    reproducible sequence; ``state_dict`` captures the position.

    Ranks share that sequence and split it: each call draws ``world_size`` micro-batches' offsets,
    one after another, and rank ``r`` keeps the ``r``-th. So the global micro-batch ``g`` of a run is
    the same whatever the number of processes: ``r + world_size * m`` for rank ``r``'s ``m``-th call.
    Two ranks with one micro-batch each see exactly what one process with ``grad_accum_steps=2``
    sees, and every rank's generator state is the same (a rank-0 checkpoint resumes them all, at
    any world size). ``world_size`` defaults to ``rank + 1``, the fewest ranks that include ``rank``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        block_size: int,
        batch_size: int,
        seed: int,
        stream: int = 0,
        rank: int = 0,
        world_size: Optional[int] = None,
    ):
        if len(tokens) <= block_size:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than block_size + 1 = {block_size + 1}")
        world_size = rank + 1 if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(_mix_seed(seed, stream))
        # Pinned memory lets the copy to the GPU overlap with compute (non_blocking=True).
        self.pin = torch.cuda.is_available()

    def next_batch(self, device: torch.device):
        high = len(self.tokens) - self.block_size
        for r in range(self.world_size):  # every rank draws all ranks' offsets, in the same order
            drawn = torch.randint(high, (self.batch_size,), generator=self.generator)
            if r == self.rank:
                offsets = drawn
        window = torch.arange(self.block_size + 1)
        blocks = self.tokens[offsets[:, None] + window]  # (B, T + 1)
        x, y = blocks[:, :-1], blocks[:, 1:]
        if device.type == "cuda":
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]):
        self.generator.set_state(state["generator"])


def _mix_seed(seed: int, stream: int) -> int:
    # A fixed odd-multiplier mix keeps the streams of different splits far apart.
    return (seed * 1_000_003 + stream * 7_919) % (2**63 - 1)
