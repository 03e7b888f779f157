"""One start-up per command: what the CLI settles before the task runs, handed from Hydra's callbacks to
the task function and back to ``cli_main``.

Hydra calls ``Preflight.on_run_start`` (``ds_hydra.cli.preflight``: the checks, before it writes into the
run dir) and then the task function, and it builds the callbacks itself from their names in the config,
so nothing can be passed to them. ``cli_main`` therefore opens one ``StartUp`` for the command
(``StartUp.opened()``); the callbacks find it with ``StartUp.current()`` and record what they settled
(the config validated, the run dir's lock, the start plan: checkpoint to continue from, memory verdict;
the sweep the sweep callback started), the task function reads that instead of checking again, and a
single run's user error comes back to ``cli_main`` in it. ``cli_main`` releases what it holds on its
way out. Outside ``cli_main`` (a Hydra app of one's own, ``train(cfg)`` as a library) there is none,
and each part checks for itself, once.

This is the one channel between Hydra's callbacks, the task and ``cli_main``: no module keeps state of
its own for them (tests/test_architecture.py lists module-level mutable state). It lives at the bottom
layer, torch-free and importing nothing of ours, so that a callback in any package can reach it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

log = logging.getLogger("ds_hydra")


@dataclass
class StartUp:
    validated: bool = False
    """``validate_config`` passed (in the callback): the task does not validate again."""
    plan: Optional[Any] = None
    """The ``StartPlan`` the callback settled for a single training run (``ds_hydra.training.resume``)."""
    run_dir_lock: Optional[Any] = None
    """The run dir's ``RunLock`` the callback took (``ds_hydra.common.run_lock``); the task writes under it,
    ``cli_main`` releases it."""
    sweep_dir_lock: Optional[Any] = None
    """A multirun's sweep dir lock, taken in ``on_multirun_start``; released at its end or by ``cli_main``."""
    continuing: Optional[str] = None
    """The run dir a restarted torchrun attempt continues (``resume.torchrun_restart``): rank 0 tells the
    other ranks (``cli.launch``)."""
    run_dir_owed: bool = False
    """Rank 0 of several processes: the other ranks still wait for the run dir, or why there is none
    (``cli.launch``)."""
    job_metrics: Optional[Dict[str, Any]] = None
    """The task's complete metrics (the sweeper may get one number, ``objective``): what a rank of a
    torchrun'd job reports to its launcher."""
    sweep: Optional[Any] = None
    """The sweep the sweep callback started in this command (``ds_hydra.sweeps.callback.ActiveSweep``):
    ``cli_main`` writes its report when Hydra's basic sweeper raised before ``on_multirun_end``."""
    deepspeed_imports: Dict[str, Any] = field(default_factory=dict)
    """``deepspeed_config`` value -> what the file mapped to on this command line (``deepspeed.command_line``)."""
    notes: List[Tuple[int, str]] = field(default_factory=list)
    """(level, line) for the run's log, found before the log existed; said when the task starts."""
    error: Optional[BaseException] = None
    """A single run's user error (or stop on request), handed to ``cli_main`` past Hydra, which would add its
    own "Error executing job" line to ours."""
    froze_objects: bool = False
    """The checks froze the objects alive after them out of the garbage collector's sight (``gc.freeze``,
    ``cli.preflight.full_collections_held_back``); given back (``gc.unfreeze``) when the command ends."""

    def note(self, level: int, line: str) -> None:
        self.notes.append((level, line))

    def say_notes(self) -> None:
        while self.notes:
            log.log(*self.notes.pop(0))

    def release_locks(self) -> None:
        """Release the run and sweep dir locks this command took (``cli_main``'s way out; also after an error)."""
        for name in ("run_dir_lock", "sweep_dir_lock"):
            lock = getattr(self, name)
            setattr(self, name, None)
            if lock is not None:
                try:
                    lock.release()
                except OSError as exc:  # the directory went away: nothing left to unlock
                    log.debug("releasing %s: %s", lock.path, exc)

    def unfreeze_objects(self) -> None:
        """Give the objects the checks froze back to the garbage collector (``cli_main``'s way out)."""
        if self.froze_objects:
            self.froze_objects = False
            gc.unfreeze()

    @staticmethod
    def current() -> Optional["StartUp"]:
        """The start-up ``cli_main`` opened for this command, or None outside it."""
        return _OPEN.get()

    @classmethod
    @contextlib.contextmanager
    def opened(cls) -> Iterator["StartUp"]:
        startup = cls()
        token = _OPEN.set(startup)
        try:
            yield startup
        finally:
            _OPEN.reset(token)
            startup.release_locks()
            startup.unfreeze_objects()


# Set only for the duration of one cli_main (a context variable: a thread or task of its own sees none).
_OPEN: ContextVar[Optional[StartUp]] = ContextVar("ds_hydra_startup", default=None)
