"""Checks that run, and the run directory taken, before Hydra writes anything into it.

Hydra creates the run directory and writes ``.hydra/`` into it before it calls the task function,
so a problem found only there would already have touched the directory, and when that directory is
an earlier run (``resume=<run>``, or ``hydra.run.dir=<run>``) it would overwrite the run's record.
``Preflight`` is a Hydra callback (``hydra.callbacks.preflight`` in conf/config.yaml) whose
``on_run_start`` fires after composition and before any file is written. It checks, in order:

1. the config (``ds_hydra.validation``): every range and cross-field problem;
2. a CUDA device is there when ``trainer.device`` asks for one, one training step fits in the
   device's free memory (``memory_preflight``: estimated on fake tensors, nothing allocated), and the
   data give every split something to train and evaluate on at the run's sequence length
   (``seq_vocab.check_data_fits``);
3. the run directory can be created and written (``hydra.run.dir``; a restarted torchrun attempt
   continues the run the first attempt wrote, ``resume.torchrun_restart``), then takes it: a directory named
   from the clock (``${now:...}``) is claimed exclusively, under the next free name if another launch
   took it (``hydra.run.dir`` is set to the name claimed); any other is created if missing; either
   way it is locked for this process (``ds_hydra.common.run_lock``; under torchrun rank 0 holds
   the lock for every rank);
4. the directory does not already hold a run, unless ``resume=`` continues it;
5. when resuming, the checkpoint loads safely and was saved by the same model.

Steps 1 and 2 run without full garbage collections (``full_collections_held_back``): they import torch and
trace a step on fake tensors, and the collector's full passes over those long-lived objects found nothing;
under ``cli_main`` what is alive after them is then kept out of the collector's sight until the command ends.

What it settles goes into the command's ``StartUp`` (``ds_hydra.common.startup``): the config validated,
the run dir's lock, the start plan (checkpoint to continue from, memory verdict), the run a restarted
torchrun attempt continues, and lines for the run's log, so the task checks none of it again. Outside
``cli_main`` (a Hydra app of one's own composing ds_hydra's config) there is no ``StartUp``: the checks
run here and the task's ``train`` runs its own, taking the run dir's lock itself, so this callback lets
go of the lock it took once its checks passed.

A refused run leaves nothing behind: the lock is released and a directory created here removed.
``on_multirun_start`` claims and locks the sweep directory the same way (``hydra.sweep.dir``); sweep
jobs are checked by the task itself, each in its own fresh job directory.

Hydra turns an ``Exception`` raised in a callback into a warning and carries on, so a refusal leaves
the callback as ``RunRefused`` (a ``BaseException``); ``cli_main`` unwraps it into its one line.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from hydra.experimental.callback import Callback
from omegaconf import read_write

from ds_hydra.common.startup import StartUp
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)
Note = Callable[[int, str], None]  # (level, line) for the run's log, said once the task starts


class RunRefused(BaseException):
    """What stopped the run before it started (a ``UserError``, or a bug in a check), carried past Hydra's
    callback error handling (which would only warn and let the run start)."""

    def __init__(self, error: Exception):
        self.error = error
        super().__init__(str(error))


class Preflight(Callback):
    """``on_run_start``: refuse a bad run before its directory is touched; take the directory.
    ``on_multirun_start``: take the sweep directory. Hydra builds one per command; the directories it
    took are its own until the run (or sweep) ends, and the command's ``StartUp`` holds their locks too,
    so that ``cli_main`` releases them when an error skips the end."""

    def __init__(self) -> None:
        self._run: Optional[TakenDir] = None
        self._sweep: Optional[TakenDir] = None

    def __getstate__(self):  # sent to a launcher's job processes (joblib): the locks stay with their holder
        return {**self.__dict__, "_run": None, "_sweep": None}

    def on_run_start(self, config, **kwargs: Any) -> None:
        opened = StartUp.current()
        startup = opened or StartUp()  # outside cli_main: checked here, and by the task again
        taken = None
        try:
            with full_collections_held_back(opened):
                memory = check_config(config, startup)
            startup.continuing = continue_after_torchrun_restart(config)
            taken = take_run_dir(config, startup.note)
            startup.run_dir_lock = taken.lock if taken is not None else None
            startup.plan = check_run_dir(config, memory, startup.run_dir_lock)
        except Exception as exc:  # a user error, or a bug in a check: either way the run must not start
            if taken is not None:
                taken.give_back()
            startup.run_dir_lock = None
            raise RunRefused(exc) from exc
        if opened is None:
            startup.release_locks()  # no command hands it to the task: its train takes the lock itself
        else:
            self._run = taken

    def on_run_end(self, config, **kwargs: Any) -> None:
        _let_go(self._run, "run_dir_lock")
        self._run = None

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        try:
            self._sweep = take_sweep_dir(config)
        except UserError as exc:
            raise RunRefused(exc) from exc
        startup = StartUp.current()
        if startup is not None:
            startup.sweep_dir_lock = self._sweep.lock

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        _let_go(self._sweep, "sweep_dir_lock")
        self._sweep = None


@contextlib.contextmanager
def full_collections_held_back(startup: Optional[StartUp] = None) -> Iterator[None]:
    """No full garbage collection while the config's checks run (young objects are collected as always).

    The checks import torch and trace a training step on fake tensors: about half a million objects that
    live as long as the process. The collector's full passes walk all of them each time the long-lived
    objects grow by a quarter, five times in these checks (0.4-0.5 s of a one-step run), and find almost
    nothing to free: what the checks make and drop dies young. The collector's thresholds come back after.

    With the command's ``startup`` (under ``cli_main``), the objects alive once the checks passed are then
    frozen (``gc.freeze``): the next full collection, and every one during training, walks only what the
    run makes after them, instead of walking them all once more (0.15-0.25 s) to free the few thousand
    objects of garbage the checks left in the old generation. ``StartUp.opened`` gives them back to the
    collector when the command ends. Objects someone else froze before are left as they are (nothing is frozen).
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 2**31 - 1)
    try:
        yield
        if startup is not None and gc.get_freeze_count() == 0:
            gc.freeze()
            startup.froze_objects = True
    finally:
        gc.set_threshold(*thresholds)


