"""Where ``train`` starts: from scratch, from a checkpoint (the named one or the newest), or not at all
(the run finished with this config). A new run refuses a directory that already holds one. Torch-free."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ds_hydra.errors import UserError
from ds_hydra.common.files import atomic_write_text
from ds_hydra.common.checkpoint_files import latest_checkpoint
from ds_hydra.training.resume.command_line import locate_run
from ds_hydra.training.resume.completion import COMPLETED_FILE, read_completion_marker
from ds_hydra.training.resume.config_diff import Difference, config_differences, describe_differences
from ds_hydra.training.resume.metrics_tail import METRICS_FILE

log = logging.getLogger(__name__)


@dataclass
class StartPlan:
    """Where ``train`` starts: from scratch, from ``checkpoint``, or not at all (``completed``), settled once
    per run: by the CLI before Hydra writes into the run dir (``ds_hydra.cli.preflight``), which hands it to
    ``train``, or by ``train`` itself when called as a library or in a sweep job."""

    checkpoint: Optional[Path] = None
    completed: Optional[Dict[str, Any]] = None
    checkpoint_checked: bool = False
    """The checkpoint's saved config was found compatible with this one already (``check_compatible``)."""
    memory: Optional[Any] = None
    """The memory verdict of one training step (``memory_preflight.check_step_memory``), once it was judged."""
    lock: Optional[Any] = None
    """The run dir's lock the CLI took for this run (``common.run_lock.RunLock``): ``train`` writes under it
    and leaves releasing it to its owner, the command's ``StartUp``."""


def resume_target(cfg) -> Tuple[Optional[Path], Optional[Path]]:
    """``(run dir, explicit checkpoint)`` named by ``cfg.resume``; ``(None, None)`` when not resuming."""
    value = cfg.get("resume", None)
    if not value:
        return None, None
    return locate_run(str(value), hydra_run=False)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def plan_start(cfg, run_dir: Path) -> StartPlan:
    """Decide how ``train`` starts in ``run_dir``; refuses to start a new run over an old one.

    * not resuming, single run: ``run_dir`` must not hold a run yet (a checkpoint, metrics or marker);
    * ``resume=`` given: continue from the named or newest checkpoint (from step 0 if there is none);
    * a sweep job: skip it if its marker says it finished with this config, else continue its checkpoint.
    """
    run_dir = Path(run_dir)
    resuming = bool(cfg.get("resume", None))
    multirun = in_multirun()
    marker = read_completion_marker(run_dir)
    latest = latest_checkpoint(run_dir)
    if not resuming and not multirun:
        found = [p for p in (run_dir / COMPLETED_FILE, latest, run_dir / METRICS_FILE) if p is not None and p.is_file()]
        if found:
            raise UserError(
                f"hydra.run.dir={run_dir}: already holds a run ({found[0].relative_to(run_dir)}); continue it with "
                f"resume={run_dir}, or choose a new hydra.run.dir"
            )
        return StartPlan()
    _, explicit = resume_target(cfg) if resuming else (None, None)
    if marker is not None and explicit is None and marker.get("step", -1) >= cfg.trainer.max_steps:
        diffs = config_differences(marker.get("config", {}), cfg)
        if not diffs:
            return StartPlan(completed=marker.get("metrics", {}))
        if multirun:
            raise _different_run(run_dir, diffs)
    checkpoint = explicit or latest
    if checkpoint is None:
        if resuming:
            log.warning("%s has no checkpoint yet: starting the run again from step 0", run_dir)
        return StartPlan()
    return StartPlan(checkpoint=checkpoint)


def check_compatible(saved_config: Any, cfg, checkpoint: Path, strict: bool) -> None:
    """Refuse to continue ``checkpoint`` under a different model (or, ``strict``, any different config)."""
    diffs = config_differences(saved_config, cfg)
    shape = [d for d in diffs if d.key.startswith("model.") and d.key != "model.dropout"]
    if shape:
        raise UserError(
            f"{checkpoint}: saved by a different model ({describe_differences(shape)}); resume with the run's own model "
            f"settings, or start a new run"
        )
    if strict and diffs:
        raise _different_run(Path(checkpoint).parent.parent, diffs)
    if diffs:
        log.warning("continuing %s with changed settings: %s", checkpoint, describe_differences(diffs))


def record_continuation(run_dir: Path, cfg) -> None:
    """After a resumed run has loaded: ``.hydra/overrides.yaml`` and ``config.yaml`` say how it continues.

    ``expand_resume_args`` kept Hydra from writing them at start-up (``hydra.output_subdir=null``), so
    that a resume that fails (a typo, a bad checkpoint) leaves the run exactly as it was.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return  # Hydra wrote them itself (or there is no Hydra run)
    folder = Path(run_dir) / ".hydra"
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(HydraConfig.get().overrides.task))))
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))


def _different_run(run_dir: Path, diffs: List["Difference"]) -> UserError:
    return UserError(
        f"{run_dir}: holds a job with a different config ({describe_differences(diffs)}); re-run the sweep into a new "
        f"hydra.sweep.dir, or restore the sweep's original settings"
    )
