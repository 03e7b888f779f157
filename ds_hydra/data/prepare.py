"""``task=prepare``: tokenize text, JSONL or Parquet files into nanoGPT-style token files.

    python -m ds_hydra task=prepare prepare.input='corpus/*.txt' prepare.output=data/mycorpus \\
        tokenizer=bpe tokenizer.vocab_size=8192

writes ``data/mycorpus/``: ``train.bin`` and ``val.bin`` (token ids, uint16 when the vocabulary fits,
else uint32), ``meta.json`` (vocabulary size, dtype, token counts, tokenizer, the inputs' hashes) and
the tokenizer (``tokenizer.json``, ``tokenizer_meta.json``). ``data=tokens data.dir=data/mycorpus``
trains on it.

* Streaming: the input is read in work items of about ``prepare.chunk_bytes``; at most
  ``2 * num_proc`` are in flight, so memory stays bounded whatever the corpus size.
* Deterministic: items are written in input order, so the files are the same for any ``num_proc``.
* Atomic: everything is built in a hidden directory beside the output and renamed into place at the
  end; a failure or Ctrl-C removes it and leaves the output as it was.
* Idempotent: meta.json records a hash of the inputs and settings; a re-run that finds them unchanged
  does nothing and says so (``prepare.force=true`` rebuilds).

Documents (a text file, a JSONL record, a Parquet row) are each followed by the tokenizer's
end-of-text token; the last ``prepare.val_fraction`` of the token stream validates.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ds_hydra.data import prepare_inputs
from ds_hydra.data.prepare_inputs import Chunk, InputFile, ReadSettings
from ds_hydra.data.tokens import (
    DATA_FORMAT,
    META_FILE,
    TRAIN_FILE,
    VAL_FILE,
    dtype_for_vocab,
    is_prepared_dir,
    read_meta,
)
from ds_hydra.data.tokenizer import TOKENIZER_FILE, TOKENIZER_META_FILE, Tokenizer, build_tokenizer, load_tokenizer
from ds_hydra.errors import UserError
from ds_hydra.common.terminal import log_lines_beside_bar

log = logging.getLogger(__name__)

# What a prepared directory holds; anything else in an existing output means it is not ours to replace.
OUTPUT_FILES = {TRAIN_FILE, VAL_FILE, META_FILE, TOKENIZER_FILE, TOKENIZER_META_FILE}
# Bumped when the bytes written for the same inputs and settings change (a re-run then rebuilds).
RECIPE_VERSION = 1


def prepare_dataset(
    files: Sequence[InputFile],
    output: Path,
    tokenizer_cfg: Dict[str, Any],
    settings: ReadSettings = ReadSettings(),
    train_fraction: float = 0.9,
    num_proc: int = 1,
    chunk_bytes: int = 4 << 20,
    force: bool = False,
    pretrained: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Tokenize ``files`` into the prepared directory ``output``; returns what meta.json records
    (plus ``up_to_date: True`` when nothing had to be done)."""
    with _sole_writer(output):
        return _prepare_dataset(files, output, tokenizer_cfg, settings, train_fraction, num_proc, chunk_bytes, force,
                                pretrained, progress)


