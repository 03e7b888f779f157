"""Continue an interrupted run exactly where it stopped, and skip the jobs of a sweep that finished.

``python -m ds_hydra resume=outputs/<date>/<time>`` (or ``task=resume resume=...``) re-runs the run's
saved overrides (``<run>/.hydra/overrides.yaml``) in its own directory (``hydra.run.dir=<run>``),
with any extra overrides of the new command applied last; ``train`` then loads the newest checkpoint
and continues. ``resume=<run>/checkpoints/step_NNNNNNN.pt`` continues from that checkpoint instead;
newer checkpoints and their metrics are first moved into ``checkpoints/superseded_<time>/``.

What makes a resumed run equal, bit for bit, to one that was never interrupted:

* the checkpoint holds every piece of state the next step reads (``Trainer.state_dict``);
* ``metrics.jsonl`` keeps only the records up to the checkpoint's step: the interrupted tail is
  recomputed, so no record is duplicated;
* a new run refuses a directory that already holds a run, so nothing is overwritten by accident.

A finished ``train`` writes ``completed.json`` (its final metrics and config). Re-running a multirun
into the same ``hydra.sweep.dir`` skips every job whose directory holds that marker for the same
config (returning the saved metrics, so sweep reports stay complete) and continues every job that
left a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ds_hydra.errors import UserError
from ds_hydra.training.checkpoint_files import (
    CHECKPOINT_DIR,
    STEP_FILE,
    atomic_write_text,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
)

log = logging.getLogger(__name__)

COMPLETED_FILE = "completed.json"
COMPLETED_FORMAT = "ds_hydra.completed.v1"
METRICS_FILE = "metrics.jsonl"  # the name ds_hydra.training.metrics writes (kept torch-free here)
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"

# Keys whose values may differ between the saved run and its continuation without any effect on it.
VOLATILE_KEYS = ("resume", "trainer.progress", "objective", "name", "run", "logger")
# Overrides that apply to one command only: a resume does not repeat them from the saved ones.
ONE_SHOT_KEYS = ("resume", "run.break_lock")

_RESUME_ARG = re.compile(r"^(\+\+|\+)?resume=(.*)$")


# -- the command line ------------------------------------------------------------------------------
def expand_resume_args(argv: Sequence[str]) -> List[str]:
    """The arguments that continue the run named by ``resume=<run>`` (unchanged if there is none).

    The run's saved overrides come first, then ``hydra.run.dir=<run>`` and ``resume=<run>``, then
    the new command's own overrides, which win: ``resume=<run> trainer.max_steps=5000`` trains on.
    """
    argv = list(argv)
    values = [(i, m.group(2)) for i, a in enumerate(argv) if (m := _RESUME_ARG.match(a))]
    wants_task = "task=resume" in argv
    if not values:
        if wants_task:
            raise UserError("task=resume: also name the run to continue, resume=<run dir> (e.g. resume=outputs/2024-05-01/12-00-00)")
        return argv
    index, value = values[-1]
    value = _unquote(value)
    if value in ("", "null"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError(
            f"resume={value}: continues a single run; to continue a sweep, re-run the same multirun command "
            f"with hydra.sweep.dir=<its sweep dir> (finished jobs are skipped)"
        )
    run_dir, checkpoint = locate_run(value)
    saved = read_saved_overrides(run_dir)
    rest = [a for i, a in enumerate(argv) if not _RESUME_ARG.match(a)]
    for arg in rest:
        if _override_key(arg) == "hydra.run.dir":
            raise UserError(f"resume={value}: continues in {run_dir} itself; drop {arg}")
    user_keys = {_override_key(a) for a in rest if not a.startswith("-")}
    widening = [o for o in saved if _override_key(o) == "allowed_targets"]
    if widening and "allowed_targets" not in user_keys:
        raise UserError(
            f"{run_dir / OVERRIDES_FILE}: sets {widening[-1]}, and a run directory may not widen the _target_ "
            f"allowlist on its own; if you trust that run, repeat {widening[-1]} on the resume command"
        )
    kept = [o for o in saved if _override_key(o) not in user_keys and _override_key(o) not in ONE_SHOT_KEYS and o != "task=resume"]
    target = checkpoint if checkpoint is not None else run_dir
    # hydra.output_subdir=null: Hydra leaves the run's .hydra/ alone; train records the continuation
    # there only once the checkpoint has loaded (record_continuation), so a failed resume changes nothing.
    own = [f"hydra.run.dir={quote(run_dir)}", "hydra.output_subdir=null", f"resume={quote(target)}"]
    expanded = _config_name_args(run_dir, rest) + kept + own + rest
    log.debug("resume: %s", expanded)
    return expanded


# -- torchrun --max-restarts ------------------------------------------------------------------------
# When a worker fails (or stops on SIGTERM/SIGUSR1 with exit 75), torchrun restarts every worker with
# the same arguments. Without help each restart would start a new run from step 0 in a new ${now:}
# directory; instead the restarted workers continue the run: resume=<its dir> is added for them.
def _restart_marker() -> Optional[Path]:
    """The file in which rank 0 notes its run dir for restarts of this torchrun job (on its node)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    return Path(tempfile.gettempdir()) / f"ds_hydra-torchrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)}.run_dir"


