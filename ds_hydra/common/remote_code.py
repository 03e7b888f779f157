"""A local Hugging Face model or tokenizer directory is data: one that needs its own Python code is refused.

Such a directory can carry ``configuration_*.py``, ``modeling_*.py`` or ``tokenization_*.py`` and point
at them from ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` (or name a ``model_type``
transformers does not ship). Left to itself, transformers then asks "Do you wish to run the custom
code? [y/N]" on stdin (a stall in a terminal, a hang or a yes in a script that feeds stdin) and on a yes
imports the directory's code. ds_hydra passes ``trust_remote_code=False`` to every transformers loader
(tests/test_security.py holds every call to it) and, before any of them runs, ``refuse_remote_code`` turns such a directory away
in one line: no prompt, nothing read from stdin, none of its files imported. Torch-free.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from ds_hydra.errors import UserError

# The files in which a directory names code of its own (``auto_map``, or a class transformers lacks).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(folder: Path, key: str, known_model_types: Optional[Iterable[str]] = None) -> None:
    """One ``UserError`` naming ``key`` (e.g. ``model.pretrained=<dir>``) when the directory would need its
    own Python code to load; ``known_model_types``: transformers' ``CONFIG_MAPPING`` keys, to refuse a
    ``model_type`` only remote code could define. Only JSON is read; a damaged file is left to the loader."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        settings = _json_object(folder / name)
        if settings is None:
            continue
        auto_map = settings.get("auto_map")
        if auto_map:
            named = sorted(str(k) for k in auto_map) if isinstance(auto_map, dict) else [str(auto_map)]
            raise UserError(
                f"{key}: {folder / name} maps {', '.join(named)} to Python code in that directory (auto_map); a model "
                f"or tokenizer directory is data, so ds_hydra never runs its code (trust_remote_code=False): use a "
                f"directory of an architecture transformers ships"
            )
        model_type = settings.get("model_type") if name == "config.json" else None
        if known_model_types is not None and model_type is not None and str(model_type) not in set(known_model_types):
            raise UserError(
                f"{key}: {folder / name} has model_type={model_type}, which transformers does not ship; only the "
                f"directory's own code could define it, and ds_hydra never runs that code (trust_remote_code=False)"
            )


def _json_object(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
