"""``task=validate``: every check short of training, in one message, and a report of what would be built.

``python -m ds_hydra task=validate <overrides>`` composes (Hydra), then collects into ONE message the
checks of ds_hydra.validation, every ``_target_`` against the allowlist and its callable's signature,
and the cross-field rules. With none found it builds the model on the meta device (no memory, no init
compute), the optimizer and scheduler over its parameters, and the activation-checkpoint plan, and
prints the optimizer's arguments, the param-group table, the LR over the whole run, the plan and the
memory estimate of one step. Exit 0, or 2 with the list.
"""
from __future__ import annotations

from typing import List

from ds_hydra.errors import ConfigError, UserError
from ds_hydra.instantiate import signature_problems
from ds_hydra.validation import config_problems, cross_field_problems, cross_field_warnings, enum_value, wants_cuda

LR_CURVE_FILE = "lr_schedule.png"
_SPARK = "▁▂▃▄▅▆▇█"
_STEPPED_LR_MAX = 250_000  # schedulers without a closed form are stepped at most this far


def validate_task(cfg) -> dict:
    """The ``validate`` task: raises ConfigError listing every problem, else prints the report."""
    problems = config_problems(cfg) + signature_problems(cfg) + cross_field_problems(cfg)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # the optimizer's signature is in both lists
    report = ValidationReport()
    report.warnings += cross_field_warnings(cfg)
    _dry_build(cfg, report)
    if report.problems:
        raise ConfigError(report.problems)
    print(report.render())
    return report.metrics()


class ValidationReport:
    def __init__(self) -> None:
        self.problems: List[str] = []
        self.warnings: List[str] = []
        self.sections: List[str] = []
        self.values: dict = {}

    def add(self, title: str, body: str) -> None:
        self.sections.append(f"== {title}\n{body.rstrip()}")

    def render(self) -> str:
        lines = ["config OK: no problems found"] + [f"warning: {w}" for w in self.warnings]
        return "\n\n".join(["\n".join(lines), *self.sections]) + "\n"

    def metrics(self) -> dict:
        return {"problems": 0, "warnings": len(self.warnings), **self.values}


def _dry_build(cfg, report: ValidationReport) -> None:
    """Build model (meta device), optimizer, scheduler and checkpoint plan; add sections or problems."""
    import torch
    from omegaconf import OmegaConf

    from ds_hydra.training.slices import vocab_size_of
    from ds_hydra.models.build import build_model

    try:
        vocab_size, vocab_source = vocab_size_of(cfg)  # a character corpus is built (once per process) to learn it
        with torch.device("meta"):
            model = build_model(cfg.model, vocab_size, cfg.get("adapter"))
    except Exception as exc:
        report.problems.append(f"model: building {cfg.model._target_} failed: {_one_line(exc)}")
        return
    try:
        from ds_hydra.training.seq_vocab import check_data_fits

        check_data_fits(cfg)  # the splits at the run's sequence length (what training refuses before step 1)
    except UserError as exc:
        report.problems.append(str(exc))
    n_params = sum(p.numel() for p in model.parameters())
    report.values["parameters"] = n_params
    report.add(
        "model (built on the meta device: shapes only)",
        f"{cfg.model._target_} -> {type(model).__name__}: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB in fp32), "
        f"vocab {vocab_size} ({vocab_source})",
    )
    if not _fit_section(cfg, report):
        return
    optimizer = _param_group_section(cfg, model, report)
    if optimizer is not None:
        _lr_section(cfg, optimizer, report)
    _checkpoint_plan_section(cfg, model, report, OmegaConf.to_container(cfg.ckpt, resolve=True))
    _memory_section(cfg, report)