def _let_go(taken: Optional["TakenDir"], held_as: str) -> None:
    """Release the lock on a directory this callback took, and forget it in the command's ``StartUp``."""
    if taken is None or taken.lock is None:
        return
    startup = StartUp.current()
    if startup is not None and getattr(startup, held_as) is taken.lock:
        setattr(startup, held_as, None)
    taken.lock.release()


def _task(config) -> str:
    return getattr(config.task, "value", config.task)


def check_config(config, startup: StartUp):
    """The config's own problems, a CUDA device it asks for, and one training step's memory (its verdict)."""
    from hydra.core.hydra_config import HydraConfig

    from ds_hydra.validation import validate_config

    HydraConfig.instance().set_config(config)  # lets ${hydra:...} resolve while validating
    task = _task(config)
    if task != "validate":  # task=validate reports these problems itself, with its own
        validate_config(config)
        startup.validated = True
    if task in ("train", "resume"):
        check_device(config)
        from ds_hydra.training.memory_fit import fit_to_memory

        for line in fit_to_memory(config):  # batch_size=auto, ckpt=auto become numbers in the config the run gets
            startup.note(logging.INFO, line)
        memory = None
        if not _other_rank():  # rank 0 speaks for all; the free memory changes once it starts
            from ds_hydra.training.memory_preflight import check_step_memory

            memory = check_step_memory(config, say=startup.note)  # refuses far over
        from ds_hydra.training.seq_vocab import check_data_fits

        check_data_fits(config)  # empty splits, SFT examples cut or with nothing to train on: before step 1
        return memory
    return None


def check_run_dir(config, memory=None, lock=None):
    """Training: the run dir holds no other run, and a checkpoint to continue fits this model; returns the
    start plan for ``train`` (None for other tasks, and on ranks other than 0, which plan for themselves)."""
    from ds_hydra.training.resume import check_compatible, plan_start

    if _task(config) not in ("train", "resume") or _other_rank():
        return None
    run_dir = Path(str(config.hydra.run.dir))
    ensure_writable(run_dir, key="hydra.run.dir")
    plan = plan_start(config, run_dir)
    plan.memory = memory
    plan.lock = lock
    if plan.checkpoint is not None:
        from ds_hydra.training.sharded_checkpoint import load_resume_state

        saved = load_resume_state(plan.checkpoint, mmap=True)  # maps the tensors; reads only the index
        check_compatible(saved["config"], config, plan.checkpoint, strict=False)
        plan.checkpoint_checked = True
    return plan


