"""Batch size and activation checkpointing fitted to a memory limit, from the estimate alone.

``trainer.batch_size=auto`` (with ``trainer.global_batch_size=G``) and ``ckpt=auto``
(``ckpt.memory_budget=auto``) are resolved here, before the memory preflight and before anything is
built, into plain values of the config: the run, its log and ``config_resolved.yaml`` then hold
numbers, and a resume repeats them (they are read back from the run's ``config_resolved.yaml``, not
fitted again to whatever memory is free then). The estimate (``memory_estimate``, on fake tensors) is
deterministic, so no trial steps run:

* the limit: ``trainer.memory_limit``, else the device's free memory less the estimate's margin
  (``memory_preflight.ERROR_MARGIN``), so the preflight then accepts the choice without a warning;
* ``batch_size=auto``: the largest micro-batch ``b`` whose step fits the limit (a binary search over
  ``1..G / world``, the estimate growing with ``b``), lowered to the largest divisor of ``G / world`` so
  that ``grad_accum_steps = G / (world * b)`` keeps the global batch exactly. With ``ckpt=auto`` too, the
  micro-batch is fitted under per-block recompute (what lets the largest one fit), then the budget;
* ``ckpt=auto``: no recompute when the whole step fits; else the largest ``ckpt.memory_budget`` (bytes
  of saved activations, which the ``MemoryBudget`` policy meets with the fewest recomputed blocks) with which the step
  fits: start from the un-checkpointed saved bytes less the overshoot, and lower by the remaining
  overshoot until it fits (a few estimates); per-block recompute when no budget does.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf, open_dict, read_write

from ds_hydra.common import launch_env
from ds_hydra.errors import UserError

AUTO = "auto"
PER_BLOCK = {"full": True, "memory_budget": None}
BUDGET_TRIES = 6


def wants_fit(cfg) -> bool:
    return cfg.trainer.batch_size == AUTO or cfg.ckpt.get("memory_budget", None) == AUTO


def fit_to_memory(cfg) -> List[str]:
    """Resolve ``batch_size=auto`` and ``ckpt=auto`` in ``cfg`` (in place); returns the lines that say
    what was chosen and why, for the caller to log. Nothing to do: an empty list."""
    if not wants_fit(cfg):
        return []
    lines = _repeat_resumed_choice(cfg)
    return lines if lines is not None else _fit(cfg)


def memory_limit(cfg) -> Tuple[int, str]:
    """(bytes a step may take, where the number comes from)."""
    from ds_hydra.activation_checkpointing.config import format_bytes
    from ds_hydra.devices import resolve_device
    from ds_hydra.training.config import parse_memory_limit
    from ds_hydra.training.memory_estimate import free_memory
    from ds_hydra.training.memory_preflight import ERROR_MARGIN

    if cfg.trainer.get("memory_limit", None) is not None:
        return parse_memory_limit(cfg.trainer.memory_limit), f"trainer.memory_limit={cfg.trainer.memory_limit}"
    device = resolve_device(cfg.trainer.device)
    on_host = device.type == "cpu"
    free, source = free_memory(device, launch_env.local_world_size() if on_host else 1)
    if free is None:
        raise UserError(f"trainer.memory_limit: the free memory of {device} is {source}; set trainer.memory_limit=<bytes or size, e.g. 16GiB>")
    return int(free * (1 - ERROR_MARGIN)), f"{format_bytes(free)} {source} less {ERROR_MARGIN:.0%}"


def _fit(cfg) -> List[str]:
    from ds_hydra.activation_checkpointing.config import format_bytes

    limit, source = memory_limit(cfg)
    lines = []
    batch_auto = cfg.trainer.batch_size == AUTO
    ckpt_auto = cfg.ckpt.get("memory_budget", None) == AUTO
    if batch_auto:
        world = launch_env.world_size()
        total = int(cfg.trainer.global_batch_size)
        if total % world:
            raise UserError(f"trainer.global_batch_size={total}: not divisible by the {world} processes; make it a multiple of {world}")
        per_rank = total // world
        under = PER_BLOCK if ckpt_auto else None
        largest = _largest_batch(cfg, per_rank, limit, under)
        if largest == 0:
            needs = _estimate(cfg, 1, per_rank, under)
            raise UserError(
                f"trainer.batch_size=auto: not even one sequence per micro-batch fits {format_bytes(limit)} ({source}): one "
                f"needs {needs.describe()}; {needs.dominant()} dominate: {needs.advice()}"
            )
        batch = max(d for d in range(1, largest + 1) if per_rank % d == 0)
        _set(cfg, {"trainer.batch_size": batch, "trainer.grad_accum_steps": per_rank // batch})
        divisor = "" if batch == largest else f" (the largest that fits is {largest}; {batch} divides {per_rank})"
        lines.append(
            f"trainer.batch_size=auto: micro-batch {batch} x grad_accum_steps {per_rank // batch} x world size {world} = "
            f"global batch {total}{divisor}; its step needs {format_bytes(_estimate(cfg, batch, per_rank // batch, under).total)} "
            f"of {format_bytes(limit)} ({source})"
        )
    if ckpt_auto:
        lines.append(_fit_budget(cfg, limit, source))
    return lines


def _largest_batch(cfg, most: int, limit: int, ckpt: Optional[dict]) -> int:
    """The largest micro-batch in 1..most whose step fits ``limit`` (0: none), by binary search."""
    low, high = 0, most  # fits(low) (0 trivially), the answer is in low..high
    while low < high:
        mid = (low + high + 1) // 2
        if _estimate(cfg, mid, max(1, most // mid), ckpt).total <= limit:
            low = mid
        else:
            high = mid - 1
    return low


def _fit_budget(cfg, limit: int, source: str) -> str:
    from ds_hydra.activation_checkpointing.config import format_bytes

    batch, accum = int(cfg.trainer.batch_size), int(cfg.trainer.grad_accum_steps)
    plain = _estimate(cfg, batch, accum, {"memory_budget": None})
    if plain.total <= limit:
        _set(cfg, {"ckpt.memory_budget": None})
        return f"ckpt=auto: no recompute: the step needs {format_bytes(plain.total)} of {format_bytes(limit)} ({source})"
    budget = plain.kept - (plain.total - limit)
    for _ in range(BUDGET_TRIES):
        if budget <= 0:
            break
        try:
            needs = _estimate(cfg, batch, accum, {"memory_budget": budget})
        except UserError:  # not even every block recomputed keeps the saved bytes under this budget
            break
        if needs.total <= limit:
            _set(cfg, {"ckpt.memory_budget": budget})
            return (f"ckpt=auto: ckpt.memory_budget={budget} ({format_bytes(budget)} of saved activations, "
                    f"{format_bytes(plain.kept)} without recompute): the step needs {format_bytes(needs.total)} of "
                    f"{format_bytes(limit)} ({source})")
        budget -= needs.total - limit
    _set(cfg, {"ckpt.memory_budget": None, "ckpt.full": True})
    needs = _estimate(cfg, batch, accum, {})
    fits = "fits" if needs.total <= limit else "still does not fit: the memory preflight decides"
    return f"ckpt=auto: every block recomputed (ckpt.full=true): the step needs {format_bytes(needs.total)} of {format_bytes(limit)} ({source}), {fits}"


def _estimate(cfg, batch: int, accum: int, ckpt: Optional[dict]):
    from ds_hydra.training.memory_estimate import estimate_step_memory
    from ds_hydra.training.memory_preflight import step_spec

    trial = cfg.copy()
    changes = {"trainer.batch_size": batch, "trainer.grad_accum_steps": accum}
    for key, value in (ckpt or {}).items():
        changes[f"ckpt.{key}"] = value
    if trial.ckpt.get("memory_budget", None) == AUTO and "ckpt.memory_budget" not in changes:
        changes["ckpt.memory_budget"] = None
    _set(trial, changes)
    return estimate_step_memory(step_spec(trial))


def _set(cfg, changes: dict) -> None:
    with read_write(cfg), open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, force_add=True)


def _repeat_resumed_choice(cfg) -> Optional[List[str]]:
    """A resumed run takes what it chose when it started (its config_resolved.yaml), whatever is free now."""
    from ds_hydra.training.resume import resume_target
    from ds_hydra.common.run_dir import RESOLVED_CONFIG_FILE

    try:
        run_dir, _ = resume_target(cfg)
    except UserError:
        return None  # the resume checks say what is wrong with it
    path = Path(run_dir) / RESOLVED_CONFIG_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    earlier = OmegaConf.load(path)
    changes, lines = {}, []
    if cfg.trainer.batch_size == AUTO:
        changes.update({"trainer.batch_size": int(earlier.trainer.batch_size), "trainer.grad_accum_steps": int(earlier.trainer.grad_accum_steps)})
        lines.append(f"trainer.batch_size=auto: micro-batch {earlier.trainer.batch_size} x grad_accum_steps "
                     f"{earlier.trainer.grad_accum_steps}, as {run_dir} chose when it started")
    if cfg.ckpt.get("memory_budget", None) == AUTO:
        changes.update({f"ckpt.{key}": value for key, value in OmegaConf.to_container(earlier.ckpt).items()})
        lines.append(f"ckpt=auto: ckpt.memory_budget={earlier.ckpt.get('memory_budget')} ckpt.full={earlier.ckpt.get('full')}, "
                     f"as {run_dir} chose when it started")
    _set(cfg, changes)
    return lines
