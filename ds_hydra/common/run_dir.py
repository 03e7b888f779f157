"""Where a run writes: Hydra's output dir when run through Hydra, else a fresh ``outputs/<time>``.

A directory named from the clock (``${now:...}`` in ``hydra.run.dir``/``hydra.sweep.dir``, or the
``outputs/<date>/<time>`` of ``train(cfg)`` outside Hydra) is claimed with an exclusive ``mkdir``:
when the name is taken (another launch in the same second) the next free one, ``<name>_1``,
``<name>_2``, ..., is taken instead, so concurrent launches never share a directory.
"""
from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ds_hydra.errors import UserError
from ds_hydra.common.files import atomic_write_text

RESOLVED_CONFIG_FILE = "config_resolved.yaml"


def resolve_run_dir(run_dir: Optional[Path] = None) -> Path:
    if run_dir is None:
        run_dir = _hydra_output_dir() or claim_new_dir(Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass  # fail now, not after an hour of training, if the directory is not writable
    except OSError as exc:
        raise UserError(f"run dir {run_dir}: not writable ({exc.strerror}); set hydra.run.dir to a writable path") from None
    return run_dir


MAX_SUFFIX = 10_000


def claim_new_dir(wanted: Path) -> Path:
    """Create ``wanted``, or the first free ``<wanted>_N`` (N = 1, 2, ...), exclusively; returns it.

    ``mkdir`` without ``exist_ok`` is atomic: of several processes asking for one name, exactly one
    gets it and the others move on to the next suffix."""
    wanted = Path(wanted)
    wanted.parent.mkdir(parents=True, exist_ok=True)
    for n in range(MAX_SUFFIX):
        candidate = wanted if n == 0 else wanted.with_name(f"{wanted.name}_{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{wanted}: it and {MAX_SUFFIX - 1} suffixed names exist already; choose another directory")


def names_the_clock(unresolved: str) -> bool:
    """Whether a directory setting is named from the clock (Hydra's ``${now:...}`` resolver)."""
    return "${now:" in str(unresolved)


def _hydra_output_dir() -> Optional[Path]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def write_resolved_config(cfg, run_dir: Path) -> Path:
    """The config with every interpolation resolved: what inference and resume rebuild from."""
    path = Path(run_dir) / RESOLVED_CONFIG_FILE
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
