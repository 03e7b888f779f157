"""Reading DeepSpeed's JSON config files (torch-free)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

from ds_hydra.errors import UserError


def read_deepspeed_json(path, key: str = "deepspeed_config") -> Dict[str, Any]:
    """The JSON object in ``path``, read as DeepSpeed reads it (duplicate keys refused); one clear
    ``UserError`` line naming ``key`` and the file when it is missing, unreadable or not a JSON object."""
    path = Path(os.fspath(path)).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{key}={path}: no such file (a DeepSpeed JSON config, e.g. ds_config.json)") from None
    except IsADirectoryError:
        raise UserError(f"{key}={path}: is a directory, not a DeepSpeed JSON config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}={path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        config = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}={path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except _DuplicateKey as exc:
        raise UserError(f"{key}={path}: key {exc.args[0]!r} appears twice in one object (DeepSpeed refuses that too)") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}={path}: must hold a JSON object ({{...}}), got a {type(config).__name__}")
    return config


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs):
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen[name] = value
    return seen
