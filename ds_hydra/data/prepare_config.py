"""Schema of ``task=prepare`` (the ``prepare`` group; torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, List, Optional


class InputFormat(Enum):
    auto = "auto"  # from the extension: .txt/.text/.md text, .jsonl/.ndjson JSON Lines, .parquet
    text = "text"  # every file is one plain-text document
    jsonl = "jsonl"  # one JSON record per line
    parquet = "parquet"  # a Parquet table (needs pyarrow)


class DecodeErrors(Enum):
    strict = "strict"  # bytes that are not UTF-8 stop prepare, naming the file and byte offset
    replace = "replace"  # they become U+FFFD and prepare goes on


@dataclass
class PrepareConfig:
    """Tokenize text files into nanoGPT-style ``train.bin``/``val.bin`` token files (``task=prepare``)."""

    input: Any = None
    """Files, directories (searched recursively) or globs (``**`` too): one string or a list."""
    output: Optional[str] = None
    """The directory to write: train.bin, val.bin, meta.json and the tokenizer. Built beside it and
    renamed into place at the end; an existing one is replaced only if prepare wrote it."""
    format: InputFormat = InputFormat.auto
    """How to read the inputs; auto goes by each file's extension."""
    text_field: str = "text"
    """The JSONL field, or Parquet column, that holds each document's text."""
    val_fraction: float = 0.1
    """The last fraction of the token stream validates, the rest trains (large corpora: 0.001)."""
    num_proc: int = 1
    """Worker processes that read and tokenize; output is the same for any number."""
    errors: DecodeErrors = DecodeErrors.strict
    """What to do with bytes that are not UTF-8."""
    chunk_bytes: int = 4 << 20
    """Input bytes per work item: bounds each worker's memory (a few times this)."""
    force: bool = False
    """Rebuild even when the output is up to date with the inputs and settings."""


def validate_prepare(cfg, prefix: str = "prepare") -> List[str]:
    problems = []
    if not cfg.input:
        problems.append(f"{prefix}.input is not set: give files, directories or globs ({prefix}.input='corpus/*.txt')")
    elif not isinstance(cfg.input, str) and not all(isinstance(p, str) for p in cfg.input):
        problems.append(f"{prefix}.input: must be a path or glob, or a list of them")
    if not cfg.output:
        problems.append(f"{prefix}.output is not set: give the directory to write ({prefix}.output=data/mycorpus)")
    if not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"{prefix}.val_fraction={cfg.val_fraction}: must be in (0, 1)")
    if cfg.num_proc < 1:
        problems.append(f"{prefix}.num_proc={cfg.num_proc}: must be >= 1")
    if cfg.chunk_bytes < 1024:
        problems.append(f"{prefix}.chunk_bytes={cfg.chunk_bytes}: must be >= 1024")
    if not cfg.text_field:
        problems.append(f"{prefix}.text_field: must name a JSONL field or Parquet column")
    return problems


def input_patterns(value: Optional[Any]) -> Optional[List[str]]:
    """``prepare.input`` as a list of patterns."""
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]