def _param_group_section(cfg, model, report: ValidationReport):
    import logging

    import torch

    from ds_hydra.optim.build import build_optimizer, param_group_table

    quiet = logging.getLogger("ds_hydra.optim.build")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the builder logs the same table; the report prints it once
    try:
        optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"), param_groups=cfg.get("param_groups"))
    except Exception as exc:
        report.problems.append(f"optimizer: building {cfg.optimizer._target_} failed: {_one_line(exc)}")
        return None
    finally:
        quiet.setLevel(level)
    report.values["param_groups"] = len(optimizer.param_groups)
    arguments = ", ".join(f"{k}={v}" for k, v in optimizer.defaults.items())  # the config's and the class's defaults
    report.add(f"optimizer {cfg.optimizer._target_}", f"{arguments}\n\n{param_group_table(optimizer)}")
    return optimizer


def lr_curve(scheduler, optimizer, steps: int):
    """The lr of every param group at optimizer steps 0..steps-1 (what each step uses), and whether
    the curve stops early (a scheduler with no closed form, stepped at most _STEPPED_LR_MAX times)."""
    import warnings

    factor = getattr(scheduler, "lr_factor", None)
    base = list(getattr(scheduler, "base_lrs", []))
    if callable(factor) and base:
        return [[b * factor(t) for b in base] for t in range(steps)], False
    limit = min(steps, _STEPPED_LR_MAX)
    curve = [[float(g["lr"]) for g in optimizer.param_groups]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(1, limit):
            scheduler.step()
            curve.append([float(g["lr"]) for g in optimizer.param_groups])
    return curve, limit < steps


def sparkline(values: List[float], width: int = 60) -> str:
    if not values:
        return ""
    n = len(values)
    picks = [values[min(n - 1, int(i * n / width))] for i in range(min(width, n))]
    low, high = min(values), max(values)
    if high - low <= 1e-12 * max(abs(high), 1e-30):
        return _SPARK[-1] * len(picks)
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - low) / (high - low) * len(_SPARK)))] for v in picks)


def step_axis(width: int, last: int) -> str:
    """The line under a sparkline of ``width`` bars: ``step 0`` under the first bar, ``step <last>``
    ending under the last; a curve too short for both labels gets them side by side."""
    left, right = " step 0", f"step {last}"
    if width + 1 >= len(left) + 1 + len(right):
        return left + right.rjust(width + 1 - len(left))
    return f"{left} .. {right}" if last > 0 else left


def _lr_section(cfg, optimizer, report: ValidationReport) -> None:
    from ds_hydra.optim.build import build_scheduler

    steps = int(cfg.trainer.max_steps)
    try:
        scheduler = build_scheduler(cfg.scheduler, optimizer)
        curve, truncated = lr_curve(scheduler, optimizer, steps)
    except Exception as exc:
        report.problems.append(f"scheduler: building {cfg.scheduler._target_} failed: {_one_line(exc)}")
        return
    first = [row[0] for row in curve]
    peak = max(range(len(first)), key=first.__getitem__)
    name = optimizer.param_groups[0].get("name", "0")
    spark = sparkline(first)
    body = [
        f"{cfg.scheduler._target_} over {steps} steps (group {name}): "
        f"step 0 {first[0]:.3g}, peak {first[peak]:.3g} at step {peak}, last {first[-1]:.3g} at step {len(first) - 1}",
        f"lr from {min(first):.3g} (lowest bar) to {max(first):.3g} (highest bar), one bar per {max(1, steps // len(spark))} steps:",
        f"|{spark}|",
        step_axis(len(spark), len(first) - 1),
    ]
    if truncated:
        body.append(f"(stepped to step {len(first)} only: this scheduler has no closed form)")
    path = _plot_lr(curve, [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)], str(cfg.scheduler._target_))
    if path is not None:
        body.append(f"plot: {path}")
        report.values["lr_png"] = str(path)
    report.values["lr_peak"] = first[peak]
    report.values["lr_last"] = first[-1]
    report.add("learning rate", "\n".join(body))


