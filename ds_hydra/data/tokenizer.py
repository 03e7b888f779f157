"""Tokenizers: characters, UTF-8 bytes, byte-level BPE and local Hugging Face tokenizers.

Every tokenizer has ``encode(text) -> List[int]``, ``encode_array(text) -> np.ndarray`` (the fast
path that ``task=prepare`` uses), ``decode(ids) -> str``, ``vocab_size`` (ids are in
``[0, vocab_size)``), ``eos_id`` (the end-of-text token written between documents, or None) and
``save(dir)``. A saved tokenizer is two files: ``tokenizer.json`` (Hugging Face's format for BPE and
hf tokenizers, so other tools read it too; ds_hydra's own small JSON for char and bytes) and
``tokenizer_meta.json`` (kind, end-of-text token, vocabulary size, fingerprint). ``load_tokenizer(dir)``
reads them back, so a run decodes exactly as its data was encoded.

Encoding never turns text into special tokens: a document that contains the string
``<|endoftext|>`` encodes it as ordinary text; only ``prepare`` writes the end-of-text id, between
documents (tiktoken's ``encode_ordinary``). Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ds_hydra.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_meta.json"
META_FORMAT = "ds_hydra.tokenizer.v1"
EMBEDDED_SPEC_KEY = "spec"  # tokenizer_meta.json of an exported model dir: a char or bytes tokenizer's own JSON
# End-of-text tokens of well-known tokenizers, tried in this order when none is named.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
# A batch of fewer texts than 4 per core is cut into pieces (of at least this many characters), so the
# batch encoder can use every core; more pieces than that only cost time.
PIECE_CHARS = 1 << 18


class Tokenizer:
    """What every tokenizer offers; subclasses set ``kind``, ``vocab_size``, ``eos_token`` and ``eos_id``."""

    kind = ""
    vocab_size: int
    eos_token: Optional[str] = None
    eos_id: Optional[int] = None

    def encode_array(self, text: str) -> np.ndarray:
        """The token ids of ``text`` as an int64 array."""
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash of what maps text to ids: equal fingerprints encode every text alike."""
        return _sha256_json(self._identity())

    def describe(self) -> dict:
        """What meta.json and the logs say about this tokenizer."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint(),
        }

    def save(self, directory) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_meta.json`` into ``directory`` (each atomically)."""
        from ds_hydra.common.files import atomic_write_text

        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self._file_text())
        meta = {"format": META_FORMAT, **self.describe()}
        atomic_write_text(directory / TOKENIZER_META_FILE, json.dumps(meta, indent=2) + "\n")

    def _identity(self):
        raise NotImplementedError

    def _file_text(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        eos = f", eos {self.eos_token!r}={self.eos_id}" if self.eos_id is not None else ""
        return f"{self.kind} tokenizer (vocab {self.vocab_size}{eos})"


class CharTokenizer(Tokenizer):
    """Each character is a token; ids follow ``chars`` (sorted, when fitted), then the end-of-text token (if any)."""

    kind = "char"

    def __init__(self, chars: Sequence[str], eos_token: Optional[str] = None):
        self.chars: List[str] = list(chars)
        if len(set(self.chars)) != len(self.chars) or any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise ValueError("chars must be distinct single characters")
        self.eos_token = eos_token
        self.eos_id = len(self.chars) if eos_token is not None else None
        self.vocab_size = len(self.chars) + (eos_token is not None)
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # codepoint -> id (-1: not in the vocabulary); at most 1.1M entries (4.5 MB) for any text
        self._table = np.full(int(codepoints.max()) + 1 if len(codepoints) else 1, -1, dtype=np.int32)
        self._table[codepoints] = np.arange(len(codepoints), dtype=np.int32)

    @classmethod
    def fit(cls, text: str, eos_token: Optional[str] = None) -> "CharTokenizer":
        """The tokenizer of ``text``'s characters."""
        return cls(sorted(set(text)), eos_token)

    def encode_array(self, text: str) -> np.ndarray:
        codepoints = _codepoints(text)
        inside = codepoints < len(self._table)
        ids = np.full(len(codepoints), -1, dtype=np.int64)
        ids[inside] = self._table[codepoints[inside]]
        if len(ids) and ids.min() < 0:
            unknown = sorted({chr(c) for c in codepoints[ids < 0].tolist()})
            raise UserError(f"characters not in the vocabulary: {''.join(unknown)[:40]!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        chars, eos = self.chars, self.eos_id
        return "".join(self.eos_token if int(i) == eos else chars[int(i)] for i in ids)

    def _identity(self):
        return {"kind": self.kind, "chars": "".join(self.chars), "eos_token": self.eos_token}

    def spec(self) -> dict:
        """ds_hydra's own description of this tokenizer (its ``tokenizer.json``)."""
        return {"type": "ds_hydra.char", "chars": "".join(self.chars), "eos_token": self.eos_token}

    def _file_text(self) -> str:
        return json.dumps(self.spec()) + "\n"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens (ids 0..255); the end-of-text token, if any, is id 256."""

    kind = "bytes"

    def __init__(self, eos_token: Optional[str] = None):
        self.eos_token = eos_token
        self.eos_id = 256 if eos_token is not None else None
        self.vocab_size = 256 + (eos_token is not None)

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if int(i) == self.eos_id:
                parts += [run.decode("utf-8", errors="replace"), self.eos_token]
                run = bytearray()
            else:
                run.append(int(i))
        parts.append(run.decode("utf-8", errors="replace"))  # generated bytes may stop inside a character
        return "".join(parts)

    def _identity(self):
        return {"kind": self.kind, "eos_token": self.eos_token}

    def spec(self) -> dict:
        """ds_hydra's own description of this tokenizer (its ``tokenizer.json``)."""
        return {"type": "ds_hydra.bytes", "eos_token": self.eos_token}

    def _file_text(self) -> str:
        return json.dumps(self.spec()) + "\n"


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``: BPE trained here (kind bpe) or read from disk (kind hf)."""

    def __init__(self, tokenizer, kind: str, eos_token: Optional[str], source: str = ""):
        self.kind = kind
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_token = eos_token
        self.eos_id = None
        if eos_token is not None:
            if eos_token not in vocab:
                where = f" of {source}" if source else ""
                raise UserError(f"tokenizer.eos_token={eos_token!r}: not in the vocabulary{where}")
            self.eos_id = vocab[eos_token]
        # Cutting a text where a line starts is exact for regex pre-tokenizers, not where a tokenizer
        # prepends a marker to every input (SentencePiece's Metaspace): such texts are encoded whole.
        spec = tokenizer.to_str()
        self._split_exactly = '"Metaspace"' not in spec and '"Prepend"' not in spec
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        # Text is text: a document holding "<|endoftext|>" must not yield the eos id. The library's
        # switch for that (encode_special_tokens) slows every encode by a third or more, so it is
        # turned on only for the rare texts that contain a special token's string.
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode_array(self, text: str) -> np.ndarray:
        return self.encode_arrays([text])[0]

    def encode_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Each text's ids; long texts are cut at line starts and all pieces encoded in one batch."""
        pieces, owners = [], []
        size = self._piece_size(texts)
        for n, text in enumerate(texts):
            parts = split_at_lines(text, size) if size else [text]
            pieces += parts
            owners += [n] * len(parts)
        encoded = self._encode_pieces(pieces)
        out: List[List[np.ndarray]] = [[] for _ in texts]
        for owner, enc in zip(owners, encoded):
            out[owner].append(np.asarray(enc.ids, dtype=np.int64))
        return [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in out]

    def _piece_size(self, texts: Sequence[str]) -> Optional[int]:
        """How long the pieces of ``texts`` should be, or None to leave them whole."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if not self._split_exactly or len(texts) >= 4 * cores:
            return None
        return max(PIECE_CHARS, sum(map(len, texts)) // (4 * cores))

    def _encode_pieces(self, pieces: List[str]) -> list:
        special = [n for n, p in enumerate(pieces) if self._specials is not None and self._specials.search(p)]
        if not special:
            return self._encode_batch(pieces, add_special_tokens=False)
        encoded = list(self._encode_batch(pieces, add_special_tokens=False))
        self.tokenizer.encode_special_tokens = True
        try:
            for n, enc in zip(special, self._encode_batch([pieces[n] for n in special], add_special_tokens=False)):
                encoded[n] = enc
        finally:
            self.tokenizer.encode_special_tokens = False
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _identity(self):  # the vocabulary alone: the same file read with another eos_token still matches
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        return {"vocab": sorted(vocab.items(), key=lambda kv: kv[1])}

    def _file_text(self) -> str:
        return self.tokenizer.to_str(pretty=True) + "\n"


def split_at_lines(text: str, size: int) -> List[str]:
    """``text`` cut into pieces of about ``size`` characters, each cut just after a newline between two
    non-space characters. GPT-2-style pre-tokenizers split there anyway (the newline is a piece of its
    own, the next word starts another), so encoding the pieces gives the ids of the whole."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = _line_start(text, start + size, min(len(text), start + 2 * size))
        if cut is None:
            break  # no safe place nearby: the rest stays whole
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _line_start(text: str, begin: int, end: int) -> Optional[int]:
    at = text.find("\n", max(begin - 1, 1), end)
    while at != -1 and at + 1 < end:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            return at + 1
        at = text.find("\n", at + 1, end)
    return None


# -- building and loading --------------------------------------------------------------------------


def require_tokenizers():
    """The Hugging Face ``tokenizers`` package, or one line saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            "tokenizer=bpe/hf: needs the Hugging Face tokenizers package; pip install 'ds-hydra[tokenizers]'"
        ) from None
    return tokenizers


def train_bpe(texts: Iterable[str], cfg) -> HFTokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained on ``texts``; deterministic."""
    tk = require_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=int(cfg.vocab_size),
        min_frequency=int(cfg.min_frequency),
        special_tokens=[cfg.eos_token],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return HFTokenizer(tokenizer, "bpe", cfg.eos_token)


def build_tokenizer(cfg, texts=None, model_pretrained: Optional[str] = None) -> Tokenizer:
    """The tokenizer of ``cfg`` (the tokenizer group); ``texts()`` returns the training text as an
    iterable of strings when the kind learns from it (char: its characters; bpe: merges)."""
    kind = cfg.kind
    if kind == "char":
        chars = set()
        for text in texts():
            chars.update(text)
        return CharTokenizer(sorted(chars), cfg.get("eos_token"))
    if kind == "bytes":
        return BytesTokenizer(cfg.get("eos_token"))
    if kind == "bpe":
        return train_bpe(texts(), cfg)
    if kind == "hf":
        path = cfg.get("path") or model_pretrained
        if not path:
            raise UserError("tokenizer.path is not set: give a tokenizer.json or a model directory (tokenizer=hf tokenizer.path=...)")
        return load_hf_tokenizer(path, cfg.get("eos_token"))
    raise UserError(f"tokenizer.kind={kind}: must be one of char, bytes, bpe, hf")


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer saved in ``directory`` by ``Tokenizer.save``."""
    directory = Path(directory)
    meta = read_json(directory / TOKENIZER_META_FILE)
    if meta.get("format") != META_FORMAT or meta.get("kind") not in ("char", "bytes", "bpe", "hf"):
        raise UserError(f"{directory / TOKENIZER_META_FILE}: not a ds_hydra tokenizer description")
    kind, eos = meta["kind"], meta.get("eos_token")
    if kind in ("bpe", "hf"):
        tk = require_tokenizers()
        try:
            tokenizer = tk.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:
            raise UserError(f"{directory / TOKENIZER_FILE}: not a readable tokenizer ({_first_line(exc)})") from None
        loaded: Tokenizer = HFTokenizer(tokenizer, kind, eos, str(directory))
    else:
        # A model directory exported for transformers (task=export_hf) keeps transformers' tokenizer.json and
        # ds_hydra's own description of a char or bytes tokenizer inside tokenizer_meta.json.
        spec = meta.get(EMBEDDED_SPEC_KEY) or read_json(directory / TOKENIZER_FILE)
        if not isinstance(spec, dict) or spec.get("type") != f"ds_hydra.{kind}":
            raise UserError(f"{directory / TOKENIZER_FILE}: not the {kind} tokenizer that {TOKENIZER_META_FILE} describes")
        loaded = CharTokenizer(list(spec["chars"]), eos) if kind == "char" else BytesTokenizer(eos)
    if meta.get("fingerprint") and loaded.fingerprint() != meta["fingerprint"]:
        raise UserError(f"{directory / TOKENIZER_FILE}: changed since it was saved (its fingerprint differs from {TOKENIZER_META_FILE})")
    return loaded


def has_saved_tokenizer(directory) -> bool:
    return (Path(directory) / TOKENIZER_META_FILE).is_file()


def load_hf_tokenizer(path, eos_token: Optional[str] = None) -> Tokenizer:
    """A local Hugging Face tokenizer: a tokenizer.json, or a directory with one (a model dir, a
    ds_hydra data or run dir); a model dir with only SentencePiece/vocab files goes through
    transformers (local files only)."""
    where = Path(str(path)).expanduser()
    if where.is_dir() and has_saved_tokenizer(where):
        saved = load_tokenizer(where)
        if eos_token is not None and eos_token != saved.eos_token:
            raise UserError(f"tokenizer.eos_token={eos_token!r}: the tokenizer saved in {where} uses {saved.eos_token!r}")
        return saved
    tk = require_tokenizers()
    folder = where if where.is_dir() else where.parent
    file = where / TOKENIZER_FILE if where.is_dir() else where
    if file.is_file():
        try:
            tokenizer = tk.Tokenizer.from_file(str(file))
        except Exception as exc:
            raise UserError(f"tokenizer.path={path}: not a readable tokenizer.json ({_first_line(exc)})") from None
    elif where.is_dir():
        tokenizer = _from_transformers(where, path)
    else:
        raise UserError(f"tokenizer.path={path}: no such file or directory (give a tokenizer.json or a model directory)")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    eos = eos_token or _configured_eos(folder) or next((t for t in KNOWN_EOS if t in vocab), None)
    return HFTokenizer(tokenizer, "hf", eos, str(where))


def _from_transformers(folder: Path, path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"tokenizer.path={path}: no {TOKENIZER_FILE} in it (reading other formats needs transformers)") from None
    from ds_hydra.common.remote_code import refuse_remote_code

    refuse_remote_code(folder, f"tokenizer.path={path}")  # before transformers could prompt on stdin
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise UserError(f"tokenizer.path={path}: no {TOKENIZER_FILE}, and transformers cannot read it ({_first_line(exc)})") from None
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer.path={path}: no {TOKENIZER_FILE} and no fast tokenizer to convert")
    return backend


def _configured_eos(folder: Path) -> Optional[str]:
    """The eos_token of a model directory's tokenizer_config.json (a string or {"content": ...})."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, OSError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def tokenizer_mismatch(tokenizer: Tokenizer, pretrained: str) -> Optional[str]:
    """Why ``tokenizer`` differs from the pretrained model's tokenizer in ``pretrained``, or None
    (also None when that directory has no tokenizer to compare with)."""
    folder = Path(str(pretrained)).expanduser()
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    theirs = load_hf_tokenizer(folder)
    if tokenizer.fingerprint() == theirs.fingerprint():
        return None
    return (
        f"the data's {tokenizer} is not the tokenizer of model.pretrained={pretrained} ({theirs}); prepare the "
        f"data with tokenizer=hf tokenizer.path={pretrained}"
    )


# -- helpers ---------------------------------------------------------------------------------------


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- a run's own copy ------------------------------------------------------------------------------

RUN_TOKENIZER_DIR = "tokenizer"  # <run dir>/tokenizer/: what the run's data was encoded with


def save_run_tokenizer(data, run_dir) -> None:
    """Save the data's tokenizer (if it has one) into ``<run_dir>/tokenizer/``; a resumed run checks that
    its data still has the tokenizer it started with."""
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        return
    folder = Path(run_dir) / RUN_TOKENIZER_DIR
    if has_saved_tokenizer(folder):
        _check_same(load_tokenizer(folder), tokenizer, folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)


def adopt_run_tokenizer(data, run_dir) -> None:
    """A trained run's data encodes and decodes with the tokenizer saved in its directory; data whose
    tokenizer has changed since (a data dir prepared again with other settings) is refused."""
    folder = Path(run_dir) / RUN_TOKENIZER_DIR
    if not has_saved_tokenizer(folder):
        return  # a run from before tokenizers were saved, or data without text
    saved = load_tokenizer(folder)
    if getattr(data, "tokenizer", None) is not None:
        _check_same(saved, data.tokenizer, folder)
    data.tokenizer = saved


def _check_same(saved: Tokenizer, current: Tokenizer, folder: Path) -> None:
    if saved.fingerprint() != current.fingerprint():
        raise UserError(
            f"{folder}: the run was trained with the {saved}, but its data now has the {current} "
            "(was the data prepared again?); use the data the run trained on"
        )
