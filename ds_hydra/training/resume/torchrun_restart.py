"""torchrun ``--max-restarts``: restarted workers find their run by its directory and continue it.

When a worker fails (or stops on SIGTERM/SIGUSR1 with exit 75), torchrun stops the others and starts
every worker again with the same arguments. Without help each restart would start a new run from
step 0 in a new ``${now:...}`` directory. Instead rank 0 of a restarted attempt
(``TORCHELASTIC_RESTART_COUNT`` >= 1), in preflight, before it takes a directory, looks for the run:

* a fixed ``hydra.run.dir`` (the way for several nodes, on a shared filesystem): that directory, if
  the first attempt got as far as writing its overrides there;
* a directory named from the clock (the default ``outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}``): among
  the directories the same pattern names (``outputs/*/*``), the one whose ``torchrun_job.json``
  names this torchrun job: its rendezvous id (``TORCHELASTIC_RUN_ID``, a fresh UUID per
  ``--standalone`` launch) and, where that id is torchrun's default ``none``, also the agent process
  on this host (PID and start time) that restarts the workers.

It then continues that run from its newest checkpoint, as ``resume=<run dir>`` would (torchtitan's
``step=-1``): same directory, same overrides, the interrupted tail of its metrics recomputed. The
other ranks learn the directory, and that it is continued, from rank 0 (``ds_hydra.cli.launch``).
The run's lock names the torchrun job too, so a restarted rank 0 takes over the lock of the attempt
torchrun stopped, also from another host. ``torchrun_job.json`` lives in the run dir, written by
rank 0 whenever the job allows restarts: nothing outside the outputs tree is needed. Torch-free.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import read_write

from ds_hydra.common.files import atomic_write_text
from ds_hydra.training.resume.command_line import OVERRIDES_FILE

log = logging.getLogger(__name__)

JOB_FILE = "torchrun_job.json"

def restart_attempt() -> int:
    """0 on torchrun's first attempt (or outside torchrun), N on its N-th restart."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def restarts_allowed() -> bool:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0


def this_job() -> Dict[str, Any]:
    """What identifies this torchrun job: its rendezvous id, and the agent (our parent) on this host."""
    from ds_hydra.common.run_lock import process_start_time

    agent = os.getppid()
    return {
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        "host": socket.gethostname(),
        "agent_pid": agent,
        "agent_start": process_start_time(agent),
    }


def record_job(run_dir: Path) -> None:
    """Rank 0 of a job that may restart: ``<run dir>/torchrun_job.json`` names the job (and this attempt)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not restarts_allowed():
        return
    atomic_write_text(Path(run_dir) / JOB_FILE, json.dumps({**this_job(), "restart": restart_attempt()}, indent=1) + "\n")


def is_this_job(record: Dict[str, Any]) -> bool:
    job = this_job()
    if record.get("run_id") != job["run_id"] or not job["run_id"]:
        return False
    if job["run_id"] != "none":
        return True
    # torchrun's default rendezvous id is shared by every job started without one: the same agent, then
    return all(record.get(k) == job[k] for k in ("host", "agent_pid", "agent_start"))


def run_to_continue(config) -> Optional[Path]:
    """The run dir a restarted attempt continues, or None (first attempt, resume= given, not found)."""
    from ds_hydra.common.run_dir import names_the_clock

    if restart_attempt() < 1 or config.get("resume", None):
        return None
    node = config.hydra.run
    wanted = Path(str(node.dir))
    pattern = node._get_node("dir")._value()
    if not names_the_clock(pattern):
        return wanted if (wanted / OVERRIDES_FILE).is_file() else None
    return _find_by_job(wanted, str(pattern))


def _find_by_job(wanted: Path, pattern: str) -> Optional[Path]:
    """Among the directories ``pattern`` names, the newest whose job record is this job's."""
    parts = Path(pattern).parts
    depth = len(parts) - next(i for i, part in enumerate(parts) if "${" in part)  # the components from the clock
    if depth > len(wanted.parts):
        return None
    root = wanted.parents[depth - 1]
    found = []
    for record_file in root.glob("/".join(["*"] * depth + [JOB_FILE])):
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and is_this_job(record) and (record_file.parent / OVERRIDES_FILE).is_file():
            found.append((record_file.stat().st_mtime, record_file.parent))
    return max(found)[1] if found else None


def continue_run(config, run_dir: Path) -> None:
    """Make this Hydra run the continuation of ``run_dir``: its directory, ``resume=<it>``, no new
    ``.hydra/`` (train records the continuation once the checkpoint has loaded). The caller tells the
    other ranks (the CLI's preflight, through the command's ``StartUp``)."""
    with read_write(config), read_write(config.hydra), read_write(config.hydra.run):  # Hydra marks its nodes read-only
        config.hydra.run.dir = str(run_dir)
        config.hydra.output_subdir = None
        config.resume = str(run_dir)
    sys.stderr.write(f"ds_hydra: torchrun restart {restart_attempt()}: continuing {Path(run_dir).resolve()}\n")
