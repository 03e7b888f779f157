"""``data=tokens``: directories of token files, as ``task=prepare`` writes them and as nanoGPT's are.

A directory holds ``train.bin`` and ``val.bin``: headerless arrays of token ids, read through
``np.memmap`` (resident memory does not grow with their size). What the ids mean comes from

* ``meta.json`` (written by prepare): vocabulary size, dtype (uint16 or uint32), token counts, and
  the tokenizer saved beside it;
* else nanoGPT's ``meta.pkl`` (``vocab_size``, and ``itos`` for character data): read without running
  pickle's code: only dicts, lists, strings and numbers are accepted, anything naming a class or a
  function is refused;
* else nothing (nanoGPT's GPT-2 directories: openwebtext, shakespeare): uint16 ids of GPT-2's
  50257-token vocabulary, or ``data.vocab_size``; ``data.tokenizer`` can name a local tokenizer.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Optional

import numpy as np

from ds_hydra.data.train_val import TokenStreams
from ds_hydra.data.token_stream import FileTokens
from ds_hydra.data.tokenizer import CharTokenizer, has_saved_tokenizer, load_hf_tokenizer, load_tokenizer, read_json
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

DATA_FORMAT = "ds_hydra.tokens.v1"
TRAIN_FILE, VAL_FILE, META_FILE, NANOGPT_META_FILE = "train.bin", "val.bin", "meta.json", "meta.pkl"
GPT2_VOCAB = 50257  # nanoGPT's directories without meta.pkl hold GPT-2 token ids
_MAX_META_PKL = 64 << 20
_SCAN = 1 << 24  # tokens per part of the largest-id scan (32 MiB of uint16)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (nanoGPT's format), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_prepared_dir(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def read_meta(folder: Path) -> dict:
    """A prepared directory's meta.json, checked for the fields readers need."""
    path = Path(folder) / META_FILE
    meta = read_json(path)
    if meta.get("format") != DATA_FORMAT:
        raise UserError(f"{path}: not a ds_hydra token directory description (format {meta.get('format')!r}, expected {DATA_FORMAT})")
    try:
        np.dtype(meta["dtype"])
        int(meta["vocab_size"]), int(meta["tokens"]["train"]), int(meta["tokens"]["val"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: incomplete ({exc} is missing or malformed); prepare the directory again") from None
    return meta


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, sets, strings, bytes and numbers need no
    class lookup; anything that does (and so could run code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain data is read")


def read_nanogpt_meta(path: Path) -> dict:
    """nanoGPT's meta.pkl (``vocab_size``, ``itos``, ``stoi``), without unpickling arbitrary objects."""
    if path.stat().st_size > _MAX_META_PKL:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes is too large for nanoGPT's meta.pkl")
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:
        raise UserError(f"{path}: not a plain nanoGPT meta.pkl ({str(exc).strip()[:200] or type(exc).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise UserError(f"{path}: has no integer vocab_size")
    return meta


def _itos_tokenizer(meta: dict, path: Path) -> Optional[CharTokenizer]:
    """nanoGPT's character tokenizer from ``itos`` (id -> character), when it is one."""
    itos = meta.get("itos")
    if not isinstance(itos, dict):
        return None
    try:
        chars = [itos[i] for i in range(meta["vocab_size"])]
        return CharTokenizer(chars)
    except (KeyError, ValueError, TypeError):
        log.warning("%s: itos is not one character per id 0..%d; samples will show token ids", path, meta["vocab_size"] - 1)
        return None


def largest_id(tokens: FileTokens) -> int:
    """The largest id in the file, read part by part (resident memory stays at one part)."""
    return max((int(tokens.part(i, i + _SCAN).max()) for i in range(0, len(tokens), _SCAN)), default=-1)


class TokenFiles(TokenStreams):
    """``train.bin``/``val.bin`` of a prepared or nanoGPT directory, sampled in windows."""

    def __init__(self, dir: str, sampling="random", shuffle: bool = True, seq_len: Optional[int] = None,
                 vocab_size: Optional[int] = None, tokenizer: Optional[str] = None):
        folder = Path(str(dir)).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.dir={dir}: no such directory (write one with task=prepare, or give nanoGPT's data/<name>/)")
        for name in (TRAIN_FILE, VAL_FILE):
            if not (folder / name).is_file():
                raise UserError(f"data.dir={dir}: no {name} (a token directory holds train.bin and val.bin)")
        self.dir = folder
        if is_prepared_dir(folder):
            vocab, dtype, saved, counts = self._prepared(folder)
        elif (folder / NANOGPT_META_FILE).is_file():
            meta = read_nanogpt_meta(folder / NANOGPT_META_FILE)
            vocab, dtype, saved, counts = meta["vocab_size"], np.dtype(np.uint16), _itos_tokenizer(meta, folder / NANOGPT_META_FILE), None
        else:
            vocab, dtype, saved, counts = None, np.dtype(np.uint16), None, None
        train, val = (self._tokens(folder / name, dtype, counts and counts[split]) for name, split in ((TRAIN_FILE, "train"), (VAL_FILE, "val")))
        vocab = self._vocab(vocab, vocab_size, [train, val], trusted=counts is not None)
        chosen = self._tokenizer(saved, tokenizer, folder)
        if chosen is not None and chosen.vocab_size > vocab:
            raise UserError(f"data.tokenizer={tokenizer}: its vocabulary ({chosen.vocab_size}) is larger than the data's ({vocab})")
        source = f"{folder} ({dtype.name} token files)"
        super().__init__(train, val, vocab, source, chosen, sampling=sampling, shuffle=shuffle, seq_len=seq_len)

    @staticmethod
    def _prepared(folder: Path):
        meta = read_meta(folder)
        saved = load_tokenizer(folder) if has_saved_tokenizer(folder) else None
        return int(meta["vocab_size"]), np.dtype(meta["dtype"]), saved, meta["tokens"]

    @staticmethod
    def _tokens(path: Path, dtype: np.dtype, expected: Optional[int]) -> FileTokens:
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{path}: {size:,} bytes is not a whole number of {dtype.name} tokens")
        n = size // dtype.itemsize
        if expected is not None and n != int(expected):
            raise UserError(f"{path}: holds {n:,} tokens but meta.json says {int(expected):,}; the directory is incomplete (prepare it again)")
        if n < 2:
            raise UserError(f"{path}: holds {n} tokens; training needs at least 2")
        return FileTokens(path, dtype, n)

    @staticmethod
    def _vocab(known: Optional[int], given: Optional[int], streams, trusted: bool) -> int:
        """The vocabulary size: meta's (or ``data.vocab_size``, which may only enlarge it), else GPT-2's.
        Files without meta.json are scanned once for their largest id, so none can be out of range."""
        vocab = known if known is not None else (given or GPT2_VOCAB)
        if known is None and not given:
            log.info("no meta.json or meta.pkl: taking GPT-2's %d-token vocabulary (nanoGPT's assumption; set data.vocab_size otherwise)", GPT2_VOCAB)
        if given is not None:
            if given < vocab:
                raise UserError(f"data.vocab_size={given}: smaller than the data's vocabulary ({vocab})")
            vocab = given
        if not trusted:
            top = max(largest_id(s) for s in streams)
            if top >= vocab:
                raise UserError(f"data.vocab_size: the token files hold id {top}, beyond the vocabulary of {vocab}; set data.vocab_size={top + 1} or more")
        return vocab

    @staticmethod
    def _tokenizer(saved, path: Optional[str], folder: Path):
        if path is None:
            return saved
        chosen = load_hf_tokenizer(path)
        if saved is not None and saved.fingerprint() != chosen.fingerprint():
            raise UserError(f"data.tokenizer={path}: differs from the tokenizer saved with the data in {folder}; leave data.tokenizer unset")
        return chosen
