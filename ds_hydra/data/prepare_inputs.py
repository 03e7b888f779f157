"""Input files of ``task=prepare``: finding them, cutting them into work items, reading their documents.

Formats: plain text (``.txt``, ``.text``, ``.md``: each file is one document), JSON Lines (``.jsonl``,
``.ndjson``: each line a record, its ``text_field`` a document) and Parquet (``.parquet``: each row's
``text_field`` column a document; needs pyarrow). Work items ("chunks") hold about ``chunk_bytes`` of
input: several small files, or a slice of a large one, so memory stays bounded whatever the file
sizes. A large text file is cut just after a newline between two non-space characters, where
GPT-2-style pre-tokenizers split anyway; JSONL at line starts; Parquet at row groups.

Every problem names the file, and the byte offset where there is one, in one line.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

from ds_hydra.errors import UserError

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
SUPPORTED = ", ".join(FORMATS)
_SEARCH = 1 << 16  # bytes read at a time while looking for a place to cut a text file


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # text | jsonl | parquet
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Segment:
    """Part of one file: bytes [start, end) of text or JSONL, or row groups [start, end) of Parquet."""

    path: str
    format: str
    start: int
    end: int
    ends_document: bool  # False only for a text file's leading pieces (no end-of-text token after them)
    nbytes: int  # its share of the file's bytes (for progress)


Chunk = Tuple[Segment, ...]


@dataclass(frozen=True)
class ReadSettings:
    """How segments become documents (what a worker needs besides the tokenizer)."""

    text_field: str = "text"
    errors: str = "strict"  # strict: non-UTF-8 bytes are an error; replace: they become U+FFFD


# -- finding the inputs ----------------------------------------------------------------------------


def resolve_inputs(patterns, format: str = "auto", key: str = "prepare.input") -> List[InputFile]:
    """Files named by ``patterns`` (files, directories searched recursively, globs with ``**``): each
    pattern's matches in sorted order, duplicates dropped; refuses missing, empty and unknown files."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UserError(f"{key} is not set: give files, directories or globs of {SUPPORTED} files")
    found: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{key}={pattern}: matches no files")
        elif os.path.isdir(pattern):
            matches = sorted(
                str(p) for p in Path(pattern).rglob("*")
                if p.is_file() and not p.name.startswith(".") and (format != "auto" or p.suffix.lower() in FORMATS)
            )
            if not matches:
                raise UserError(f"{key}={pattern}: the directory holds no {SUPPORTED} files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise UserError(f"{key}={pattern}: no such file or directory")
        found += [m for m in matches if m not in found]
    return [_input_file(path, format) for path in found]


def _input_file(path: str, format: str) -> InputFile:
    kind = format if format != "auto" else FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unsupported input format ({Path(path).suffix or 'no extension'}); use {SUPPORTED} files or set prepare.format")
    stat = os.stat(path)
    if stat.st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); remove it from prepare.input")
    return InputFile(path, kind, stat.st_size, stat.st_mtime_ns)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- cutting them into chunks ----------------------------------------------------------------------


def plan_chunks(files: Sequence[InputFile], chunk_bytes: int, text_field: str = "text") -> List[Chunk]:
    """Work items in input order: consecutive segments adding up to about ``chunk_bytes`` each."""
    chunks: List[Chunk] = []
    current: List[Segment] = []
    filled = 0
    for file in files:
        for segment in _segments(file, chunk_bytes, text_field):
            if current and filled + segment.nbytes > chunk_bytes:
                chunks.append(tuple(current))
                current, filled = [], 0
            current.append(segment)
            filled += segment.nbytes
    if current:
        chunks.append(tuple(current))
    return chunks


def _segments(file: InputFile, chunk_bytes: int, text_field: str) -> Iterator[Segment]:
    if file.format == "parquet":
        yield from _parquet_segments(file, text_field)
        return
    cuts = [0]
    with open(file.path, "rb") as f:
        while file.size - cuts[-1] > chunk_bytes:
            cut = _cut_after(f, cuts[-1] + chunk_bytes, file.size, line_start_only=file.format == "jsonl")
            if cut is None:
                break  # no place to cut in the rest: it stays one segment
            cuts.append(cut)
    cuts.append(file.size)
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        yield Segment(file.path, file.format, start, end, i == len(cuts) - 2 or file.format == "jsonl", end - start)