def note_run_dir_for_restarts(run_dir: Any) -> None:
    """Rank 0 under torchrun: remember the run dir, so that restarted workers continue it."""
    marker = _restart_marker()
    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0
    if marker is not None and restarts_allowed and os.environ.get("RANK", "0") == "0":
        atomic_write_text(marker, str(Path(run_dir).resolve()))


def continue_after_restart(argv: Sequence[str]) -> List[str]:
    """``argv`` for a worker torchrun restarted: its run continues (``resume=<run dir>``).

    The run dir is ``hydra.run.dir`` when given (the way for several nodes: every rank must see it),
    else the one rank 0 noted on this node. Unchanged on a first start, with resume= or --multirun
    given, and when the first attempt stopped before Hydra made its run dir (it starts again).
    """
    argv = list(argv)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if restart < 1 or "-m" in argv or "--multirun" in argv or any(_RESUME_ARG.match(a) for a in argv):
        return argv
    given = [a.partition("=")[2] for a in argv if _override_key(a) == "hydra.run.dir"]
    if given:
        run_dir = Path(_unquote(given[-1])).expanduser().resolve()
    else:
        marker = _restart_marker()
        one_node = os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1")
        if marker is None or not marker.is_file():
            return argv
        if not one_node:  # ranks on other nodes cannot read this node's note: all must decide alike
            if os.environ.get("RANK", "0") == "0":
                sys.stderr.write(
                    f"ds_hydra: torchrun restart {restart}: starting a new run; on several nodes give "
                    f"hydra.run.dir=<shared dir> so that restarts continue the run\n"
                )
            return argv
        run_dir = Path(marker.read_text(encoding="utf-8").strip())
    if not (run_dir / OVERRIDES_FILE).is_file():
        return argv
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"ds_hydra: torchrun restart {restart}: continuing {run_dir}\n")
    return [a for a in argv if _override_key(a) != "hydra.run.dir"] + [f"resume={quote(run_dir)}"]


def locate_run(value: str, hydra_run: bool = True) -> Tuple[Path, Optional[Path]]:
    """``(run dir, checkpoint or None)`` for ``resume=<run dir>`` or ``resume=<run>/checkpoints/step_N.pt``.

    ``hydra_run``: the directory must have been written by the CLI (it has ``.hydra/overrides.yaml``).
    """
    path = Path(value).expanduser()
    if STEP_FILE.match(path.name) or path.suffix == ".pt":
        if not path.is_file():
            raise UserError(f"resume={value}: no such checkpoint file (checkpoints: {path.parent}/step_*.pt)")
        if not STEP_FILE.match(path.name) or path.parent.name != CHECKPOINT_DIR:
            raise UserError(f"resume={value}: not a checkpoint of a run; give a run directory or <run>/{CHECKPOINT_DIR}/step_NNNNNNN.pt")
        run_dir, checkpoint = path.parent.parent, path
    else:
        run_dir, checkpoint = path, None
    run_dir = run_dir.resolve()
    if not run_dir.exists():
        raise UserError(f"resume={value}: no such run directory; give the directory of an earlier run, e.g. outputs/2024-05-01/12-00-00")
    if not run_dir.is_dir():
        raise UserError(f"resume={value}: a file, not a run directory; give the directory of an earlier run")
    if hydra_run and not (run_dir / OVERRIDES_FILE).is_file():
        if (run_dir / "multirun.yaml").is_file():
            raise UserError(
                f"resume={value}: a sweep directory; re-run the same multirun with hydra.sweep.dir={run_dir} to continue "
                f"the sweep, or continue one job with resume={run_dir}/<job number>"
            )
        raise UserError(f"resume={value}: not a run directory (it has no {OVERRIDES_FILE}); give the directory of an earlier run")
    return run_dir, (checkpoint.resolve() if checkpoint is not None else None)


