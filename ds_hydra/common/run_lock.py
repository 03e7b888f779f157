"""One writer per run directory: a lock file held for the life of the process that writes the run.

``<run dir>/run.lock`` names its holder (host, PID, the process's start time, the machine's boot id,
since when, the torchrun job). It is created atomically: the holder's record is written to a temp
file which is then hard-linked to ``run.lock`` (a link fails if the name exists, on local and NFS
filesystems alike), so a reader never sees half a record. The holder refreshes the file's mtime every
``heartbeat_s`` seconds and removes it when it exits (also after an error); a second process that
finds a live holder is refused with one line naming it.

A lock whose holder is gone is taken over:

* same host: the PID is not running, or runs another process now (its start time differs: PIDs are
  reused), or the machine has rebooted since (another boot id);
* another host (a shared filesystem): the holder has not refreshed it for ``stale_after_s`` seconds,
  or it belongs to an earlier attempt of the same torchrun job (torchrun stops every worker before it
  restarts them), or ``break_lock`` says to.

Two processes taking over the same stale lock at once are serialised by a take-over claim named after
the stale holder's token (``run.lock.takeover-<token>``, created exclusively): the one that creates it
checks that ``run.lock`` still holds that token, replaces it, and removes the claim.

Torch-free: the CLI locks a run directory before torch is imported.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ds_hydra.common import launch_env
from ds_hydra.common.files import new_file_mode
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
LOCK_FORMAT = "ds_hydra.run_lock.v1"
DEFAULT_STALE_AFTER_S = 600.0
TAKEOVER_CLAIM_TIMEOUT_S = 60.0  # a take-over claim older than this was left by a process that died taking over


class RunLocked(UserError):
    """The run directory is written by another live process."""


@dataclass
class LockSettings:
    """The ``run`` config's lock knobs (see ``ds_hydra.training.config.RunConfig``)."""

    stale_after_s: float = DEFAULT_STALE_AFTER_S
    break_lock: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "LockSettings":
        run = cfg.get("run", None) if cfg is not None and hasattr(cfg, "get") else None
        if run is None:
            return cls()
        return cls(stale_after_s=float(run.get("lock_stale_after_s", DEFAULT_STALE_AFTER_S)), break_lock=bool(run.get("break_lock", False)))

    @property
    def heartbeat_s(self) -> float:
        """Refresh often enough that a live holder never looks stale: four times per stale period, at most every 30 s."""
        return min(30.0, self.stale_after_s / 4) if self.stale_after_s > 0 else 30.0


