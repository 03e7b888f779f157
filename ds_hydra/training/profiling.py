"""``trainer.profile``: where a training step's time and memory go, and a snapshot when it runs out of memory.

``StepProfiler`` wraps the training loop; the loop calls ``step()`` once per optimizer step. With
``trainer.profile.enabled`` it runs ``torch.profiler`` on the schedule ``wait``/``warmup``/``active``
steps, ``repeat`` times (CPU and CUDA activities, input shapes, memory), and at the end of each active
window writes into ``<run dir>/profile/``:

* ``trace_rank<r>_step<n>.json``: a Chrome trace (chrome://tracing, https://ui.perfetto.dev) per rank;
* ``memory_timeline_rank<r>_step<n>.html``: memory by category (parameters, gradients, optimizer
  state, activations...) over the profiled steps;

and logs the operators that took the most self time. With ``trainer.profile.oom_snapshot`` on CUDA,
the allocator's history is recorded from the first step; a step that runs out of memory writes
``oom_snapshot_rank<r>.pickle`` (open it at https://pytorch.org/memory_viz) before the run stops with
one line. The profiler observes only: the run's numbers are the same with it on.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import torch

from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"
SNAPSHOT_ENTRIES = 100_000  # allocation events the CUDA history keeps (torchtune's and torchtitan's choice)


class StepProfiler:
    """A context over the training loop: ``step()`` after each optimizer step."""

    def __init__(self, cfg, run_dir: Path, rank: int, device: torch.device, start_step: int = 0):
        self.cfg = cfg
        self.dir = Path(run_dir) / PROFILE_DIR
        self.rank = rank
        self.device = device
        self.step_number = start_step
        self.profiler: Optional[torch.profiler.profile] = None
        self.recording_history = False
        self.ended_in_warmup = False  # the run ended before the window's first active step: nothing to write

    # -- the context ------------------------------------------------------------------------------
    def __enter__(self) -> "StepProfiler":
        cfg = self.cfg
        if cfg is None:
            return self
        if cfg.enabled or (cfg.oom_snapshot and self.device.type == "cuda"):
            self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.oom_snapshot and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
            self.recording_history = True
        if cfg.enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat),
                on_trace_ready=self._trace_ready,
                record_shapes=True,
                profile_memory=True,
                with_stack=cfg.memory_timeline,  # the memory timeline attributes memory through the stacks
            )
            self.profiler.__enter__()
            log.info(
                "profiling steps %d..%d (wait %d, warmup %d, active %d, repeat %d) into %s",
                self.step_number + cfg.wait + cfg.warmup + 1, self.step_number + cfg.wait + cfg.warmup + cfg.active,
                cfg.wait, cfg.warmup, cfg.active, cfg.repeat, self.dir,
            )
        return self

    def step(self) -> None:
        """One optimizer step has finished."""
        self.step_number += 1
        if self.profiler is not None:
            self.profiler.step()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.profiler is not None:
                self.ended_in_warmup = not _recorded_a_step(self.profiler)
                self.profiler.__exit__(None, None, None)
            if exc is not None and _out_of_memory(exc):
                raise self._out_of_memory_error(exc) from None
        finally:
            if self.recording_history:
                torch.cuda.memory._record_memory_history(enabled=None)
        return False

    # -- outputs ----------------------------------------------------------------------------------
    def _trace_ready(self, prof) -> None:
        if self.ended_in_warmup:
            return
        name = f"rank{self.rank}_step{self.step_number}"
        trace = self.dir / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=self.cfg.top_ops)
        log.info("profile of the steps up to %d (trace: %s); top operators by self time:\n%s", self.step_number, trace, table)
        if self.cfg.memory_timeline:
            timeline = self.dir / f"memory_timeline_{name}.html"
            device = str(self.device if self.device.type == "cpu" or self.device.index is not None else torch.device("cuda", torch.cuda.current_device()))
            try:
                with warnings.catch_warnings():  # torch 2.9+ calls it deprecated, with no replacement on the CPU yet
                    warnings.simplefilter("ignore", FutureWarning)
                    prof.export_memory_timeline(str(timeline), device=device)
                log.info("memory timeline of the profiled steps: %s", timeline)
            except Exception as exc:  # the timeline is a view on the trace: never the run's failure
                log.warning("no memory timeline (%s: %s); the trace %s has the memory events", type(exc).__name__, exc, trace)

    def _out_of_memory_error(self, exc: BaseException) -> UserError:
        where = ""
        if self.recording_history:
            snapshot = self.dir / f"oom_snapshot_rank{self.rank}.pickle"
            try:
                torch.cuda.memory._dump_snapshot(str(snapshot))
                where = f"; memory snapshot: {snapshot} (open it at https://pytorch.org/memory_viz)"
            except Exception as dump_error:  # noqa: BLE001  (the out-of-memory error is the one to report)
                where = f"; no memory snapshot ({type(dump_error).__name__})"
        else:
            where = "; trainer.profile.oom_snapshot=true records a memory snapshot to see what held it"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        return UserError(
            f"step {self.step_number + 1} ran out of {self.device.type.upper()} memory ({first[:160]}){where}; lower "
            f"trainer.batch_size (raising trainer.grad_accum_steps keeps the batch) or pick a ckpt policy that saves more"
        )


def _recorded_a_step(prof) -> bool:
    """Whether the window the run ends in holds a finished active step (written at exit, with the steps it
    has); the profiler's current step is the one that would come next, never run."""
    Action = torch.profiler.ProfilerAction
    n = prof.step_num
    return prof.current_action in (Action.RECORD, Action.RECORD_AND_SAVE) and n > 0 and prof.schedule(n - 1) == Action.RECORD


def _out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


__all__ = ["StepProfiler", "PROFILE_DIR"]