def read_saved_overrides(run_dir: Path) -> List[str]:
    """The command-line overrides the run was started with (``.hydra/overrides.yaml``)."""
    import yaml

    path = Path(run_dir) / OVERRIDES_FILE
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read the run's overrides ({reason}); the run directory is damaged") from None
    if saved is None:
        return []
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise UserError(f"{path}: not a list of overrides (found {type(saved).__name__}); the run directory is damaged")
    return saved


def quote(value: Any) -> str:
    """``value`` as a quoted Hydra override value (safe for spaces, commas, ``=`` and quotes)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace("\\'", "'").replace('\\"', '"').replace("\\\\", "\\")
    return value


def _override_key(override: str) -> str:
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[0].strip()


def _config_name_args(run_dir: Path, args: Sequence[str]) -> List[str]:
    """``--config-name=<name>`` when the run used another primary config and the command names none."""
    if any(a in ("-cn", "--config-name") or a.startswith("--config-name=") for a in args):
        return []
    import yaml

    try:
        hydra_yaml = yaml.safe_load((Path(run_dir) / HYDRA_FILE).read_text(encoding="utf-8"))
        name = hydra_yaml["hydra"]["job"]["config_name"]
    except Exception:  # no or unreadable hydra.yaml: the default primary config
        return []
    return [f"--config-name={name}"] if isinstance(name, str) and name and name != "config" else []


# -- what a train call starts from ----------------------------------------------------------------
@dataclass
class StartPlan:
    """Where ``train`` starts: from scratch, from ``checkpoint``, or not at all (``completed``)."""

    checkpoint: Optional[Path] = None
    completed: Optional[Dict[str, Any]] = None


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
            f"{checkpoint}: saved by a different model ({_describe(shape)}); resume with the run's own model "
            f"settings, or start a new run"
        )
    if strict and diffs:
        raise _different_run(Path(checkpoint).parent.parent, diffs)
    if diffs:
        log.warning("continuing %s with changed settings: %s", checkpoint, _describe(diffs))


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
        f"{run_dir}: holds a job with a different config ({_describe(diffs)}); re-run the sweep into a new "
        f"hydra.sweep.dir, or restore the sweep's original settings"
    )


# -- config comparison -----------------------------------------------------------------------------
class Difference(NamedTuple):
    key: str
    saved: Any
    now: Any


def flat_config(cfg_or_saved: Any) -> Dict[str, Any]:
    """``{dotted key: value}`` of a config, a saved YAML text or a saved dict, resolved, without ``hydra``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_or_saved, DictConfig):
        node = OmegaConf.masked_copy(cfg_or_saved, [k for k in cfg_or_saved.keys() if k != "hydra"])
        text = OmegaConf.to_yaml(node, resolve=True)
        data = OmegaConf.to_container(OmegaConf.create(text))
    elif isinstance(cfg_or_saved, str):
        data = OmegaConf.to_container(OmegaConf.create(cfg_or_saved))
    else:
        data = cfg_or_saved
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and (node or not prefix):
            for key, value in node.items():
                if prefix == "" and key == "hydra":
                    continue
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(data or {}, "")
    return flat