# -- who holds it --------------------------------------------------------------------------------------
def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (an opaque number, comparable for one pid on one boot), or None.

    Linux: field 22 of /proc/<pid>/stat (clock ticks since boot); elsewhere psutil's create_time when
    psutil is installed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return float(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def torchrun_job() -> Optional[Dict[str, Any]]:
    """This worker's torchrun job (its rendezvous id and restart attempt), or None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    return {"run_id": run_id, "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)}


def holder_record() -> Dict[str, Any]:
    now = time.time()
    return {
        "format": LOCK_FORMAT,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": process_start_time(os.getpid()),
        "boot_id": _boot_id(),
        "since": now,
        "since_text": datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S"),
        "token": uuid.uuid4().hex,
        "torchrun": torchrun_job(),
        "command": " ".join(sys.argv)[:500],
    }


def describe_holder(holder: Dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("since_text") or "an unknown time"
    job = holder.get("torchrun") or {}
    torchrun = f", torchrun job {job['run_id']}" if job.get("run_id") else ""
    return f"pid {pid} on {host}{torchrun}, since {since}"


# -- the lock ----------------------------------------------------------------------------------------
class RunLock:
    """A lock this process holds on one run directory; ``release`` (or process exit) removes it."""

    def __init__(self, run_dir: Path, record: Dict[str, Any], heartbeat_s: float, lock_file: str = LOCK_FILE):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / lock_file
        self.record = record
        self.took_over: Optional[str] = None  # why a stale lock was replaced by this one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="ds_hydra-run-lock", daemon=True)
        self._thread.start()
        # Its owner (the command's StartUp, ``holding``, a prepare) releases it; the process's exit does
        # too when an error skipped that.
        atexit.register(self.release)

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                os.utime(self.path)
            except OSError as exc:  # removed with its directory, or the filesystem went away
                log.warning("%s: cannot refresh the run lock (%s); other hosts may take it over once it goes stale", self.path, exc)
                return

    def release(self) -> None:
        """Remove the lock if it is still this process's (a fork inherits the object, not the lock)."""
        self._stop.set()
        atexit.unregister(self.release)
        if os.getpid() != self.record["pid"]:
            return
        held = read_holder(self.path)
        if held is not None and held.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


def acquire(run_dir: Path, settings: Optional[LockSettings] = None, what: str = "run dir", announce: bool = True,
            lock_file: str = LOCK_FILE, subject: Optional[str] = None) -> RunLock:
    """Lock ``run_dir`` (which must exist) for this process; the caller owns the lock and releases it.
    Raises ``RunLocked`` naming the holder when a live process (this one included) holds it.
    ``lock_file``: the lock's name in ``run_dir`` (``run.lock``; others lock something beside it, such
    as a prepared directory that is replaced by a rename); ``subject`` heads the refusal (default
    "<what> <run_dir>").

    A stale lock taken over is logged (``announce``) and described in the lock's ``took_over``."""
    settings = settings or LockSettings()
    path = Path(run_dir) / lock_file
    record = holder_record()
    for _ in range(20):  # each round either takes the lock or sees a holder that changed meanwhile
        if _create_exclusive(path, record):
            return RunLock(run_dir, record, settings.heartbeat_s, lock_file)
        holder = read_holder(path, wait_s=1.0)
        if holder is None:
            continue  # released meanwhile: try again
        reason = stale_reason(holder, path, settings)
        if reason is None:
            raise RunLocked(_refusal(subject or f"{what} {run_dir}", path, holder, settings))
        if _take_over(path, holder, record):
            lock = RunLock(run_dir, record, settings.heartbeat_s, lock_file)
            lock.took_over = f"{run_dir}: took over the lock of {describe_holder(holder)}: {reason}"
            if announce:
                log.warning(lock.took_over)
            return lock
        time.sleep(0.05)
    raise RunLocked(f"{run_dir}: could not take its lock {path}: other processes keep changing it; try again")


@contextlib.contextmanager
def holding(run_dir: Path, cfg: Any = None, held: Optional[RunLock] = None) -> Iterator[Optional[RunLock]]:
    """Hold ``run_dir``'s lock for the ``with`` block (``train`` outside the CLI, sweep jobs).

    ``held``: the lock the caller took already (the CLI's, in its ``StartUp``): used and kept past the
    block, its owner releases it. Under a multi-process launch only rank 0 locks: it holds the lock for
    every rank."""
    if launch_env.other_rank():
        yield None
        return
    if held is not None:
        yield held
        return
    lock = acquire(run_dir, LockSettings.from_config(cfg))
    try:
        yield lock
    finally:
        lock.release()


def _refusal(subject: str, path: Path, holder: Dict[str, Any], settings: LockSettings) -> str:
    if holder.get("pid") == os.getpid() and _same_machine(holder):
        return f"{subject}: in use by this process already ({describe_holder(holder)}; lock {path}): one writer per directory"
    text = f"{subject}: in use by another ds_hydra process ({describe_holder(holder)}; lock {path})"
    if _same_machine(holder):
        return text + "; let it finish or stop it, then try again"
    silent = _silence_s(path)
    age = f"last refreshed {silent:.0f} s ago; " if silent is not None else ""
    after = f"it is taken over once silent for run.lock_stale_after_s={settings.stale_after_s:g} s, or " if settings.stale_after_s > 0 else ""
    return text + f"; {age}{after}add run.break_lock=true if you know that process is gone"


def _create_exclusive(path: Path, record: Dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` unless it exists; False if it does. Atomic: link a complete temp file."""
    text = json.dumps(record, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # as the run's other files
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            return _create_exclusive_without_link(path, text)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _create_exclusive_without_link(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:  # readers wait for an empty file to fill (read_holder)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def read_holder(path: Path, wait_s: float = 0.0) -> Optional[Dict[str, Any]]:
    """The lock's record; None if there is no lock. An unreadable record comes back as ``{}``
    (a holder nobody can name), after waiting up to ``wait_s`` for a record being written."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            text = ""
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _silence_s(path: Path) -> Optional[float]:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return None


def _same_machine(holder: Dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    mine, theirs = _boot_id(), holder.get("boot_id")
    return mine is None or theirs is None or mine == theirs


def stale_reason(holder: Dict[str, Any], path: Path, settings: LockSettings) -> Optional[str]:
    """Why ``holder`` no longer holds the lock, or None while it may still be writing."""
    if settings.break_lock:
        return "run.break_lock=true"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        mine, theirs = _boot_id(), holder.get("boot_id")
        if mine is not None and theirs is not None and mine != theirs:
            return "this machine has restarted since"
        if not pid_running(pid):
            return f"pid {pid} is no longer running"
        started, recorded = process_start_time(pid), holder.get("process_start")
        if started is not None and recorded is not None and started != recorded:
            return f"pid {pid} is another process now"
        return None
    job, theirs = torchrun_job(), holder.get("torchrun") or {}
    if job is not None and job["run_id"] not in ("", "none") and theirs.get("run_id") == job["run_id"]:
        if int(theirs.get("restart", 0)) < job["restart"]:
            return f"it belongs to attempt {theirs.get('restart', 0)} of this torchrun job, which torchrun has stopped"
    silent = _silence_s(path)
    if settings.stale_after_s > 0 and silent is not None and silent > settings.stale_after_s:
        return f"not refreshed for {silent:.0f} s (run.lock_stale_after_s={settings.stale_after_s:g})"
    return None


def _take_over(path: Path, stale: Dict[str, Any], record: Dict[str, Any]) -> bool:
    """Replace the stale lock by ours, unless another process is doing so or has done so."""
    claim = path.with_name(f"{path.name}.takeover-{stale.get('token') or 'unknown'}")
    if not _create_exclusive(claim, record):
        age = _silence_s(claim)
        if age is not None and age > TAKEOVER_CLAIM_TIMEOUT_S:
            claim.unlink(missing_ok=True)  # abandoned by a process that died while taking over
        return False
    try:
        current = read_holder(path)
        if current is not None and current.get("token") != stale.get("token"):
            return False  # someone else replaced it first
        path.unlink(missing_ok=True)
        return _create_exclusive(path, record)
    finally:
        claim.unlink(missing_ok=True)
