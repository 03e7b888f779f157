"""What the trainer asks of a data set: token streams per split, their vocabulary, and batch samplers.

``build_data(cfg)`` instantiates ``cfg.data`` into a ``TokenData``. The trainer reads
``vocab_size`` (ids are in ``[0, vocab_size)``), ``seq_len`` (None: the model's maximum positions),
and asks ``sampler(split, ...)`` for batches ``{"input_ids", "labels"}`` of shape (B, T) whose
``labels[:, t]`` is the target of position t (-100: no loss there). Text data also encode and
decode, for prompts and samples.
"""
from __future__ import annotations

from typing import List, Optional

from ds_hydra.data.batches import RandomBlocks

SPLITS = ("train", "val")
# Sampler streams: one random sequence per use of a split (training, and each split's loss estimate).
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2


class TokenData:
    """A token stream per split (``train`` and ``val``: 1-D torch tensors or NumPy arrays of ids)."""

    source: str = "tokens"
    vocab_size: int
    train = None
    val = None

    def __init__(self, seq_len: Optional[int] = None):
        self.seq_len = seq_len

    def tokens(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int, stream: int = 0, rank: int = 0,
                world_size: int = 1) -> RandomBlocks:
        """Random windows of ``split`` (see ``RandomBlocks``), resumable through its ``state_dict``."""
        return RandomBlocks(self.tokens(split), seq_len, batch_size, seed, stream=stream, rank=rank, world_size=world_size)

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError(f"{type(self).__name__} has no text encoding")

    def decode(self, tokens) -> str:
        raise NotImplementedError(f"{type(self).__name__} has no text decoding")


def build_data(cfg) -> TokenData:
    """The run's data from ``cfg.data`` (through the ``_target_`` allowlist), built once per process: the
    memory preflight and ``task=validate`` need it too (``ds_hydra.data.cache``)."""
    from ds_hydra.data.cache import cached_corpus

    return cached_corpus(cfg.data)
