"""``resume=<run>`` on the command line: the arguments that continue a run in its own directory.

``expand_resume_args`` runs before Hydra parses ``sys.argv``: the run's saved overrides
(``<run>/.hydra/overrides.yaml``) come first, then ``hydra.run.dir=<run>`` and ``resume=<run>`` (or
its ``checkpoints/step_N.pt``), then the new command's own overrides, which win. Torch-free.

The saved overrides are data (README "Security model"): what Hydra saved there is the run's own keys, so
an entry that sets Hydra itself (``hydra.*``: callbacks, launcher, sweeper, job settings), passes a flag
(``--config-dir``...) or widens ``allowed_targets`` is refused, never replayed; the run's primary config
name (``.hydra/hydra.yaml``) is used only when it is a plain config name.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ds_hydra.common.overrides import MULTIRUN_OPTIONS, has_option, override_key, quote, unquote
from ds_hydra.errors import UserError
from ds_hydra.common.checkpoint_files import CHECKPOINT_DIR, STEP_DIR, STEP_FILE, is_sharded_checkpoint

log = logging.getLogger(__name__)

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CONFIG_FILE = Path(".hydra") / "config.yaml"  # the run's composed config, as Hydra saved it
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
# Overrides that apply to one command only: a resume does not repeat them from the saved ones.
ONE_SHOT_KEYS = ("resume", "run.break_lock")
RESUME_ARG = re.compile(r"^(\+\+|\+)?resume=(.*)$")


def expand_resume_args(argv: Sequence[str]) -> List[str]:
    """The arguments that continue the run named by ``resume=<run>`` (unchanged if there is none).

    The run's saved overrides come first, then ``hydra.run.dir=<run>`` and ``resume=<run>``, then
    the new command's own overrides, which win: ``resume=<run> trainer.max_steps=5000`` trains on.
    """
    argv = list(argv)
    values = [(i, m.group(2)) for i, a in enumerate(argv) if (m := RESUME_ARG.match(a))]
    wants_task = "task=resume" in argv
    if not values:
        if wants_task:
            raise UserError("task=resume: also name the run to continue, resume=<run dir> (e.g. resume=outputs/2024-05-01/12-00-00)")
        return argv
    index, value = values[-1]
    value = unquote(value)
    if value in ("", "null"):
        return argv
    if has_option(argv, MULTIRUN_OPTIONS):
        raise UserError(
            f"resume={value}: continues a single run; to continue a sweep, re-run the same multirun command "
            f"with hydra.sweep.dir=<its sweep dir> (finished jobs are skipped)"
        )
    run_dir, checkpoint = locate_run(value)
    saved = read_saved_overrides(run_dir)
    task = saved_task(run_dir, saved)
    if task not in TRAINING_TASKS:
        raise UserError(f"resume={value}: a task={task} run, not a training run: there is nothing to continue "
                        f"(run the same task=... command again instead)")
    rest = [a for i, a in enumerate(argv) if not RESUME_ARG.match(a)]
    for arg in rest:
        if override_key(arg) == "hydra.run.dir":
            raise UserError(f"resume={value}: continues in {run_dir} itself; drop {arg}")
    user_keys = {override_key(a) for a in rest if not a.startswith("-")}
    refuse_code_in_saved(run_dir, saved)
    widening = [o for o in saved if override_key(o) == "allowed_targets"]
    if widening and "allowed_targets" not in user_keys:
        raise UserError(
            f"{run_dir / OVERRIDES_FILE}: sets {widening[-1]}, and a run directory may not widen the _target_ "
            f"allowlist on its own; if you trust that run, repeat {widening[-1]} on the resume command"
        )
    tasks_folder = [o for o in saved if override_key(o) == "lm_eval.include_path" and o.split("=", 1)[-1] not in ("", "null")]
    if tasks_folder and "lm_eval.include_path" not in user_keys:
        raise UserError(
            f"{run_dir / OVERRIDES_FILE}: sets {tasks_folder[-1]}, a folder of harness task YAMLs, which can import "
            f"Python from it (the harness's !function), and a run directory may not choose code to run; if you trust "
            f"that folder, repeat {tasks_folder[-1]} on the resume command"
        )
    kept = [o for o in saved if override_key(o) not in user_keys and override_key(o) not in ONE_SHOT_KEYS and o != "task=resume"]
    target = checkpoint if checkpoint is not None else run_dir
    # hydra.output_subdir=null: Hydra leaves the run's .hydra/ alone; train records the continuation
    # there only once the checkpoint has loaded (record_continuation), so a failed resume changes nothing.
    own = [f"hydra.run.dir={quote(run_dir)}", "hydra.output_subdir=null", f"resume={quote(target)}"]
    expanded = _config_name_args(run_dir, rest) + kept + own + rest
    log.debug("resume: %s", expanded)
    return expanded


def is_hydra_override(override: str) -> bool:
    """Whether ``override`` sets Hydra itself (``hydra.callbacks.x=...``, ``hydra/launcher=torchrun``, ``hydra=...``),
    or places a config group's option there through its package (``+model@hydra.callbacks.x=gpt_tiny``)."""
    key = override_key(override)
    head = override.strip().lstrip("+~").split("=", 1)[0]
    packages = head.split("@", 1)[1].split(":") if "@" in head else []
    return any(name == "hydra" or name.startswith(("hydra.", "hydra/")) for name in (key, *(p.strip() for p in packages)))


