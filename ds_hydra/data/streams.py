"""Token data in a train and a val split: what the trainer reads (vocabulary, tokenizer, samplers).

``sampler(split, ...)`` gives a resumable stream of batches ``{"input_ids": (B, T), "labels": (B, T)}``
(labels already shifted; -100 carries no loss); evaluation asks for a fresh sampler of "val" or
"train" each time. ``TokenStreams`` holds two streams of token ids (in memory or memory-mapped
files) and samples windows of them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ds_hydra.data.token_source import TokenSource

SPLITS = ("train", "val")
IGNORE_INDEX = -100  # labels that carry no loss (cross_entropy's ignore_index)


class SplitData:
    """A dataset of token ids in two splits.

    ``vocab_size``: ids are in ``[0, vocab_size)``; ``source``: what it is, for logs; ``tokenizer``:
    what encodes and decodes its text (None for data without text, e.g. synthetic).
    """

    vocab_size: int
    source: str
    tokenizer: Optional[Any] = None

    def num_tokens(self, split: str) -> int:
        raise NotImplementedError

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        raise NotImplementedError

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
        return split


class TokenStreams(SplitData):
    """A train and a val stream of tokens, sampled as windows: random (nanoGPT's way) or sequential epochs."""

    def __init__(self, train: TokenSource, val: TokenSource, vocab_size: int, source: str, tokenizer=None,
                 sampling: str = "random", shuffle: bool = True):
        self.sources: Dict[str, TokenSource] = {"train": train, "val": val}
        self.vocab_size, self.source, self.tokenizer = vocab_size, source, tokenizer
        self.sampling, self.shuffle = sampling, shuffle

    def source_of(self, split: str) -> TokenSource:
        return self.sources[self._split(split)]

    def tokens(self, split: str):
        """The split's whole token stream as an array (a read-only np.memmap for files: read it in slices)."""
        return self.source_of(split).array()

    def num_tokens(self, split: str) -> int:
        return len(self.source_of(split))

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0, world_size: Optional[int] = None):
        from ds_hydra.data.samplers import RandomWindows, SequentialWindows

        tokens = self.source_of(split)
        if self.sampling == "sequential":
            return SequentialWindows(tokens, seq_len, batch_size, seed, stream, rank, world_size, shuffle=self.shuffle)
        return RandomWindows(tokens, seq_len, batch_size, seed, stream, rank, world_size)