def _cut_after(f, offset: int, size: int, line_start_only: bool):
    """The first offset >= ``offset`` (and < ``size``) just after a newline where the file may be
    cut, or None. A window keeps 4 bytes on each side of the searched span for the neighbours' bytes."""
    position = offset
    while position < size:
        start = max(position - 4, 0)
        f.seek(start)
        window = f.read(position - start + _SEARCH + 4)
        limit = position - start + _SEARCH
        at = window.find(b"\n", position - start, limit)
        while at != -1:
            cut = start + at + 1
            if cut >= size:
                return None
            if line_start_only or _between_non_spaces(window, at):
                return cut
            at = window.find(b"\n", at + 1, limit)
        position += _SEARCH
    return None


def _between_non_spaces(window: bytes, at: int) -> bool:
    """Whether the newline at ``window[at]`` has a non-space character on each side."""
    before = window[max(at - 4, 0):at].decode("utf-8", errors="ignore")[-1:]
    after = window[at + 1:at + 5].decode("utf-8", errors="ignore")[:1]
    return bool(before) and bool(after) and not before.isspace() and not after.isspace()


def _parquet_segments(file: InputFile, text_field: str) -> Iterator[Segment]:
    """One segment per row group; its share of the file's bytes in proportion to its uncompressed size."""
    metadata = _parquet_file(file.path).metadata
    columns = [metadata.schema.column(i).name for i in range(metadata.num_columns)]
    if text_field not in columns:
        raise UserError(f"{file.path}: no column '{text_field}' (columns: {', '.join(columns)}); set prepare.text_field")
    sizes = [metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)]
    for group, size in enumerate(sizes):
        yield Segment(file.path, "parquet", group, group + 1, True, file.size * size // max(sum(sizes), 1))


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow; pip install 'ds-hydra[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).strip().splitlines()[0][:200]})") from None


# -- reading documents -----------------------------------------------------------------------------


def read_documents(segment: Segment, settings: ReadSettings) -> List[str]:
    """The documents (or, for a text file cut in several, the piece of one) in ``segment``."""
    if segment.format == "parquet":
        return _parquet_documents(segment, settings)
    with open(segment.path, "rb") as f:
        f.seek(segment.start)
        data = f.read(segment.end - segment.start)
    if segment.format == "text":
        return [_decode(data, segment.path, segment.start, settings.errors)]
    return _jsonl_documents(data, segment, settings)


FIX_ENCODING = "fix the file or set prepare.errors=replace"


def _decode(data: bytes, path: str, offset: int, errors: str, fix: str = FIX_ENCODING) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: byte {offset + exc.start}: not UTF-8 ({exc.reason}); {fix}") from None


def jsonl_records(data: bytes, path: str, offset: int = 0, errors: str = "strict", fix: str = FIX_ENCODING) -> Iterator[Tuple[object, int]]:
    """``(record, byte offset)`` of each non-blank line of ``data`` (which starts at ``offset`` in ``path``)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        line, at = data[start:end], offset + start
        start = end + 1
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) hold no record
        try:
            yield json.loads(_decode(line, path, at, errors, fix)), at
        except ValueError as exc:
            if isinstance(exc, UnicodeDecodeError):
                raise
            raise UserError(f"{path}: byte {at}: the line is not JSON ({str(exc).split(':')[0]})") from None


def _jsonl_documents(data: bytes, segment: Segment, settings: ReadSettings) -> List[str]:
    documents, field = [], settings.text_field
    for record, offset in jsonl_records(data, segment.path, segment.start, settings.errors):
        if not isinstance(record, dict) or field not in record:
            fields = f" (fields: {', '.join(map(str, record))[:200]})" if isinstance(record, dict) else ""
            raise UserError(f"{segment.path}: byte {offset}: the record has no '{field}' field{fields}; set prepare.text_field")
        text = record[field]
        if not isinstance(text, str):
            raise UserError(f"{segment.path}: byte {offset}: '{field}' is {type(text).__name__}, not a string")
        documents.append(text)
    return documents


def _parquet_documents(segment: Segment, settings: ReadSettings) -> List[str]:
    table = _parquet_file(segment.path).read_row_groups(list(range(segment.start, segment.end)), columns=[settings.text_field])
    values = table.column(0).to_pylist()
    first_row = _rows_before(segment)
    for i, text in enumerate(values):
        if not isinstance(text, str):
            what = "null" if text is None else type(text).__name__
            raise UserError(f"{segment.path}: row {first_row + i}: column '{settings.text_field}' is {what}, not a string")
    return values


def _rows_before(segment: Segment) -> int:
    metadata = _parquet_file(segment.path).metadata
    return sum(metadata.row_group(g).num_rows for g in range(segment.start))
