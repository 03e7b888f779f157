"""``deepspeed_config=<ds_config.json>`` on the command line: before Hydra parses it, the file's settings
become overrides placed in front of the command's own (which win); the run's log later says what mapped."""
from __future__ import annotations

import logging
import re
from importlib.util import find_spec
from typing import Dict, List, Optional, Sequence

from ds_hydra.common import launch_env
from ds_hydra.common.overrides import MULTIRUN_OPTIONS, has_option, quote, split_options, unquote
from ds_hydra.deepspeed.json_import import Imported, import_deepspeed_config, read_deepspeed_json
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

_ARG = re.compile(r"^(\+\+|\+)?deepspeed_config=(.*)$")


def deepspeed_installed() -> bool:
    return find_spec("deepspeed") is not None


def expand_deepspeed_config_args(argv: Sequence[str], world_size: Optional[int] = None,
                                 imports: Optional[Dict[str, Imported]] = None) -> List[str]:
    """``argv`` with the overrides ``deepspeed_config=<file>`` maps to in front (unchanged if there is
    none); the command's own overrides follow and win, and ``deepspeed_config`` itself is kept (the run
    records it). ``world_size``: what the batch triple is checked against (None: the launcher's
    environment, else 1; the CLI passes ``torchrun_config.run_world_size``'s, which also counts its torchrun
    launcher's ``nnodes x nproc_per_node``).
    ``imports``: where to note what the file mapped to (for the run's log and the task)."""
    argv = list(argv)
    found = [m for a in argv if (m := _ARG.match(a))]
    if not found:
        return argv
    value = unquote(found[-1].group(2))
    if value in ("", "null"):
        return argv
    if has_option(argv, MULTIRUN_OPTIONS) and "," in value:
        raise UserError(f"deepspeed_config={value}: takes one file; sweep over the settings it maps to instead "
                        f"(task=import_deepspeed prints them)")
    flags, overrides = split_options([a for a in argv if not _ARG.match(a)])
    imported = import_deepspeed_config(
        read_deepspeed_json(value), value, world_size=launch_env.world_size() if world_size is None else world_size,
        deepspeed_available=deepspeed_installed(), command_line=overrides,
    )
    if imports is not None:
        imports[value] = imported
    return [*flags, *imported.override_texts, f"deepspeed_config={quote(value)}", *overrides]


def log_import(cfg, imports: Optional[Dict[str, Imported]] = None) -> None:
    """Log what the run's ``deepspeed_config`` mapped to (the CLI computed it before Hydra set up logging
    and noted it in ``imports``)."""
    value = cfg.get("deepspeed_config")
    if not value:
        return
    imported = (imports or {}).get(value)
    if imported is None:  # a resumed run: its saved overrides hold what the file mapped to at its start
        log.info("deepspeed_config=%s: the settings imported when this run started (in its saved overrides)", value)
        return
    for line in imported.log_lines():
        log.info("%s", line)
