"""Schemas of the ``tokenizer`` config group (torch-free).

A tokenizer turns text into token ids for ``task=prepare``, ``data=text`` and ``data=sft``. The
option is fixed by ``kind``; ``data=tokens`` reads the tokenizer saved with the prepared data instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET = 256  # a byte-level vocabulary starts with every byte value


@dataclass
class CharTokenizerConfig:
    """Characters as tokens: the vocabulary is the sorted set of characters of the text (nanoGPT's char level)."""

    kind: str = "char"
    """Which tokenizer this is (fixed by the option: char)."""
    eos_token: Optional[str] = None
    """An end-of-text token added after the characters (id = number of characters), separating documents;
    null: none, the vocabulary is exactly the text's characters (Tiny Shakespeare: 65)."""


@dataclass
class BytesTokenizerConfig:
    """UTF-8 bytes as tokens: ids 0..255, nothing to train; any text encodes."""

    kind: str = "bytes"
    """Which tokenizer this is (fixed by the option: bytes)."""
    eos_token: Optional[str] = END_OF_TEXT
    """The end-of-text token, id 256 (vocabulary 257); null: none (vocabulary 256)."""


@dataclass
class BPETokenizerConfig:
    """Byte-level BPE (GPT-2's scheme) trained offline on the input with Hugging Face ``tokenizers``."""

    kind: str = "bpe"
    """Which tokenizer this is (fixed by the option: bpe)."""
    vocab_size: int = 8192
    """Vocabulary size to train to: the 256 byte values, the end-of-text token, then merges; at least 257."""
    min_frequency: int = 2
    """A pair must occur this often to be merged (fewer merges than vocab_size asks if the text runs out)."""
    eos_token: str = END_OF_TEXT
    """The end-of-text token (a special token, id 0), written between documents."""
    train_chars: Optional[int] = None
    """Train on at most this many characters from the start of the input (in input order); null: all of it."""


@dataclass
class HFTokenizerConfig:
    """A local Hugging Face tokenizer: a ``tokenizer.json``, a model directory, or a ds_hydra data/run dir."""

    kind: str = "hf"
    """Which tokenizer this is (fixed by the option: hf)."""
    path: Optional[str] = None
    """A tokenizer.json file, or a directory holding one (a model dir, a prepared data dir, a run's
    tokenizer/); null takes model.pretrained. Read locally: nothing is downloaded."""
    eos_token: Optional[str] = None
    """The end-of-text token; null: the eos_token of the directory's tokenizer_config.json, else a
    well-known one the vocabulary has (<|endoftext|>, </s>, <|end_of_text|>, <eos>)."""


TOKENIZER_KINDS = ("char", "bytes", "bpe", "hf")


def validate_tokenizer(cfg, prefix: str = "tokenizer") -> List[str]:
    problems = []
    kind = cfg.get("kind")
    if kind not in TOKENIZER_KINDS:
        problems.append(f"{prefix}.kind={kind}: must be one of {', '.join(TOKENIZER_KINDS)} (pick tokenizer=<kind>)")
        return problems
    if kind == "bpe":
        least = BYTE_ALPHABET + 1
        if cfg.vocab_size < least:
            problems.append(
                f"{prefix}.vocab_size={cfg.vocab_size}: too small for byte-level BPE; must be >= {least} "
                f"(the {BYTE_ALPHABET} byte values and {cfg.eos_token})"
            )
        if cfg.min_frequency < 1:
            problems.append(f"{prefix}.min_frequency={cfg.min_frequency}: must be >= 1")
        if cfg.train_chars is not None and cfg.train_chars < 1:
            problems.append(f"{prefix}.train_chars={cfg.train_chars}: must be >= 1 (or null for all the input)")
        if not cfg.eos_token:
            problems.append(f"{prefix}.eos_token: must be a non-empty string (BPE separates documents with it)")
    if cfg.get("eos_token", None) == "":
        problems.append(f"{prefix}.eos_token='': give a token string, or null for none")
    return problems
