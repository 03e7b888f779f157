"""One start-up per command: what the CLI settles before the task runs, handed from Hydra's callback to
the task function and back to ``cli_main``.

Hydra calls ``Preflight.on_run_start`` (``ds_hydra.cli.preflight``: the checks, before it writes into the
run dir) and then the task function, and it builds the callback itself from its name in the config, so
nothing can be passed to it. ``cli_main`` therefore opens one ``StartUp`` for the command
(``StartUp.opened()``); the callback finds it with ``StartUp.current()`` and records what it settled
(the config validated, the start plan: run dir claimed and locked, checkpoint to continue from, memory
verdict), the task function reads that instead of checking again, and a single run's user error
comes back to ``cli_main`` in it. Outside ``cli_main`` (a Hydra app of one's own, ``train(cfg)`` as a
library) there is none, and each part checks for itself, once.
"""
from __future__ import annotations

import contextlib
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
    deepspeed_imports: Dict[str, Any] = field(default_factory=dict)
    """``deepspeed_config`` value -> what the file mapped to on this command line (``deepspeed.command_line``)."""
    notes: List[Tuple[int, str]] = field(default_factory=list)
    """(level, line) for the run's log, found before the log existed; said when the task starts."""
    error: Optional[BaseException] = None
    """A single run's user error (or stop on request), handed to ``cli_main`` past Hydra, which would add its
    own "Error executing job" line to ours."""

    def note(self, level: int, line: str) -> None:
        self.notes.append((level, line))

    def say_notes(self) -> None:
        while self.notes:
            log.log(*self.notes.pop(0))

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


# Set only for the duration of one cli_main (a context variable: a thread or task of its own sees none).
_OPEN: ContextVar[Optional[StartUp]] = ContextVar("ds_hydra_startup", default=None)
