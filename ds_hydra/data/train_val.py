"""Token data held as two streams of ids, in memory or in token files, sampled in windows.

``TokenStreams`` is the ``TokenData`` of ``data=tokens``, ``data=text`` and the built-in character
corpus: a train and a val stream (``TokenSource``: an array, or a file mapped afresh for each batch),
sampled as random windows (nanoGPT's way) or in sequential epochs.
"""
from __future__ import annotations

from typing import Dict, Optional

from ds_hydra.data.base import TokenData, check_split
from ds_hydra.data.token_stream import TokenSource


class TokenStreams(TokenData):
    """A train and a val stream of tokens, sampled as windows: random (nanoGPT's way) or sequential epochs."""

    def __init__(self, train: TokenSource, val: TokenSource, vocab_size: int, source: str, tokenizer=None,
                 sampling: str = "random", shuffle: bool = True, seq_len: Optional[int] = None):
        super().__init__(seq_len)
        self.sources: Dict[str, TokenSource] = {"train": train, "val": val}
        self.vocab_size, self.source, self.tokenizer = vocab_size, source, tokenizer
        self.sampling, self.shuffle = getattr(sampling, "value", sampling), shuffle

    def source_of(self, split: str) -> TokenSource:
        return self.sources[check_split(split)]

    @property
    def train(self):
        return self.tokens("train")

    @property
    def val(self):
        return self.tokens("val")

    def tokens(self, split: str):
        """The split's whole stream as an array (a read-only np.memmap for a file: read it in slices)."""
        return self.source_of(split).array()

    def num_tokens(self, split: str) -> int:
        return len(self.source_of(split))

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        from ds_hydra.data.batches import RandomBlocks
        from ds_hydra.data.samplers import SequentialWindows

        tokens = self.source_of(split)
        if self.sampling == "sequential":
            return SequentialWindows(tokens, seq_len, batch_size, seed, stream, rank, world_size, shuffle=self.shuffle)
        return RandomBlocks(tokens, seq_len, batch_size, seed, stream, rank, world_size)