@dataclass
class TakenDir:
    """A run or sweep directory this process took: ``give_back`` undoes it (a refused run)."""

    path: Path
    created: bool
    lock: Optional[Any] = None
    """The ``RunLock`` this process holds on it."""

    def give_back(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created:
            try:
                self.path.rmdir()  # only if still empty
            except OSError:
                pass


def _other_rank() -> bool:
    """A rank other than 0 of a multi-process launch: rank 0 took the run dir for it."""
    from ds_hydra.common import launch_env

    return launch_env.other_rank()


def continue_after_torchrun_restart(config) -> Optional[str]:
    """A restarted torchrun attempt's rank 0: continue the run the first attempt wrote, found by its
    directory (``resume.torchrun_restart``); returns that run dir, which rank 0 tells the other ranks."""
    from ds_hydra.training.resume.torchrun_restart import continue_run, run_to_continue

    if _task(config) in ("train", "resume") and not _other_rank():
        found = run_to_continue(config)
        if found is not None:
            continue_run(config, found)
            return str(found)
    return None


def take_run_dir(config, note: Note) -> Optional[TakenDir]:
    """Claim (a name from the clock) or create ``hydra.run.dir``, then lock it for this process."""
    if _other_rank():
        return None
    taken = _take(config, "run", note)
    if taken.path != Path(str(config.hydra.run.dir)):
        wanted = str(config.hydra.run.dir)
        _set_hydra_dir(config, "run", taken.path)
        note(logging.INFO, f"hydra.run.dir: {wanted} was taken by another run; this run writes into {taken.path}")
    return taken


def take_sweep_dir(config) -> TakenDir:
    """``take_run_dir`` for a multirun's ``hydra.sweep.dir``; the jobs inherit the name claimed."""
    taken = _take(config, "sweep")
    wanted = Path(str(config.hydra.sweep.dir))
    if taken.path != wanted:
        from ds_hydra.common.overrides import quote

        _set_hydra_dir(config, "sweep", taken.path)
        with read_write(config.hydra.overrides):  # each job's config is composed again from these overrides
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quote(taken.path)}")
        log.info("hydra.sweep.dir: %s was taken by another sweep; this sweep writes into %s", wanted, taken.path)
    return taken


def _take(config, kind: str, note: Optional[Note] = None) -> TakenDir:
    from omegaconf import OmegaConf

    from ds_hydra.common.run_dir import claim_new_dir, names_the_clock
    from ds_hydra.common.run_lock import LockSettings, acquire

    key = f"hydra.{kind}.dir"
    node = OmegaConf.select(config, f"hydra.{kind}")
    wanted = Path(str(node.dir))
    ensure_writable(wanted, key=key)
    try:
        if names_the_clock(node._get_node("dir")._value()):
            taken = TakenDir(claim_new_dir(wanted), created=True)
        else:
            taken = TakenDir(wanted, created=not wanted.exists())
            wanted.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key}={wanted}: cannot write there: {exc.strerror or exc}; choose a writable directory") from None
    try:
        lock = taken.lock = acquire(taken.path, LockSettings.from_config(config), what=f"{kind} dir", announce=kind == "sweep")
    except BaseException:
        taken.give_back()
        raise
    if lock.took_over and note is not None:
        note(logging.WARNING, lock.took_over)
    if kind == "run":
        from ds_hydra.training.resume.torchrun_restart import record_job

        record_job(taken.path)  # a torchrun job that may restart: its restarted workers find this run by it
    return taken


def _set_hydra_dir(config, kind: str, path: Path) -> None:
    """Point ``hydra.<kind>.dir`` at the directory taken: Hydra reads it after this callback."""
    node = config.hydra[kind]
    with read_write(node):
        node.dir = str(path)


def check_device(config) -> None:
    """A CUDA device this machine does not have (imports torch only when one is asked for)."""
    device = str(config.trainer.device)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"trainer.device={device}: CUDA is not available on this machine (use auto or cpu)")


def ensure_writable(folder: Path, key: str) -> None:
    """``folder`` (or, if it does not exist yet, its nearest existing parent) takes a temp file.

    Nothing is created: checked before a directory is made, so a refusal leaves nothing behind.
    """
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={folder}: cannot write there: {existing} is a file, not a directory; choose a writable directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{key}={folder}: cannot write there: {reason} (writing into {existing}); choose a writable directory") from None
