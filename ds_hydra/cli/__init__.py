"""The command line: compose the config with Hydra, validate it, dispatch on ``task``.

``cli_main`` runs one command; ``main`` (``python -m ds_hydra`` and the ``ds-hydra`` console script)
runs it and exits the process. Problems the user can fix (bad keys, values, files) are printed as one
line per problem with exit code 2; a full traceback is shown only with ``HYDRA_FULL_ERROR=1``.

Beside it: ``preflight`` (the Hydra callback that checks a run before anything is written), ``tasks``
(the tasks that cut the config into their component's slices), ``launch`` (several launched
processes agreeing on one run dir), ``torchrun_job`` and ``torchrun_config`` (``hydra/launcher=torchrun``),
``compose_once`` (a single run's config composed once: Hydra composes it twice).
"""
from __future__ import annotations

import logging
import os
import sys
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ds_hydra.common.startup import StartUp
from ds_hydra.errors import EXIT_USAGE, UserError, describe_exception, user_error_in

log = logging.getLogger("ds_hydra")


def config_dir() -> str:
    """The installed ``pkg://ds_hydra.conf``, else the checkout's top-level ``conf/``."""
    if find_spec("ds_hydra.conf") is not None:
        return "pkg://ds_hydra.conf"
    return str(Path(__file__).resolve().parents[2] / "conf")


def run_task(cfg) -> Optional[Dict[str, Any]]:
    """Hydra's task function: in a sweep, errors propagate so the sweep records the job as failed; a single
    run's user error goes back to ``cli_main`` in the command's ``StartUp`` (raised when there is none)."""
    from ds_hydra.cli.launch import on_task_start
    from ds_hydra.cli.torchrun_job import launcher_runs_this, run_under_torchrun
    from ds_hydra.common.signals import Stopped
    from ds_hydra.sweeps import select_objective

    startup = StartUp.current()
    on_task_start(startup)  # several processes: rank 0 shares its run dir; the others log quietly
    if startup is not None:
        startup.job_metrics = None  # (a multirun's jobs share the command's StartUp)
        startup.say_notes()  # e.g. the run dir's name was taken: into the run's log, now that it has one
    try:
        # hydra/launcher=torchrun on a single run: its ranks run under torchrun, in this run's directory
        metrics = run_under_torchrun(startup) if launcher_runs_this() else dispatch(cfg, startup)
        if startup is not None:
            startup.job_metrics = metrics  # a torchrun'd rank reports every metric to its launcher
        return select_objective(cfg, metrics)  # the objective carries every metric to the sweep report
    except (UserError, OSError, Stopped) as exc:  # OSError: a full disk, an unwritable file
        if _in_multirun() or startup is None:
            raise
        startup.error = exc
        return None
    except Exception as exc:  # a UserError raised inside a _target_ arrives wrapped by Hydra's instantiate
        if _in_multirun() or startup is None or user_error_in(exc) is None:
            raise
        startup.error = user_error_in(exc)
        return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# task -> "module:function"; each function takes the composed config and returns a metrics dict.
TASKS = {
    "train": "ds_hydra.train_task:train",
    "infer": "ds_hydra.inference:run_inference",
    "eval": "ds_hydra.inference.evaluate:evaluate",
    "validate": "ds_hydra.validate_task:validate_task",
    "resume": "ds_hydra.train_task:train",  # with resume=<run>: continue that run
    "export_deepspeed": "ds_hydra.deepspeed.json_export:export_deepspeed",  # the DeepSpeed JSON, no training
    "export_hf": "ds_hydra.cli.tasks:export_hf_task",  # a trained run as a transformers model directory
    "prepare": "ds_hydra.cli.tasks:prepare_task",  # token files from text, JSONL or Parquet
    "import_deepspeed": "ds_hydra.deepspeed.import_task:import_task",  # deepspeed_config=<file> as a preset
    "lm_eval": "ds_hydra.harness.run:lm_eval_task",  # lm-evaluation-harness tasks on a run or a transformers dir
}


# Tasks that read only some sections of the config log only those.
TASK_SECTIONS = {"prepare": ["task", "tokenizer", "prepare"]}


# The tasks that train: they take the start plan the CLI settled (``plan=``).
TRAINING_TASKS = ("train", "resume")


