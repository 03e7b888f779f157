"""What ``cli_main`` does before Hydra composes, when a launcher started several processes.

Hydra resolves ``hydra.run.dir`` in every process on its own, so ``${now:...}`` can differ between
ranks (one run directory per rank) and every rank writes ``.hydra/`` and the same log file. Here the
ranks agree on one run directory instead:

1. every rank creates the process group (from the launcher's environment) before Hydra runs;
2. rank 0 runs Hydra as usual; once its run directory exists (in the task function) it broadcasts
   the path (``share_run_dir``), and whether it continues that run (a torchrun restart:
   ``ds_hydra.training.resume.torchrun_restart``);
3. every other rank waits for that path and runs Hydra with ``hydra.run.dir=<path>`` and
   ``hydra.output_subdir=null`` (and ``resume=<path>`` when continued): same directory, no ``.hydra/``
   of its own;
4. every rank logs to ``rank{N}.log`` (``hydra.job.name=rank{N}``); only rank 0 prints INFO lines.

If rank 0 stops before sharing (a config error, ``--cfg job``), it broadcasts that instead and the
other ranks exit with its status, printing nothing (rank 0 already said what is wrong).

Launchers that pass ``--local-rank=N``/``--local_rank=N`` (``torch.distributed.launch``, the deepspeed
launcher) are accepted: the argument is removed before Hydra parses the command line and exported as
``LOCAL_RANK``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Sequence

from ds_hydra.common.launch_env import multi_process, other_rank
from ds_hydra.common.overrides import MULTIRUN_OPTIONS, has_option, quote, take_option
from ds_hydra.common.startup import StartUp
from ds_hydra.errors import EXIT_USAGE, UserError

_LOCAL_RANK_FLAGS = ("--local-rank", "--local_rank")

def strip_local_rank(argv: Sequence[str]) -> List[str]:
    """``argv`` without ``--local-rank=N``/``--local_rank N``; N goes to ``LOCAL_RANK`` if unset."""
    try:
        value, rest = take_option(argv, _LOCAL_RANK_FLAGS)
    except ValueError as exc:
        raise UserError(f"{exc}: needs a value (the process's rank on its node)") from None
    if value is not None:
        os.environ.setdefault("LOCAL_RANK", value)
    return rest


# Hydra's options that print and exit, and the tasks that only read the config: no ranks to agree on a
# run dir, so no process group (a launcher's WORLD_SIZE notwithstanding).
_PRINT_ONLY_OPTIONS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc")
_CONFIG_ONLY_TASKS = ("task=validate", "task=import_deepspeed")


def config_only(args: Sequence[str]) -> bool:
    """Whether the command only prints or checks its config (``--cfg job``, ``task=validate``, ...)."""
    return has_option(args, _PRINT_ONLY_OPTIONS) or any(arg.lstrip("+") in _CONFIG_ONLY_TASKS for arg in args)


def before_hydra(args: Sequence[str], startup: StartUp) -> List[str]:
    """Under a multi-process launch: create the process group and agree on the run dir; returns the
    arguments Hydra should parse (``sys.argv[1:]``). A single process gets ``args`` back unchanged.
    Rank 0 then owes the others one broadcast (``startup.run_dir_owed``): the run dir, or why there is none.

    A command that only prints or checks its config creates no process group: rank 0 answers, the
    other ranks exit at once, silent (their answer would be rank 0's)."""
    if not multi_process():
        return list(args)
    if config_only(args):
        if other_rank():
            sys.exit(0)
        return list(args)
    if has_option(args, MULTIRUN_OPTIONS):
        raise UserError("--multirun: not with several processes; start one torchrun per run (or sweep with a launcher plugin)")
    import torch
    import torch.distributed as dist

    from ds_hydra.common.launch_env import local_rank
    from ds_hydra.engine.process_group import PROCESS_GROUP_TIMEOUT

    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        _init_launched_process_group(dist, PROCESS_GROUP_TIMEOUT)
    rank = dist.get_rank()
    extra = [f"hydra.job.name=rank{rank}"]
    if rank == 0:
        startup.run_dir_owed = True
    else:
        status, run_dir, continued = _receive()
        if run_dir is None:
            _finish_process_group()
            sys.exit(status)
        extra += [f"hydra.run.dir={quote(run_dir)}", "hydra.output_subdir=null"]
        extra += [f"resume={quote(continued)}"] if continued else []
    return [*args, *extra]


def _init_launched_process_group(dist, timeout) -> None:
    """The default process group from the launcher's environment (env://).

    After a torchrun restart the workers meet in the same store as the attempt before, where the
    dead processes' addresses are still written under the same keys; a rank that reads one before
    its peer overwrites it fails to connect. Keys under a prefix per attempt cannot be stale.
    No backend named: gloo for CPU tensors, plus NCCL for CUDA tensors when there are GPUs.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"ds_hydra/attempt_{attempt}", store)
    dist.init_process_group(store=store, rank=rank, world_size=world_size, timeout=timeout)


def share_run_dir(startup: StartUp, run_dir: str) -> None:
    """Rank 0, once Hydra made the run dir: send it to the other ranks (no-op elsewhere or when done),
    with the run dir a restarted torchrun attempt continues (``startup.continuing``)."""
    if startup.run_dir_owed:
        startup.run_dir_owed = False
        _broadcast((0, str(run_dir), startup.continuing))


def on_task_start(startup: Optional[StartUp]) -> None:
    """First thing in the task function: rank 0 shares Hydra's run dir; other ranks quiet their console."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if startup is not None and startup.run_dir_owed and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        share_run_dir(startup, HydraConfig.get().runtime.output_dir)
    quiet_console_on_other_ranks()


def after_hydra(startup: StartUp) -> None:
    """In ``cli_main``'s ``finally``: if rank 0 never shared a run dir, tell the others to exit with
    its status (the exit code in flight, 0 without one), then close the process group."""
    if startup.run_dir_owed:
        startup.run_dir_owed = False
        exc = sys.exc_info()[1]
        if exc is None:
            status = 0
        elif isinstance(exc, SystemExit):
            status = exc.code if isinstance(exc.code, int) else 1
        else:
            status = exit_status_for(exc)
        _broadcast((status, None, None))
    _finish_process_group()


def wait_for_all_ranks() -> None:
    """No rank leaves before every rank got here: torchrun stops the remaining ranks as soon as one
    exits, which could cut rank 0 off before it has said why it stopped."""
    dist = _process_group_module()
    if dist is not None:
        dist.barrier()


def quiet_console_on_other_ranks() -> None:
    """Ranks other than 0 print only warnings and errors (their full log is in rank{N}.log)."""
    dist = _process_group_module()
    if dist is None or dist.get_rank() == 0:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def _broadcast(message) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0)


def _receive():
    import torch.distributed as dist

    box: List[Optional[tuple]] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _process_group_module():
    """``torch.distributed`` if a process group is up, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return None
    return dist


def _finish_process_group() -> None:
    dist = _process_group_module()
    if dist is not None:
        from ds_hydra.engine.process_group import leave_process_group

        leave_process_group(dist)


def exit_status_for(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, UserError) else 1
