"""The built-in corpora: Tiny Shakespeare (embedded in the package) and synthetic tokens.

Each is a ``TokenData`` (``ds_hydra.data.base``) with a ``train`` and a ``val`` stream of ids and
their ``vocab_size``. ``CharCorpus`` is ``data=text`` with the char tokenizer (``ds_hydra.data.text``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ds_hydra.data.base import TokenData
from ds_hydra.data.text import TextData, embedded_corpus_text  # noqa: F401  (embedded_corpus_text: imported from here too)


def split_tokens(tokens: torch.Tensor, train_fraction: float):
    """First ``train_fraction`` of the stream trains, the rest validates (no shuffling: no leakage)."""
    n_train = int(len(tokens) * train_fraction)
    return tokens[:n_train], tokens[n_train:]


class CharCorpus(TextData):
    """Characters of a text as tokens (``TextData`` with the char tokenizer): the vocabulary is the
    sorted set of the text's characters. Run directories from before the ``tokenizer`` group name it."""

    def __init__(self, path: Optional[str] = None, train_fraction: float = 0.9, seq_len: Optional[int] = None):
        super().__init__(path, train_fraction, seq_len=seq_len)
        self.chars: List[str] = self.tokenizer.chars


class SyntheticTokens(TokenData):
    """A Markov chain where each token is followed by a fixed successor with probability ``predictability``.

    The best achievable loss is known in closed form, so tests can tell learning from noise.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        num_tokens: int = 200_000,
        train_fraction: float = 0.9,
        predictability: float = 0.9,
        seed: int = 0,
        seq_len: Optional[int] = None,
    ):
        super().__init__(seq_len)
        self.source = f"synthetic Markov chain (vocab {vocab_size})"
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(seed)
        successor = torch.randperm(vocab_size, generator=gen)
        noise = torch.randint(vocab_size, (num_tokens,), generator=gen)
        follow = torch.rand(num_tokens, generator=gen) < predictability
        successor, noise, follow = successor.tolist(), noise.tolist(), follow.tolist()
        stream = [noise[0]]
        for t in range(1, num_tokens):  # sequential by nature; plain ints keep 200k steps fast
            stream.append(successor[stream[-1]] if follow[t] else noise[t])
        tokens = torch.tensor(stream, dtype=torch.int64)
        self.train, self.val = split_tokens(tokens, train_fraction)

    def encode(self, text: str) -> List[int]:
        return [int(t) for t in text.split()]

    def decode(self, tokens) -> str:
        return " ".join(str(int(t)) for t in tokens)
