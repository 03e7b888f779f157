"""Random contiguous blocks of a token stream, deterministic from a seed and resumable."""
from __future__ import annotations

from typing import Dict

import torch


class RandomBlocks:
    """Samples ``batch_size`` windows of ``block_size + 1`` tokens at uniform random offsets.

    Inputs are the first ``block_size`` tokens of each window, targets the last ``block_size``
    (nanoGPT's ``get_batch``). The sampler's generator is seeded from (seed, stream, rank), so each
    split and each rank sees its own reproducible sequence; ``state_dict`` captures the position.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0):
        if len(tokens) <= block_size:
            raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than block_size + 1 = {block_size + 1}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(_mix_seed(seed, stream, rank))
        # Pinned memory lets the copy to the GPU overlap with compute (non_blocking=True).
        self.pin = torch.cuda.is_available()

    def next_batch(self, device: torch.device):
        offsets = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)
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


def _mix_seed(seed: int, stream: int, rank: int) -> int:
    # A fixed odd-multiplier mix keeps the streams of different splits and ranks far apart.
    return (seed * 1_000_003 + stream * 7_919 + rank * 104_729) % (2**63 - 1)
