"""Atomic file writes: a reader (or a crash) sees a file's old content or its new content, never half.
What they leave has the mode any new file gets (``new_file_mode``), not a temp file's private 0600."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "fsync_dir", "new_dir_mode", "new_file_mode", "umask"]


def umask() -> int:
    """This process's umask, read without setting it (``os.umask`` sets it, and a file another thread
    creates meanwhile would get the wrong mode): Linux's /proc/self/status, else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0644 under the usual umask 022). Temp files are made 0600;
    what a run keeps gets this mode, so every file of a run has the same one."""
    return 0o666 & ~umask()


def new_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory (0755 under umask 022); ``mkdtemp`` makes them 0700."""
    return 0o777 & ~umask()


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``.

    Readers see the old content or the new, never half of it; on an error (a full disk) the temp
    file is removed and the error propagates, leaving ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # as any new file of the run, not the temp file's private 0600
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: Path, value: Any, indent: int = 1, **dumps) -> None:
    """``value`` as JSON (one trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
