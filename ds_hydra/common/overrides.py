"""Hydra's command line as text: quoting an override value, and telling Hydra's options (``-m``,
``--config-name x``) from the overrides (``key=value``). Torch-free and Hydra-free: the CLI rewrites
its arguments with these before Hydra parses them."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

__all__ = [
    "quote", "unquote", "override_key", "split_options", "option_args", "has_option", "take_option",
    "CONFIG_OPTIONS", "MULTIRUN_OPTIONS",
]

# Hydra's command-line options that take a value (as the next argument unless written --option=value).
VALUE_OPTIONS = frozenset({"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                           "--config-dir", "-cd", "--experimental-rerun"})
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# The options that choose the configuration (a job started for the same run needs the same ones).
CONFIG_OPTIONS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
MULTIRUN_OPTIONS = ("-m", "--multirun")


def quote(value: Any) -> str:
    """``value`` as a quoted Hydra override value (safe for spaces, commas, ``=`` and quotes)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def unquote(value: str) -> str:
    """The text of an override value ``quote`` wrote (or one the user quoted); others unchanged."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
    return value


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b@pkg=1`` -> ``a.b``."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[0].strip()


def split_options(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(Hydra's options with their values, the overrides), each in command-line order."""
    options: List[str] = []
    overrides: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            options.append(arg)
            takes = arg in VALUE_OPTIONS or (arg in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in _INFO_CHOICES)
            if takes and i + 1 < len(args):
                options.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return options, overrides


def option_args(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """The arguments that give the options ``names`` (``--config-name x`` or ``--config-name=x``)."""
    found: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in names and i + 1 < len(args):
            found += [arg, args[i + 1]]
            i += 2
            continue
        if "=" in arg and arg.split("=", 1)[0] in names:
            found.append(arg)
        i += 1
    return found


def has_option(argv: Sequence[str], names: Sequence[str]) -> bool:
    """Whether any of the options ``names`` is given (alone or as ``--name=value``)."""
    return any(arg in names or arg.split("=", 1)[0] in names for arg in argv if arg.startswith("-"))


def take_option(argv: Sequence[str], names: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """(the value of the last of the options ``names``, ``argv`` without them). An option with no value
    at the end of the line raises ``ValueError``."""
    value: Optional[str] = None
    rest: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        flag, eq, given = args[i].partition("=")
        if flag in names:
            if not eq:
                if i + 1 >= len(args):
                    raise ValueError(flag)
                given = args[i + 1]
                i += 1
            value = given
        else:
            rest.append(args[i])
        i += 1
    return value, rest