def _plot_lr(curve, names, title: str):
    from pathlib import Path

    from ds_hydra.plotting import new_figure, save_figure
    from ds_hydra.common.run_dir import resolve_run_dir

    try:
        path = Path(resolve_run_dir()) / LR_CURVE_FILE
        fig, ax = new_figure(7, 3.5)
        for i, name in enumerate(names):
            ax.plot(range(len(curve)), [row[i] for row in curve], label=f"group {name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(title.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, path)
        return path
    except Exception:  # the text curve above is the report; the picture is a convenience
        return None


def _checkpoint_plan_section(cfg, model, report: ValidationReport, ckpt: dict) -> None:
    """The plan of the ``ckpt`` policy on the meta model: which blocks recompute in backward."""
    from ds_hydra.activation_checkpointing import checkpoint_activations, find_blocks
    from ds_hydra.activation_checkpointing.policies import describe_regions

    if ckpt.get("memory_budget") is not None:  # a budget is planned on a batch of the run's shape, which meta tensors lack
        report.add("activation checkpointing", f"ckpt.memory_budget={ckpt['memory_budget']}: the recomputed blocks are planned "
                   f"on a batch of the run's shape when it starts (the memory section below estimates that plan)")
        return
    try:
        path, blocks = find_blocks(model, ckpt.get("blocks"))
        n = len(blocks)
        checkpoint_activations(model, **ckpt)
    except Exception as exc:
        report.problems.append(f"ckpt: {_one_line(exc)}")
        return
    regions = _regions(model)
    marks = _recompute_marks(regions, n)
    recomputed = sum(m != "." for m in marks)
    report.values["checkpointed_blocks"] = recomputed
    lines = [f"{path}: {n} blocks, {recomputed} recomputed in backward (R: recomputed, S: selective, .: kept)"]
    lines.append("block  " + " ".join(f"{i:>2}" for i in range(n)))
    lines.append("plan   " + " ".join(f"{m:>2}" for m in marks))
    if regions:
        lines.append(describe_regions(regions, n))
    if ckpt.get("offload"):
        lines.append("saved activations offloaded to host memory (CUDA only)")
    report.add("activation checkpointing", "\n".join(lines))


def _fit_section(cfg, report: ValidationReport) -> bool:
    """trainer.batch_size=auto and ckpt=auto, resolved as a run would resolve them (False: they cannot be)."""
    from ds_hydra.training.memory_fit import fit_to_memory, wants_fit

    if not wants_fit(cfg):
        return True
    try:
        lines = fit_to_memory(cfg)
    except Exception as exc:
        report.problems.append(str(exc) if isinstance(exc, UserError) else f"memory fit: {_one_line(exc)}")
        return False
    report.values["batch_size"] = int(cfg.trainer.batch_size)
    report.add("memory fit (trainer.batch_size=auto, ckpt=auto)", "\n".join(lines))
    return True


def _memory_section(cfg, report: ValidationReport) -> None:
    """The memory preflight's estimate of one training step against the device's free memory."""
    import logging

    from ds_hydra.training.memory_preflight import judge_step_memory

    try:
        verdict = judge_step_memory(cfg)
    except Exception as exc:
        report.warnings.append(f"memory: could not estimate one training step ({_one_line(exc)})")
        return
    report.values["step_memory_bytes"] = verdict.estimate.total
    report.add("memory (one training step, estimated on fake tensors)", f"{verdict.line}\n{verdict.estimate.breakdown()}")
    refuse = enum_value(cfg.run.memory_check) == "refuse"
    if verdict.level >= logging.ERROR and refuse:
        report.problems.append(f"{verdict.line}; or run.memory_check=warn to try anyway")
    elif verdict.level >= logging.WARNING:
        report.warnings.append(verdict.line)


def _regions(model) -> list:
    """The checkpointed regions the policy applied (none: the model is left as it was)."""
    from ds_hydra.activation_checkpointing import checkpointing_state

    state = checkpointing_state(model)
    return list(state.regions or []) if state is not None else []


def _recompute_marks(regions, n: int) -> List[str]:
    """R (recomputed), S (selective) or . (kept) per block."""
    marks = ["."] * n
    for region in regions:
        for i in range(region.start, region.end):
            marks[i] = "S" if region.selective else "R"
    return marks


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