def dispatch(cfg, startup: Optional[StartUp] = None) -> Dict[str, Any]:
    """Validate a composed config (unless the CLI's callback did) and run its task; returns the task's
    metrics (for sweepers)."""
    from ds_hydra.deepspeed.command_line import log_import
    from ds_hydra.validation import validate_config

    task = cfg.task.value
    imports = startup.deepspeed_imports if startup is not None else {}
    log_import(cfg, imports)  # what deepspeed_config=<file> mapped to, what it left to ds_hydra, what it ignored
    if task != "validate" and not (startup is not None and startup.validated):  # task=validate reports its own
        validate_config(cfg)
    module, _, function = TASKS[task].partition(":")
    from omegaconf import OmegaConf

    from ds_hydra.common.terminal import FILE_ONLY, keep_file_only_records_off_console

    keep_file_only_records_off_console()  # the terminal gets what runs and where it writes; the log, everything
    for line in run_summary(cfg, task):
        log.info("%s", line)
    shown = OmegaConf.masked_copy(cfg, TASK_SECTIONS[task]) if task in TASK_SECTIONS else cfg
    log.info("task=%s; resolved config:\n%s", task, OmegaConf.to_yaml(shown, resolve=True).rstrip(), extra=FILE_ONLY)
    settled: Dict[str, Any] = {}  # what the CLI settled already, for the tasks that use it
    if startup is not None and startup.plan is not None and task in TRAINING_TASKS:
        settled["plan"] = startup.plan
    if task == "import_deepspeed" and imports.get(cfg.get("deepspeed_config")) is not None:
        settled["imported"] = imports[cfg.deepspeed_config]
    return getattr(import_module(module), function)(cfg, **settled)


def run_summary(cfg, task: str) -> List[str]:
    """A few lines for the terminal: the task and the choices that shape it, the command's own
    overrides, and where the run writes (the whole resolved config is in the run's log)."""
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.common.terminal import log_file_of

    if not HydraConfig.initialized():  # called outside the CLI: nothing to add to the config itself
        return []
    hydra_cfg = HydraConfig.get()
    groups = TASK_SECTIONS.get(task, SUMMARY_GROUPS)
    chosen = hydra_cfg.runtime.choices
    choices = [f"{g}={chosen[g]}" for g in groups if chosen.get(g) is not None and chosen[g] != SUMMARY_UNLESS.get(g)]
    lines = [f"task={task}: " + " ".join(choices)]
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
    if overrides:
        lines.append("overrides: " + " ".join(overrides))
    where = f"run dir: {hydra_cfg.runtime.output_dir}"
    if task == "prepare":
        where = f"output: {cfg.prepare.output}; {where}"
    log_file = log_file_of()
    lines.append(where + (f" (the whole resolved config: {log_file})" if log_file else ""))
    return lines


# The groups the terminal's summary of a run names, but not these choices (the defaults of what is off).
SUMMARY_GROUPS = ("experiment", "model", "adapter", "data", "loss", "optimizer", "scheduler", "ckpt", "engine", "hydra/launcher")
SUMMARY_UNLESS = {"adapter": "none", "hydra/launcher": "basic"}


def main() -> None:
    """The ``ds-hydra`` command and ``python -m ds_hydra``: ``cli_main``, then the process exits."""
    try:
        cli_main()
    finally:
        _exit_without_collecting()


def _exit_without_collecting() -> None:
    """The interpreter's last garbage collections walk every object torch has made (0.7-0.8 s of a
    one-step run, as long as the run itself) only to free memory the OS takes back anyway. By now every
    file of the run is closed and flushed (logging's handlers close at exit, before this matters), so
    those objects are frozen out of the collector's sight; reference counting still frees them."""
    import gc

    gc.freeze()


def _run_world_size(argv) -> int:
    """The ranks the run will have (``torchrun_config.run_world_size``: the launch environment's, else
    ``hydra/launcher=torchrun``'s ``nnodes x nproc_per_node``, else 1)."""
    from ds_hydra.cli.torchrun_config import launcher_world_size

    return launcher_world_size(argv)


def cli_main() -> None:
    from ds_hydra.cli.torchrun_job import reporting_to_launcher

    # one StartUp per command: what the callbacks settle for the task and for us, released on the way out
    with StartUp.opened() as startup, reporting_to_launcher(startup):  # a rank of a torchrun'd job: its outcome for the launcher
        _cli_main(startup)


