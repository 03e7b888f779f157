"""A stream of token ids to cut windows from: an array in memory, or a token file read through np.memmap.

A file is mapped afresh for every batch and unmapped after it (nanoGPT's way): pages a batch touched
do not stay mapped into the process, so resident memory stays flat however large the file and
however long the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenSource:
    """``len()`` tokens, indexed like a 1-D array (``source[index]`` copies out what the index names)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index) -> np.ndarray:
        raise NotImplementedError

    def array(self) -> np.ndarray:
        """The whole stream as an array (a read-only memmap for a file)."""
        raise NotImplementedError


class ArrayTokens(TokenSource):
    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> np.ndarray:
        return self.tokens[index]

    def array(self) -> np.ndarray:
        return self.tokens


class FileTokens(TokenSource):
    """A headerless file of ``dtype`` token ids (nanoGPT's ``train.bin``)."""

    def __init__(self, path: Path, dtype, length: int):
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index) -> np.ndarray:
        # a copy (np.array): the temporary map is dropped, unmapped, as soon as this returns
        return np.array(self.array()[index])

    def array(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))

    def part(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` through a map of that part only (whole-file passes go part by part,
        so no more than one part is ever mapped)."""
        stop = min(stop, self.length)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize, shape=(stop - start,))
