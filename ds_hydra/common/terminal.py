"""What a run shows on the terminal, beside what it logs (torch-free).

``log_lines_beside_bar``: while a tqdm progress bar is live, the console's log lines go through
``tqdm.write``, which clears the bar, prints the line and draws the bar again below it; written
straight to the stream, a log line would start where the bar's text ends and leave half a bar above it.
The run's log file is not touched.

``FILE_ONLY``: ``log.info(..., extra=FILE_ONLY)`` writes a record to the run's log file and not to the
terminal (the whole resolved config: about 140 lines the terminal need not scroll past), once
``keep_file_only_records_off_console`` has put its filter on the console's handlers.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, List, Tuple

__all__ = ["FILE_ONLY", "is_console_handler", "keep_file_only_records_off_console", "log_file_of", "log_lines_beside_bar",
           "minutes_text"]

FILE_ONLY = {"file_only": True}  # logging's ``extra``: this record goes to the run's log file only


def is_console_handler(handler: logging.Handler) -> bool:
    """A handler writing to the terminal's streams (not the run's log file)."""
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


class _OffConsole(logging.Filter):
    """Drops records logged with ``extra=FILE_ONLY``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def keep_file_only_records_off_console(logger: logging.Logger = None) -> None:
    """Put the ``FILE_ONLY`` filter on ``logger``'s (the root's) console handlers (once each)."""
    for handler in (logger or logging.getLogger()).handlers:
        if is_console_handler(handler) and not any(isinstance(f, _OffConsole) for f in handler.filters):
            handler.addFilter(_OffConsole())


def log_file_of(logger: logging.Logger = None):
    """The file ``logger``'s (the root's) first file handler writes (the run's log), or None."""
    for handler in (logger or logging.getLogger()).handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


class _BesideBar(logging.Handler):
    """A console handler's records, written with ``tqdm.write`` to the same stream, at the same level,
    through the same formatter and filters."""

    def __init__(self, console: logging.StreamHandler):
        super().__init__(console.level)
        self.console = console
        self.setFormatter(console.formatter)
        for item in console.filters:
            self.addFilter(item)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.console.stream)
        except Exception:  # as logging does: report on stderr, never raise into the run
            self.handleError(record)


@contextlib.contextmanager
def log_lines_beside_bar(enabled: bool = True, logger: logging.Logger = None) -> Iterator[None]:
    """Route ``logger``'s (the root's) console handlers through ``tqdm.write`` for the block."""
    logger = logger or logging.getLogger()
    try:
        import tqdm  # noqa: F401  (a dependency; a stripped install just keeps plain lines)
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    swapped: List[Tuple[int, logging.Handler]] = [(i, h) for i, h in enumerate(logger.handlers) if is_console_handler(h)]
    for i, handler in swapped:
        logger.handlers[i] = _BesideBar(handler)
    try:
        yield
    finally:
        for i, handler in swapped:
            if i < len(logger.handlers) and isinstance(logger.handlers[i], _BesideBar):
                logger.handlers[i] = handler


def minutes_text(seconds: float) -> str:
    """A duration as progress lines show it: ``125.4`` -> ``2m05s``."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"