def _cli_main(startup: StartUp) -> None:
    from ds_hydra.config_store import register_configs

    register_configs()
    import hydra

    asked = os.environ.get("HYDRA_FULL_ERROR")
    full_error = asked == "1"
    # Let composition errors reach us as exceptions so each is reported as one clear line (put back as it
    # was on the way out: a second command in this process must not take ours for the user's).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    main = hydra.main(version_base=None, config_path=config_dir(), config_name="config")(run_task)
    from ds_hydra.cli.compose_once import composing_once
    from ds_hydra.cli.launch import after_hydra, before_hydra, wait_for_all_ranks
    from ds_hydra.cli.preflight import RunRefused
    from ds_hydra.common.signals import Stopped, stop_on_signals
    from ds_hydra.instantiate import hydra_callbacks_checked

    try:
        refuse_unpickling_flags(sys.argv[1:])
        args = hydra_arguments(sys.argv[1:], startup)
        if _only_help(args):  # drawn from one composition; Hydra's --help takes 8x as long
            from ds_hydra.help import print_help

            print_help(config_dir(), [a for a in args if a not in ("--help", "-h")])
            return
        # several processes (torchrun): one process group, one run dir, a log per rank
        sys.argv = [sys.argv[0], *before_hydra(args, startup)]  # the one rewrite of the command line
        # hydra.callbacks pass the _target_ allowlist before Hydra builds them (Hydra has no allowlist of its own);
        # a single run's config is composed once (Hydra composes it twice)
        with stop_on_signals(), hydra_callbacks_checked(), composing_once(sys.argv[1:]):  # signals: finish the step, save, exit 75 (130 for Ctrl-C)
            try:
                main()
            except RunRefused as refused:  # found before Hydra wrote into the run dir
                # the error itself, not the carrier; its own cause stays (Hydra's instantiate wraps a
                # _target_'s error, and the torchrun report names the error underneath)
                raise refused.error from refused.error.__cause__
        _exit_if_sweep_failed(startup)
        if startup.error is not None:
            raise startup.error
    except Stopped as exc:
        _exit_if_sweep_failed(startup, exit=False)
        _say(f"ds_hydra: {exc}")
        wait_for_all_ranks()  # several processes: all have saved and said so before any exits
        sys.exit(exc.exit_code)
    except (UserError, OSError, *_composition_errors()) as exc:
        _exit_if_sweep_failed(startup)
        if full_error:
            raise
        _say(f"ds_hydra: error: {describe_exception(exc)}")
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        _say("ds_hydra: interrupted")
        sys.exit(130)
    except Exception:
        # A job's own exception, re-raised by the sweeper after its batch (traceback in the job's log).
        _exit_if_sweep_failed(startup, exit=not full_error)
        raise
    finally:
        after_hydra(startup)  # several processes: release the other ranks if rank 0 stopped before its run dir
        startup.release_locks()  # the run (or sweep) dir's lock: the next writer may take it
        if asked is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked


def _only_help(args) -> bool:
    """``--help`` (or ``-h``) with overrides and no other Hydra option (those go to Hydra's own page)."""
    flags = [a for a in args if a.startswith("-")]
    return bool(flags) and all(f in ("--help", "-h") for f in flags)


def refuse_unpickling_flags(argv) -> None:
    """Hydra's ``--experimental-rerun <file>`` unpickles a saved config: a file is data, and unpickling runs code."""
    for arg in argv:
        if arg == "--experimental-rerun" or arg.startswith("--experimental-rerun="):
            raise UserError(
                "--experimental-rerun: unpickles a saved config file, which can run code, so ds_hydra refuses it; "
                "continue a run with resume=<run dir>, or repeat its overrides (<run>/.hydra/overrides.yaml)"
            )


def hydra_arguments(args: Sequence[str], startup: Optional[StartUp] = None) -> List[str]:
    """The command line Hydra parses, from the one typed (several processes then add their run dir and
    log, ``launch.before_hydra``):

    1. launchers may pass ``--local-rank=N``: removed (N goes to ``LOCAL_RANK``);
    2. ``deepspeed_config=<ds_config.json>``: the file's settings as overrides, before the command line's own;
    3. ``resume=<run>``: the run's saved overrides, in its own directory.
    """
    from ds_hydra.cli.launch import strip_local_rank
    from ds_hydra.deepspeed.command_line import expand_deepspeed_config_args
    from ds_hydra.training.resume import expand_resume_args

    imports = startup.deepspeed_imports if startup is not None else None
    args = strip_local_rank(args)
    # deepspeed_config's batch triple is checked against the run's world size: the launcher's environment,
    # or the torchrun launcher's
    args = expand_deepspeed_config_args(args, world_size=_run_world_size(args), imports=imports)
    return expand_resume_args(args)


def _say(line: str) -> None:
    """Write one line to stderr in a single write: print() writes the text and its newline separately,
    so lines from several ranks sharing the stream could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _exit_if_sweep_failed(startup: StartUp, exit: bool = True) -> None:
    """After a multirun: write the sweep report if Hydra skipped it; exit 1 when any job failed."""
    sweep, startup.sweep = startup.sweep, None
    outcome = sweep.finish() if sweep is not None else None
    if outcome is None or not outcome.failed:
        return
    _say(
        f"ds_hydra: error: {outcome.failed} of {outcome.jobs} sweep jobs failed (first: {outcome.first_error}); "
        f"report: {outcome.report}"
    )
    if exit:
        sys.exit(1)


def _composition_errors():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException)