def _prepare_dataset(files, output, tokenizer_cfg, settings, train_fraction, num_proc, chunk_bytes, force, pretrained,
                     progress) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    previous = _existing_output(output)
    cfg = OmegaConf.create(tokenizer_cfg)
    # A tokenizer read from disk is known now; char and bpe are learnt from the inputs below.
    given = build_tokenizer(cfg, model_pretrained=pretrained) if cfg.kind in ("bytes", "hf") else None
    inputs = _input_records(files, previous)
    recipe = {
        "version": RECIPE_VERSION,
        "inputs": [record["sha256"] for record in inputs],
        "tokenizer": given.fingerprint() if given is not None else tokenizer_cfg,
        "eos_token": cfg.get("eos_token"),
        "train_fraction": train_fraction,
        "text_field": settings.text_field,
        "errors": settings.errors,
        "chunk_bytes": chunk_bytes,
    }
    recipe_hash = _hash_json(recipe)
    if previous is not None and previous.get("recipe") == recipe_hash and not force and _complete(output, previous):
        log.info("%s is up to date with its %d input file(s) and settings: nothing to do (prepare.force=true rebuilds)", output, len(files))
        return {**previous, "up_to_date": True}

    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output), dir=_parent(output)))
    try:
        chunks = prepare_inputs.plan_chunks(files, chunk_bytes, settings.text_field)
        with Workers(num_proc, settings) as workers:
            tokenizer = given or _learn_tokenizer(cfg, chunks, settings, workers)
            _check_tokenizer_fits(tokenizer, pretrained)
            tokenizer.save(staging)
            dtype = dtype_for_vocab(tokenizer.vocab_size)
            if tokenizer.eos_id is None:
                log.info("the %s has no end-of-text token: documents are joined as they are (set tokenizer.eos_token to separate them)", tokenizer)
            workers.start(staging, dtype)
            with log_lines_beside_bar(progress and sys.stderr.isatty()):  # log lines print above the bar
                counts = _write_tokens(chunks, workers, staging / TRAIN_FILE, sum(f.size for f in files), progress)
        n_train, n_val = _split_tail(staging / TRAIN_FILE, staging / VAL_FILE, counts["tokens"], train_fraction, dtype)
        meta = {
            "format": DATA_FORMAT,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokens": {"train": n_train, "val": n_val},
            "documents": counts["documents"],
            "input_bytes": sum(f.size for f in files),
            "tokenizer": tokenizer.describe(),
            "inputs": inputs,
            "settings": {k: v for k, v in recipe.items() if k not in ("inputs", "version")},
            "recipe": recipe_hash,
        }
        from ds_hydra.common.files import atomic_write_text

        atomic_write_text(staging / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published
    log.info(
        "wrote %s: %s train + %s val tokens (%s), %d documents, vocab %d (%s)",
        output, f"{n_train:,}", f"{n_val:,}", meta["dtype"], counts["documents"], tokenizer.vocab_size, tokenizer,
    )
    return meta


# -- the output directory --------------------------------------------------------------------------


def _staging_prefix(output: Path) -> str:
    return f".{output.name}.prepare-"  # the hidden directory a prepare builds its output in


def _replaced_prefix(output: Path) -> str:
    return f".{output.name}.old-"  # where the output it replaces waits to be deleted


@contextlib.contextmanager
def _sole_writer(output: Path) -> Iterator[None]:
    """One prepare per output at a time: a lock beside it (the output itself is replaced by a rename),
    taken as a run dir's lock is (a live holder refuses a second prepare in one line; a dead one's lock
    is taken over). The holder then owns the hidden directories interrupted prepares left beside the
    output, and removes them."""
    from ds_hydra.common.run_lock import acquire

    parent = _parent(output)
    lock = acquire(parent, what="prepare.output", lock_file=f".{output.name}.prepare.lock",
                   subject=f"prepare.output={output}", announce=False)
    try:
        leftovers = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith((_staging_prefix(output), _replaced_prefix(output)))]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            log.info("%s: removed %d hidden director%s left by interrupted prepares (%s)", parent, len(leftovers),
                     "y" if len(leftovers) == 1 else "ies", ", ".join(sorted(p.name for p in leftovers)))
        yield
    finally:
        lock.release()


def _parent(output: Path) -> Path:
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"prepare.output={output}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"prepare.output={output}: {parent} is not writable; choose another prepare.output")
    return parent


