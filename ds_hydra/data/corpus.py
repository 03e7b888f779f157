"""Token corpora: a character-level text corpus (Tiny Shakespeare by default) and synthetic tokens.

Each is a ``TokenData`` (``ds_hydra.data.base``): two 1-D ``int64`` tensors, ``train`` and ``val``, and
their ``vocab_size``; text corpora can also ``encode`` and ``decode``.
"""
from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import List, Optional

import torch

from ds_hydra.data.base import TokenData
from ds_hydra.errors import UserError

EMBEDDED_CORPUS = "tinyshakespeare.txt.gz"


def embedded_corpus_text() -> str:
    """The Tiny Shakespeare text (1,115,394 characters) that ships inside the package."""
    data = resources.files("ds_hydra.data").joinpath(EMBEDDED_CORPUS).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def split_tokens(tokens: torch.Tensor, train_fraction: float):
    """First ``train_fraction`` of the stream trains, the rest validates (no shuffling: no leakage)."""
    n_train = int(len(tokens) * train_fraction)
    return tokens[:n_train], tokens[n_train:]


class CharCorpus(TokenData):
    """Characters of a text as tokens; the vocabulary is the sorted set of characters in the text."""

    def __init__(self, path: Optional[str] = None, train_fraction: float = 0.9, seq_len: Optional[int] = None):
        super().__init__(seq_len)
        if path is None:
            text = embedded_corpus_text()
            self.source = "embedded Tiny Shakespeare"
        else:
            file = Path(path).expanduser()
            if not file.is_file():
                raise UserError(f"data.path={path}: no such file (give a UTF-8 text file, or null for the embedded corpus)")
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"data.path={path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            self.source = str(file)
        if len(text) < 2:
            raise UserError(f"data.path={path}: the text is empty")
        self.chars: List[str] = sorted(set(text))
        self.vocab_size = len(self.chars)
        self._index = {ch: i for i, ch in enumerate(self.chars)}
        tokens = torch.tensor([self._index[ch] for ch in text], dtype=torch.int64)
        self.train, self.val = split_tokens(tokens, train_fraction)

    def encode(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self._index))
        if unknown:
            raise UserError(f"characters not in the corpus vocabulary: {''.join(unknown)!r}")
        return [self._index[ch] for ch in text]

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


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