def config_differences(saved: Any, cfg: Any) -> List[Difference]:
    """Keys whose values differ between a saved config and ``cfg`` (volatile keys ignored)."""
    old, new = flat_config(saved), flat_config(cfg)
    keys = sorted(set(old) | set(new))
    volatile = lambda k: any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS)  # noqa: E731
    return [Difference(k, old.get(k), new.get(k)) for k in keys if not volatile(k) and old.get(k) != new.get(k)]


def _describe(diffs: Sequence[Difference], limit: int = 4) -> str:
    shown = [f"{d.key}={d.saved} there, {d.now} here" for d in diffs[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more


# -- metrics, superseded checkpoints, the completion marker -------------------------------------
def continue_from(run_dir: Path, step: int, checkpoint: Path) -> List[Dict[str, Any]]:
    """Prepare ``run_dir`` to continue from ``checkpoint`` (at ``step``); returns the metrics records kept.

    Newer checkpoints (when an older one was chosen) are set aside, records after ``step`` are
    dropped (the continuation writes them again) and a stale completion marker is removed.
    """
    if Path(checkpoint) != latest_checkpoint(run_dir):
        set_aside_newer(run_dir, step)
    kept = truncate_metrics(run_dir, step)
    clear_completion_marker(run_dir)
    return kept


# -- metrics, superseded checkpoints, the completion marker -------------------------------------
def truncate_metrics(run_dir: Path, step: int) -> List[Dict[str, Any]]:
    """Keep the ``metrics.jsonl`` records up to ``step`` (the checkpoint's); returns them.

    Records after it came from the interrupted part, which the resumed run writes again. A torn
    last line (the process died mid-write) is dropped; damage anywhere else is an error.
    """
    kept, dropped = _split_metrics(Path(run_dir), step)
    if dropped:
        _rewrite_metrics(Path(run_dir), kept)
        log.info("metrics.jsonl: dropped %d records after step %d (recomputed now)", len(dropped), step)
    return kept


def set_aside_newer(run_dir: Path, step: int) -> Optional[Path]:
    """Move checkpoints and metrics newer than ``step`` into ``checkpoints/superseded_<time>/``.

    Used when continuing from an older checkpoint than the newest: nothing of the abandoned
    continuation is deleted.
    """
    run_dir = Path(run_dir)
    newer = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    kept, dropped = _split_metrics(run_dir, step)
    if not newer and not dropped:
        return None
    folder = run_dir / CHECKPOINT_DIR / f"superseded_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    folder.mkdir(parents=True)
    for path in newer:
        os.replace(path, folder / path.name)
    if dropped:
        (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in dropped), encoding="utf-8")
        _rewrite_metrics(run_dir, kept)
    log.warning("continuing from step %d: moved %d newer checkpoints and %d metrics records to %s", step, len(newer), len(dropped), folder)
    return folder


def _split_metrics(run_dir: Path, step: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    kept: List[Dict[str, Any]] = []
    dropped: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                dropped.append({"torn_line": line})
                continue
            raise UserError(f"{path}: line {number} is not JSON; repair or delete that line, then resume") from None
        later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        (dropped if later else kept).append(record)
    return kept, dropped


def _rewrite_metrics(run_dir: Path, records: List[Dict[str, Any]]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def write_completion_marker(run_dir: Path, cfg, metrics: Dict[str, Any]) -> Path:
    """``completed.json``: the run finished; its final metrics and config (what a sweep re-run returns)."""
    from hydra.core.hydra_config import HydraConfig

    overrides: List[str] = []
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    record = {
        "format": COMPLETED_FORMAT,
        "step": int(metrics.get("step", cfg.trainer.max_steps)),
        "metrics": metrics,
        "overrides": overrides,
        "config": flat_config(cfg),
    }
    path = Path(run_dir) / COMPLETED_FILE
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_completion_marker(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / COMPLETED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable completion marker ({exc}); delete it to continue the run from its checkpoint") from None
    if not isinstance(record, dict) or record.get("format") != COMPLETED_FORMAT:
        raise UserError(f"{path}: not a ds_hydra completion marker; delete it to continue the run from its checkpoint")
    return record


def clear_completion_marker(run_dir: Path) -> None:
    """The run continues past its old end: its marker no longer describes it."""
    (Path(run_dir) / COMPLETED_FILE).unlink(missing_ok=True)
