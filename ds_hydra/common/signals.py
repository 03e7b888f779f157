"""Stop training cleanly when asked to: cluster pre-emption (SIGTERM, SIGUSR1) and Ctrl-C (SIGINT).

A signal handler only records the request; the training loop asks ``stop_requested()`` after each
optimizer step, and on a request it saves a checkpoint and raises ``Stopped``. The CLI turns that
into an exit code a job script can act on:

* ``EXIT_REQUEUE = 75`` after SIGTERM or SIGUSR1: ``EX_TEMPFAIL`` from ``sysexits.h``, "a temporary
  failure; retry later". The run is saved and continues with ``python -m ds_hydra resume=<run dir>``,
  so a SLURM script can requeue on it (``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``). It
  differs from 0 (done), 1 (crash), 2 (bad input), 3 (training diverged) and 130 (Ctrl-C).
* ``EXIT_INTERRUPTED = 130`` (128 + SIGINT, the shell's convention) after Ctrl-C: the first Ctrl-C
  also saves; a second one raises ``KeyboardInterrupt`` at once, without saving.

Under ``torchrun`` a signal may reach the ranks at different steps, so when ``torch.distributed`` is
initialized every rank all-reduces its flag at each log step (one 4-byte collective, where the loop
reads the loss anyway, so training adds no host sync per step) and all of them
stop, save and exit at the same step.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Dict, Iterator, Optional

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130

# The signals that ask for a save-and-stop (SIGUSR1 does not exist on Windows).
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None)


class Stopped(Exception):
    """Training stopped on request after saving ``checkpoint``; ``exit_code`` says why (75 or 130)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path], run_dir: Path):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir
        self.exit_code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet"
        super().__init__(
            f"stopped by {signal_name(signum)} after step {step}; {saved}; "
            f"continue with: python -m ds_hydra resume={run_dir}"
        )


class _StopState:
    """The stop request of the outermost ``stop_on_signals`` block: born when it installs the handlers
    (cleared), read by the loop, cleared again when that block ends and the previous handlers return."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first stop signal received
        self.depth = 0  # nested stop_on_signals() blocks share one installation
        self.previous: Dict[int, object] = {}


# One per process, on purpose: a signal handler is process-global (the OS delivers a signal to the
# process, and Python runs handlers in its main thread), so the flag it sets is too. Its lifetime is the
# outermost stop_on_signals block (a command, or one train() called as a library): a request made during
# one run is gone when the next begins; within one command it stays, so a pre-empted sweep starts no
# further job.
_state = _StopState()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handle(signum: int, frame) -> None:
    if _state.signum is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: leave now, without saving
            raise KeyboardInterrupt
        return  # a repeated SIGTERM/SIGUSR1: already stopping
    _state.signum = signum
    what = "exit with 130" if signum == signal.SIGINT else f"exit with {EXIT_REQUEUE} (requeue)"
    again = "; press Ctrl-C again to quit at once without saving" if signum == signal.SIGINT else ""
    # os.write, not print: a handler may interrupt a print to the same stream.
    os.write(2, f"ds_hydra: {signal_name(signum)}: finishing this step, saving, then {what}{again}\n".encode())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, the stop signals set a flag instead of killing the process.

    Handlers can only be installed from the main thread; elsewhere this does nothing (the signals
    keep their previous behaviour). Nested blocks share the outer installation and its flag.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state.depth == 0:
        _state.signum = None
        for signum in STOP_SIGNALS:
            _state.previous[signum] = signal.signal(signum, _handle)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for signum, previous in _state.previous.items():
                signal.signal(signum, previous)
            _state.previous.clear()
            _state.signum = None


def stop_requested() -> Optional[int]:
    """The signal that asked this process (or, when distributed, any rank) to stop, else None.

    Call it at the same step on every rank: when ``torch.distributed`` is initialized it is a
    collective (an all-reduce of the flag, MAX), so that all ranks save and stop together.
    """
    local = _state.signum or 0
    dist = _initialized_distributed()
    if dist is None:
        return local or None
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([local], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())
    return agreed or None


def _initialized_distributed():
    import sys

    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None