def refuse_code_in_saved(run_dir: Path, saved: Sequence[str]) -> None:
    """A saved override list is data: one that sets Hydra itself or passes a flag is refused, naming the line."""
    path = Path(run_dir) / OVERRIDES_FILE
    for override in saved:
        if override.strip().startswith("-"):
            raise UserError(
                f"{path}: holds {override!r}, a command-line flag, not an override; a run directory cannot pass flags "
                f"(Hydra saves only overrides there): remove that line, or give the flag on the command line yourself"
            )
        if is_hydra_override(override):
            raise UserError(
                f"{path}: holds {override}, which sets Hydra itself; a run directory's saved overrides never set hydra.* "
                f"(callbacks, launcher, sweeper, job settings: Hydra saves only the run's own keys there): remove that "
                f"line, or give the setting on the resume command yourself"
            )


def locate_run(value: str, hydra_run: bool = True) -> Tuple[Path, Optional[Path]]:
    """``(run dir, checkpoint or None)`` for ``resume=<run dir>``, ``resume=<run>/checkpoints/step_N.pt`` or
    a sharded checkpoint's directory ``resume=<run>/checkpoints/step_N``.

    ``hydra_run``: the directory must have been written by the CLI (it has ``.hydra/overrides.yaml``).
    """
    path = Path(value).expanduser()
    if STEP_DIR.match(path.name) and path.parent.name == CHECKPOINT_DIR:  # a sharded (dcp) checkpoint
        if not is_sharded_checkpoint(path):
            raise UserError(
                f"resume={value}: not a complete checkpoint directory (no .metadata or trainer_state.pt: a write that "
                f"never finished?); give the run directory to continue from its newest complete checkpoint"
            )
        run_dir, checkpoint = path.parent.parent, path
    elif STEP_FILE.match(path.name) or path.suffix == ".pt":
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


TRAINING_TASKS = ("train", "resume")  # the tasks whose run dirs hold a run to continue


def saved_task(run_dir: Path, saved: Sequence[str]) -> str:
    """The task a run dir was written by: its saved config's ``task`` (an experiment preset may set it),
    else the last ``task=`` of its saved overrides, else train (the default)."""
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
        task = config.get("task") if isinstance(config, dict) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        task = None
    if task is None:
        task = next((o.split("=", 1)[1] for o in reversed(saved) if override_key(o) == "task"), "train")
    return str(task)


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


def _config_name_args(run_dir: Path, args: Sequence[str]) -> List[str]:
    """``--config-name=<name>`` when the run used another primary config and the command names none."""
    if has_option(args, ("-cn", "--config-name")):
        return []
    import yaml

    try:
        hydra_yaml = yaml.safe_load((Path(run_dir) / HYDRA_FILE).read_text(encoding="utf-8"))
        name = hydra_yaml["hydra"]["job"]["config_name"]
    except Exception:  # no or unreadable hydra.yaml: the default primary config
        return []
    if not isinstance(name, str) or not name or name == "config":
        return []
    if not PLAIN_CONFIG_NAME.match(name):  # data may pick a config by name, never a path to one
        raise UserError(
            f"{Path(run_dir) / HYDRA_FILE}: names the primary config {name!r}, which is not a plain config name; "
            f"give --config-name yourself on the resume command"
        )
    return [f"--config-name={name}"]


# A config name from a run's hydra.yaml: words joined by "/", no "..", no absolute path, no scheme.
PLAIN_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