def _existing_output(output: Path) -> Optional[dict]:
    """The meta.json of an earlier prepare into ``output`` (None if there is no output yet); refuses
    an output that holds anything prepare did not write."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise UserError(f"prepare.output={output}: is a file; give a directory (new, empty, or written by prepare)")
    names = {p.name for p in output.iterdir()}
    if not names:
        return None
    if not is_prepared_dir(output) or names - OUTPUT_FILES:
        other = sorted(names - OUTPUT_FILES) or sorted(names)
        raise UserError(
            f"prepare.output={output}: holds files prepare did not write ({', '.join(other[:3])}); "
            "choose a new or empty directory"
        )
    try:
        return read_meta(output)
    except UserError:
        return {}  # a meta.json of an older format: rebuild


def _complete(output: Path, meta: dict) -> bool:
    """Whether the token files are all there with the sizes meta.json gives."""
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    tokens = meta.get("tokens") or {}
    for name, split in ((TRAIN_FILE, "train"), (VAL_FILE, "val")):
        path = output / name
        if not path.is_file() or path.stat().st_size != itemsize * int(tokens.get(split, -1)):
            return False
    return (output / TOKENIZER_META_FILE).is_file()


def _publish(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``; an earlier output (checked to be prepare's) is replaced."""
    from ds_hydra.common.files import fsync_dir, new_dir_mode, new_file_mode

    for path in staging.iterdir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        path.chmod(new_file_mode())  # temp files are private (0600); the data is as shareable as any new file
    staging.chmod(new_dir_mode())
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=_replaced_prefix(output), dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(staging, output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- the inputs ------------------------------------------------------------------------------------


def _input_records(files: Sequence[InputFile], previous: Optional[dict]) -> List[dict]:
    """Path, size, mtime and SHA-256 of each input; a file whose path, size and mtime match the
    previous run's record keeps its recorded hash (what make and rsync trust), others are hashed."""
    known = {(r.get("path"), r.get("size"), r.get("mtime_ns")): r.get("sha256") for r in (previous or {}).get("inputs", [])}
    records = []
    to_hash = sum(f.size for f in files if (f.path, f.size, f.mtime_ns) not in known)
    if to_hash > 256 << 20:
        log.info("hashing %.1f GB of input", to_hash / 1e9)
    for f in files:
        sha = known.get((f.path, f.size, f.mtime_ns)) or prepare_inputs.file_sha256(f.path)
        records.append({"path": f.path, "format": f.format, "size": f.size, "mtime_ns": f.mtime_ns, "sha256": sha})
    return records


def _learn_tokenizer(cfg, chunks: Sequence[Chunk], settings: ReadSettings, workers: "Workers") -> Tokenizer:
    """A char tokenizer's character set (a parallel pass) or BPE merges (trained on the documents in order)."""
    if cfg.kind == "char":
        log.info("collecting the character set of the input")
        texts = lambda: workers.map(_chars_of_chunk, chunks)  # noqa: E731
    else:
        log.info("training byte-level BPE to %d tokens on %s", cfg.vocab_size, "the input" if cfg.train_chars is None else f"its first {cfg.train_chars:,} characters")
        texts = lambda: _documents_upto(chunks, settings, cfg.train_chars)  # noqa: E731
    started = time.perf_counter()
    tokenizer = build_tokenizer(cfg, texts)
    log.info("%s learnt in %.1f s", tokenizer, time.perf_counter() - started)
    return tokenizer


def _documents_upto(chunks: Sequence[Chunk], settings: ReadSettings, limit: Optional[int]) -> Iterator[str]:
    seen = 0
    for chunk in chunks:
        for segment in chunk:
            for text in prepare_inputs.read_documents(segment, settings):
                if limit is not None and seen + len(text) > limit:
                    yield text[: max(limit - seen, 0)]
                    return
                seen += len(text)
                yield text
            _check_stop()


# -- the work: one function per pass, run in worker processes or in this one ----------------------------

_worker: Dict[str, Any] = {}  # this process's settings, tokenizer and output dtype


def _setup_worker(settings: ReadSettings, tokenizer_dir: Optional[str], dtype: Optional[str], child: bool) -> None:
    if child:  # a worker process: the parent handles Ctrl-C
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.clear()
    _worker["settings"] = settings
    if tokenizer_dir is not None:
        try:
            _worker["tokenizer"] = load_tokenizer(tokenizer_dir)
        except Exception as exc:  # raised by the first task: a failing initializer would be restarted forever
            _worker["error"] = exc
        _worker["dtype"] = np.dtype(dtype)


def _chars_of_chunk(chunk: Chunk) -> str:
    chars = set()
    for segment in chunk:
        for text in prepare_inputs.read_documents(segment, _worker["settings"]):
            chars.update(text)
    return "".join(sorted(chars))


def _encode_chunk(chunk: Chunk):
    """The chunk's token ids (each finished document followed by the end-of-text id), its number of
    documents and of input bytes."""
    if "error" in _worker:
        raise _worker["error"]
    tokenizer: Tokenizer = _worker["tokenizer"]
    texts, ends = [], []
    for segment in chunk:
        documents = prepare_inputs.read_documents(segment, _worker["settings"])
        texts += documents
        ends += [segment.ends_document] * len(documents)  # False only for a text file's leading pieces
    encoded = tokenizer.encode_arrays(texts) if hasattr(tokenizer, "encode_arrays") else [tokenizer.encode_array(t) for t in texts]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    pieces = []
    for ids, ends_document in zip(encoded, ends):
        if not len(ids) and ends_document:
            continue  # an empty document adds nothing, not even a separator
        pieces.append(ids)
        if ends_document and eos:
            pieces.append(np.asarray(eos, dtype=np.int64))
    tokens = np.concatenate(pieces).astype(_worker["dtype"]) if pieces else np.zeros(0, _worker["dtype"])
    documents = sum(1 for ids, end in zip(encoded, ends) if end and len(ids))
    return tokens, documents, sum(s.nbytes for s in chunk)


class Workers:
    """``num_proc`` processes (or this one, for 1) that run the passes over chunks, results in order.

    Worker processes are forked when the platform can (they start at once and need not re-import
    the caller's main module), with the tokenizers library's own threads off in them: the processes
    share out the cores instead.
    """

    def __init__(self, num_proc: int, settings: ReadSettings):
        self.num_proc = num_proc
        self.settings = settings
        self.tokenizer_dir: Optional[str] = None
        self.dtype: Optional[str] = None
        self.pool = None
        _setup_worker(settings, None, None, child=False)

    def __enter__(self) -> "Workers":
        return self

    def start(self, tokenizer_dir: Path, dtype) -> None:
        """Give every worker the saved tokenizer and the output dtype (workers started later get them)."""
        self.close()
        self.tokenizer_dir, self.dtype = str(tokenizer_dir), np.dtype(dtype).name
        if self.num_proc == 1:
            _setup_worker(self.settings, self.tokenizer_dir, self.dtype, child=False)

    def _open(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers
        try:
            self.pool = context.Pool(self.num_proc, _setup_worker, (self.settings, self.tokenizer_dir, self.dtype, True))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def map(self, function: Callable, chunks: Sequence[Chunk]) -> Iterator:
        """``function(chunk)`` for each chunk, in order; at most ``2 * num_proc`` chunks in flight."""
        if self.num_proc == 1:
            for chunk in chunks:
                yield function(chunk)
                _check_stop()
            return
        if self.pool is None:
            self._open()
        todo = iter(chunks)
        pending = deque(self.pool.apply_async(function, (c,)) for c in islice(todo, 2 * self.num_proc))
        while pending:
            result = pending.popleft().get()
            _check_stop()
            following = next(todo, None)
            if following is not None:
                pending.append(self.pool.apply_async(function, (following,)))
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __exit__(self, *exc) -> None:
        self.close()


def _check_stop() -> None:
    """Ctrl-C or SIGTERM under the CLI only sets a flag: stop between chunks (the caller cleans up)."""
    from ds_hydra.common import signals

    if signals.stop_requested():
        raise KeyboardInterrupt


def _write_tokens(chunks: Sequence[Chunk], workers: Workers, path: Path, total_bytes: int, progress: bool) -> Dict[str, int]:
    counts = {"tokens": 0, "documents": 0}
    meter = Progress(total_bytes, enabled=progress)
    with open(path, "wb") as out:
        for tokens, documents, n_bytes in workers.map(_encode_chunk, chunks):
            tokens.tofile(out)
            counts["tokens"] += len(tokens)
            counts["documents"] += documents
            meter.update(n_bytes or 0, len(tokens))
    meter.close(counts["tokens"])
    if counts["tokens"] == 0:
        raise UserError("prepare.input: the input holds no text (every document is empty)")
    return counts


def _split_tail(train: Path, val: Path, n: int, train_fraction: float, dtype) -> tuple:
    """Move the last ``1 - train_fraction`` of the stream in ``train`` to ``val``."""
    n_train = int(n * train_fraction)
    n_val = n - n_train
    if n_train < 2 or n_val < 2:
        raise UserError(
            f"prepare.val_fraction: {n} tokens split into {n_train} train and {n_val} val; each needs at least 2 "
            "(more input, or another prepare.val_fraction)"
        )
    itemsize = np.dtype(dtype).itemsize
    with open(train, "rb+") as src, open(val, "wb") as dst:
        src.seek(n_train * itemsize)
        shutil.copyfileobj(src, dst, 16 << 20)
        src.truncate(n_train * itemsize)
    return n_train, n_val


def _check_tokenizer_fits(tokenizer: Tokenizer, pretrained: Optional[str]) -> None:
    if pretrained:
        from ds_hydra.data.tokenizer import tokenizer_mismatch

        problem = tokenizer_mismatch(tokenizer, pretrained)
        if problem:
            raise UserError(f"tokenizer: {problem}")


def _hash_json(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


class Progress:
    """A progress bar over input bytes with tokens/s and ETA (tqdm on a terminal, else a log line
    every 10 s)."""

    def __init__(self, total_bytes: int, enabled: bool = True, every_s: float = 10.0):
        self.total = total_bytes
        self.done = 0
        self.tokens = 0
        self.started = self.last = time.perf_counter()
        self.every_s = every_s
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n_bytes: int, n_tokens: int) -> None:
        self.done += n_bytes
        self.tokens += n_tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(n_bytes)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        elif self.enabled and now - self.last >= self.every_s:
            self.last = now
            fraction = self.done / max(self.total, 1)
            eta = (now - self.started) * (1 - fraction) / max(fraction, 1e-9)
            log.info("prepare: %.1f%% of %.1f MB, %s tokens, %s tok/s, ETA %dm%02ds",
                     100 * fraction, self.total / 1e6, f"{self.tokens:,}", f"{rate:,.0f}", *divmod(int(eta), 60))

    def close(self, tokens: int) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.started
        if self.enabled:
            log.info("tokenized %.1f MB into %s tokens in %.1f s (%s tok/s)", self.total / 1e6, f"{tokens:,}", elapsed, f"{tokens / max(elapsed, 1e-9):,.0f}")
