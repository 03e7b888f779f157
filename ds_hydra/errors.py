"""User-facing errors and their one-line rendering.

``UserError`` marks a problem the user can fix (bad config value, missing file); the CLI prints its
message on one line and exits with code 2 instead of showing a traceback. ``describe_exception``
turns Hydra's and OmegaConf's composition errors into the same one-line form.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

EXIT_USAGE = 2  # bad config or input: fix the command and run again


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and what is allowed."""

    exit_code = EXIT_USAGE  # subclasses that are not usage errors say otherwise


class ConfigError(UserError):
    """Several config problems found together; each one is a line of the message."""

    def __init__(self, problems: Iterable[str]):
        self.problems: List[str] = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} config problems:\n{lines}")


def user_error_in(exc: BaseException) -> Optional["UserError"]:
    """The ``UserError`` that ``exc`` wraps (Hydra's instantiate wraps errors raised by a ``_target_``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe_exception(exc: BaseException) -> str:
    """A one-line explanation of a composition error: the key, what was wrong, what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

    wrapped = user_error_in(exc)
    if wrapped is not None:
        return str(wrapped)
    from hydra.errors import HydraException

    if isinstance(exc, OSError) and not isinstance(exc, HydraException):  # Hydra's missing-config error is an OSError too
        return describe_os_error(exc)
    causes = [exc]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    for cause in reversed(causes):  # the innermost OmegaConf error names the key most precisely
        if isinstance(cause, OmegaConfBaseException):
            return _describe_omegaconf(cause, outer=str(exc))
    return _describe_hydra(str(exc))


# errno -> what to do about it; the run directory is the usual culprit.
_OS_ERROR_FIXES = {
    "ENOSPC": "the disk is full: free space (or lower trainer.keep_last), then continue with resume=<run dir>",
    "EDQUOT": "the disk quota is used up: free space (or lower trainer.keep_last), then continue with resume=<run dir>",
    "EFBIG": "the file is larger than this process may write (ulimit -f): raise the limit, then continue with resume=<run dir>",
    "EROFS": "the file system is read-only: choose a writable hydra.run.dir",
    "EACCES": "permission denied: choose a writable hydra.run.dir",
    "EPERM": "not permitted: choose a writable hydra.run.dir",
    "ENOTDIR": "a part of the path is a file, not a directory: choose another hydra.run.dir",
    "EEXIST": "a file is in the way of a directory: choose another hydra.run.dir",
    "ENOENT": "no such file or directory",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: the path, the system's reason, and what to do."""
    import errno as errno_codes

    path = exc.filename if exc.filename is not None else "?"
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_ERROR_FIXES.get(errno_codes.errorcode.get(exc.errno or -1, ""), "")
    fix = "" if not fix or fix.lower() == reason.lower() else f"; {fix}"
    return f"{path}: {reason}{fix}"


def _describe_omegaconf(exc, outer: str) -> str:
    key = getattr(exc, "full_key", None) or _quoted_key(outer) or "?"
    msg = getattr(exc, "msg", None) or str(exc)
    msg = msg.strip().splitlines()[0]
    object_type = getattr(exc, "object_type", None)
    name = type(exc).__name__
    if name in ("ConfigKeyError", "ConfigAttributeError") and object_type is not None:
        allowed = _dataclass_fields(object_type)
        hint = _did_you_mean(key.rsplit(".", 1)[-1], allowed)
        return f"{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
    enum = re.search(r"expected one of \[(.*)\]", msg)
    if enum:
        return f"{key}: {msg.split(',')[0].strip()}; allowed values: {enum.group(1)}"
    return f"{key}: {msg}"


def _describe_hydra(text: str) -> str:
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        hint = _did_you_mean(option, options)
        where = f"{group}={option}" if group else option
        listing = f"; available: {', '.join(options)}" if options else ""
        return f"{where}: no such config option{hint}{listing}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else text


def _quoted_key(text: str):
    found = re.search(r"'([\w.\[\]]+)'", text)
    return found.group(1) if found else None


def _dataclass_fields(object_type) -> List[str]:
    fields = getattr(object_type, "__dataclass_fields__", {})
    return [f for f in fields if not f.startswith("_")]


def _did_you_mean(word: str, options: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
