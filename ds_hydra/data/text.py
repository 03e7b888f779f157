"""``data=text``: one UTF-8 text file (or the embedded Tiny Shakespeare), tokenized at start.

The tokenizer comes from the ``tokenizer`` group. Characters and bytes are tokenized in memory in
well under a second per megabyte, so nothing is written. BPE (trained on the text) and hf
tokenizations are prepared once into the cache (``task=prepare``'s format) under a key made of the
text's SHA-256, the tokenizer settings and the split, and memory-mapped from there on: a second run
on the same text starts at once. The text is one document: the end-of-text token, if the tokenizer
has one, follows it, as ``task=prepare`` writes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ds_hydra.data.train_val import TokenStreams
from ds_hydra.data.token_stream import ArrayTokens
from ds_hydra.data.tokenizer import BytesTokenizer, CharTokenizer
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = "tinyshakespeare.txt.gz"  # in the package
EMBEDDED_NAME = "tinyshakespeare.txt"  # its text, written into the cache when BPE or hf tokenize it


def embedded_corpus_text() -> str:
    """The Tiny Shakespeare text (1,115,394 characters) that ships inside the package."""
    import gzip
    from importlib import resources

    data = resources.files("ds_hydra.data").joinpath(EMBEDDED_CORPUS).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DS_HYDRA_CACHE") or Path.home() / ".cache" / "ds_hydra")


def read_text_bytes(path: Optional[str]) -> tuple:
    """(bytes, name) of ``path``, or of the embedded corpus when ``path`` is None."""
    if path is None:
        return embedded_corpus_text().encode("utf-8"), "embedded Tiny Shakespeare"
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.path={path}: no such file (give a UTF-8 text file, or null for the embedded corpus)")
    return file.read_bytes(), str(file)


def decode_text(data: bytes, path: Optional[str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data.path={path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def split_point(n: int, train_fraction: float) -> int:
    """The first ``int(n * train_fraction)`` tokens train (nanoGPT's split of Tiny Shakespeare)."""
    return int(n * train_fraction)


class TextData(TokenStreams):
    """The text of ``path`` in the ``tokenizer`` group's tokens, split into train and val."""

    def __init__(self, path: Optional[str] = None, train_fraction: float = 0.9, sampling="random", shuffle: bool = True,
                 seq_len: Optional[int] = None, cache_dir: Optional[str] = None, tokenizer_cfg=None, model_pretrained: Optional[str] = None):
        tokenizer = _plain(tokenizer_cfg) if tokenizer_cfg is not None else {"kind": "char", "eos_token": None}
        kind = tokenizer["kind"]
        data, name = read_text_bytes(path)
        if not data:
            raise UserError(f"data.path={path}: the file is empty")
        if kind in ("char", "bytes"):
            text = decode_text(data, path)
            chosen = CharTokenizer.fit(text, tokenizer.get("eos_token")) if kind == "char" else BytesTokenizer(tokenizer.get("eos_token"))
            ids = chosen.encode_array(text)
            if chosen.eos_id is not None:
                ids = np.append(ids, chosen.eos_id)
            cut = split_point(len(ids), train_fraction)
            train, val = ArrayTokens(ids[:cut]), ArrayTokens(ids[cut:])
            source = f"{name} ({len(text):,} characters)"
        else:
            from ds_hydra.data.tokens import TokenFiles

            prepared = _cached_tokens(data, name, path, tokenizer, train_fraction, cache_dir, model_pretrained)
            files = TokenFiles(str(prepared), sampling=sampling, shuffle=shuffle)
            train, val, chosen = files.source_of("train"), files.source_of("val"), files.tokenizer
            source = f"{name} (cached in {prepared})"
        if min(len(train), len(val)) < 2:
            raise UserError(f"data.train_fraction={train_fraction}: leaves {len(train)} train and {len(val)} val tokens; each needs at least 2")
        super().__init__(train, val, chosen.vocab_size, source, chosen, sampling=sampling, shuffle=shuffle, seq_len=seq_len)


def _plain(cfg) -> dict:
    """The tokenizer group as a plain dict (it keys the cache)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _cached_tokens(data: bytes, name: str, path: Optional[str], tokenizer: dict, train_fraction: float,
                   cache_dir: Optional[str], model_pretrained: Optional[str]) -> Path:
    """The prepared directory of this text, tokenizer and split in the cache (prepared now if absent)."""
    from ds_hydra.data.prepare import prepare_dataset
    from ds_hydra.data.prepare_inputs import InputFile, ReadSettings

    key = hashlib.sha256(data).hexdigest()
    settings = json.dumps({"tokenizer": tokenizer, "train_fraction": train_fraction}, sort_keys=True)
    key = hashlib.sha256(f"{key}\n{settings}".encode("utf-8")).hexdigest()[:24]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    output = root / "text" / key
    source = Path(path).expanduser() if path is not None else _embedded_file(root, data)
    stat = source.stat()
    log.info("tokenizing %s with %s (cached in %s)", name, tokenizer["kind"], output)
    _one_process_first(
        lambda: prepare_dataset(
            [InputFile(str(source), "text", stat.st_size, stat.st_mtime_ns)], output, tokenizer, ReadSettings(),
            train_fraction=train_fraction, pretrained=model_pretrained, progress=False,
        )
    )
    return output


def _embedded_file(root: Path, data: bytes) -> Path:
    """The embedded corpus as a file in the cache (prepare reads files)."""
    from ds_hydra.common.files import atomic_write

    file = root / "text" / EMBEDDED_NAME
    if not file.is_file() or file.stat().st_size != len(data):
        atomic_write(file, lambda f: f.write(data), binary=True)
    return file


def _one_process_first(build) -> None:
    """``build()`` on local rank 0 first, then on the others (which find it done): several processes
    of one machine must not write the same cache entry at once."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        build()
        return
    from ds_hydra.common import launch_env

    first = (launch_env.local_rank() if launch_env.launched() else dist.get_rank()) == 0
    if first:
        build()
    dist.barrier()
    if not first:
        build()
