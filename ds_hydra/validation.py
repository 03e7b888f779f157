"""Checks of a composed config that types cannot express; every problem is collected, then raised once."""
from __future__ import annotations

from typing import List

from ds_hydra.activation_checkpointing.config import validate_ckpt
from ds_hydra.data.config import validate_data
from ds_hydra.data.prepare_config import validate_prepare
from ds_hydra.data.tokenizer_config import validate_tokenizer
from ds_hydra.engine.config import validate_engine
from ds_hydra.errors import ConfigError
from ds_hydra.inference.config import validate_inference
from ds_hydra.models.config import configured_blocks, validate_model
from ds_hydra.optim.config import validate_optimizer, validate_param_groups, validate_scheduler
from ds_hydra.tracking.config import validate_logger
from ds_hydra.training.config import validate_run, validate_trainer


def config_problems(cfg) -> List[str]:
    """Every range and cross-field problem of ``cfg``, one message each, naming the key."""
    problems: List[str] = []
    problems += validate_model(cfg.model)
    problems += validate_data(cfg.data)
    if "tokenizer" in cfg:
        problems += validate_tokenizer(cfg.tokenizer)
    if cfg.task.value == "prepare":
        problems += validate_prepare(cfg.prepare)
    problems += validate_trainer(cfg.trainer)
    problems += validate_run(cfg.run) if "run" in cfg else []
    problems += validate_optimizer(cfg.optimizer)
    problems += validate_param_groups(cfg.param_groups)
    if cfg.trainer.max_steps >= 1:  # else schedule lengths interpolated from it would only echo that problem
        problems += validate_scheduler(cfg.scheduler, max_steps=cfg.trainer.max_steps)
    n_blocks = configured_blocks(cfg.model)
    problems += validate_ckpt(cfg.ckpt, n_blocks=n_blocks)
    problems += validate_inference(cfg.inference, task=cfg.task.value)
    problems += validate_engine(cfg.engine, cfg.trainer, task=cfg.task.value, ckpt=cfg.ckpt, n_blocks=n_blocks)
    problems += validate_logger(cfg.logger, task=cfg.task.value)
    return problems


def validate_config(cfg) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)


# -- task=validate: every check short of training, nothing heavy built -----------------------------------
# ``python -m ds_hydra task=validate <overrides>`` composes (Hydra), then collects into ONE message:
# the group checks above, every ``_target_`` against the allowlist and its callable's signature, and
# the cross-field rules below. With none found it builds the model on the meta device (no memory, no
# init compute), the optimizer and scheduler over its parameters, and the activation-checkpoint plan,
# and prints the param-group table, the LR over the whole run and the plan. Exit 0, or 2 with the list.

_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
LR_CURVE_FILE = "lr_schedule.png"
_SPARK = "▁▂▃▄▅▆▇█"
_STEPPED_LR_MAX = 250_000  # schedulers without a closed form are stepped at most this far


def validate_task(cfg) -> dict:
    """The ``validate`` task: raises ConfigError listing every problem, else prints the report."""
    problems = config_problems(cfg) + target_signature_problems(cfg)
    problems += cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems)
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


def target_signature_problems(cfg) -> List[str]:
    """Every ``_target_`` at any depth: allowed, importable, and called with arguments it takes.

    Unknown arguments are named with a did-you-mean; missing required ones too, except on
    ``_partial_`` nodes (the caller supplies the rest: parameters, the optimizer). Optimizer keys that
    are null or false and absent from this torch's signature are not problems: the optimizer builder
    drops them (one schema serves several torch versions).
    """
    import inspect

    from omegaconf import OmegaConf

    from ds_hydra.instantiate import allowed_prefixes, iter_targets, locate_target, target_problems

    problems = target_problems(cfg, allowed_prefixes(cfg))
    if problems:  # refused or unimportable targets: their signatures cannot be checked
        return problems
    for path, target in iter_targets(cfg):
        node = OmegaConf.select(cfg, path) if path else cfg
        try:
            signature = inspect.signature(locate_target(target))
        except (TypeError, ValueError):  # some builtins have no signature to check against
            continue
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        keys = [k for k in node.keys() if k not in _HYDRA_KEYS]
        where = f"{path}." if path else ""
        if not takes_any:
            lenient = target.startswith("torch.optim.") and path == "optimizer"
            for key in keys:
                if key in params or (lenient and node.get(key) in (None, False)):
                    continue
                hint = _did_you_mean(str(key), named)
                problems.append(f"{where}{key}: {target} has no argument '{key}'{hint}; it takes: {', '.join(named)}")
        if not node.get("_partial_", False):
            n_args = len(node.get("_args_", None) or [])
            positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            supplied = set(keys) | set(positional[:n_args]) | set(_runtime_arguments(path))
            for name, p in params.items():
                required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                if required and name not in supplied:
                    problems.append(f"{where}{name}: missing; {target} needs it (set {where}{name}=...)")
    return problems


def _runtime_arguments(path: str) -> List[str]:
    """Arguments ds_hydra passes itself when it instantiates the node at ``path``."""
    return {"model": ["vocab_size"]}.get(path, [])


def _did_you_mean(word: str, options: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _enum_value(value) -> str:
    return str(getattr(value, "value", value))


def _wants_cuda(cfg) -> bool:
    """Whether the run's device is CUDA (``auto`` counts as CUDA only where CUDA is present)."""
    device = str(cfg.trainer.device)
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def cross_field_problems(cfg) -> List[str]:
    """Rules between groups that no single group's validator can see."""
    import torch

    problems: List[str] = []
    device = str(cfg.trainer.device)
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        problems.append(f"trainer.device={device}: CUDA is not available on this machine (use auto or cpu)")
    on_cuda = _wants_cuda(cfg) and cuda
    runs_on = f"trainer.device={device} runs on the CPU" if cuda or not device.startswith("cuda") else "this machine has no CUDA"
    if _enum_value(cfg.trainer.get("precision", "auto")) == "fp16" and not on_cuda:
        problems.append(f"trainer.precision=fp16: needs a CUDA device ({runs_on}); use fp32 or bf16")
    engine = cfg.get("engine", None) or {}
    for key in ("offload_optimizer", "offload_param"):
        value = _enum_value(engine.get(key, "none"))
        if value not in ("none", "None") and not on_cuda:
            problems.append(
                f"engine.{key}={value}: offloading moves state off a GPU, so it needs CUDA "
                f"({runs_on}); set engine.{key}=none"
            )
    if engine.get("cpu_offload", False) and not on_cuda:
        problems.append(
            f"engine.cpu_offload=true: offloading moves state off a GPU, so it needs CUDA "
            f"({runs_on}); set engine.cpu_offload=false"
        )
    return problems


def cross_field_warnings(cfg) -> List[str]:
    """Legal but probably unintended combinations (printed; they do not fail validation)."""
    warnings: List[str] = []
    max_steps = int(cfg.trainer.max_steps)
    for key in ("total_steps", "total_num_steps"):
        total = cfg.scheduler.get(key, None)
        if isinstance(total, int) and total > max_steps:
            warnings.append(
                f"scheduler.{key}={total} > trainer.max_steps={max_steps}: the run stops at "
                f"{100 * max_steps / total:.0f}% of the schedule, above its final lr"
            )
        elif isinstance(total, int) and 0 < total < max_steps:
            warnings.append(
                f"scheduler.{key}={total} < trainer.max_steps={max_steps}: the last {max_steps - total} steps "
                f"run at the schedule's final lr"
            )
    if cfg.ckpt.get("offload", False) and not _wants_cuda(cfg):
        warnings.append("ckpt.offload=true: moves saved activations to host memory on CUDA only; on the CPU it does nothing")
    return warnings


def _dry_build(cfg, report: ValidationReport) -> None:
    """Build model (meta device), optimizer, scheduler and checkpoint plan; add sections or problems."""
    import torch
    from omegaconf import OmegaConf

    from ds_hydra.data.base import vocab_size_of
    from ds_hydra.models.build import build_model

    try:
        vocab_size, vocab_source = vocab_size_of(cfg)  # a character corpus is built (once per process) to learn it
        with torch.device("meta"):
            model = build_model(cfg.model, vocab_size)
    except Exception as exc:
        report.problems.append(f"model: building {cfg.model._target_} failed: {_one_line(exc)}")
        return
    n_params = sum(p.numel() for p in model.parameters())
    report.values["parameters"] = n_params
    report.add(
        "model (built on the meta device: shapes only)",
        f"{cfg.model._target_} -> {type(model).__name__}: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB in fp32), "
        f"vocab {vocab_size} ({vocab_source})",
    )
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
    report.add(f"param groups ({cfg.optimizer._target_})", param_group_table(optimizer))
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
        f" step 0{'step ' + str(len(first) - 1):>{len(spark) - 6}}",
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

    from ds_hydra.training.run_dir import resolve_run_dir

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(resolve_run_dir()) / LR_CURVE_FILE
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for i, name in enumerate(names):
            ax.plot(range(len(curve)), [row[i] for row in curve], label=f"group {name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(title.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except Exception:  # the text curve above is the report; the picture is a convenience
        return None


def _checkpoint_plan_section(cfg, model, report: ValidationReport, ckpt: dict) -> None:
    """The plan of the ``ckpt`` policy on the meta model: which blocks recompute in backward."""
    try:
        from ds_hydra.activation_checkpointing import checkpoint_activations, find_blocks
    except ImportError as exc:  # pragma: no cover - the package always has these
        report.add("activation checkpointing", f"plan unavailable: {exc}")
        return
    try:
        path, blocks = find_blocks(model, ckpt.get("blocks"))
        n = len(blocks)
        checkpoint_activations(model, **ckpt)
    except Exception as exc:
        report.problems.append(f"ckpt: {_one_line(exc)}")
        return
    marks = _recompute_marks(model, n)
    recomputed = sum(m != "." for m in marks)
    report.values["checkpointed_blocks"] = recomputed
    lines = [f"{path}: {n} blocks, {recomputed} recomputed in backward (R: recomputed, S: selective, .: kept)"]
    lines.append("block  " + " ".join(f"{i:>2}" for i in range(n)))
    lines.append("plan   " + " ".join(f"{m:>2}" for m in marks))
    regions = _regions(model)
    if regions:
        try:
            from ds_hydra.activation_checkpointing.planner import describe_regions

            lines.append(describe_regions(regions, n))
        except ImportError:
            pass
    if ckpt.get("offload"):
        lines.append("saved activations offloaded to host memory (CUDA only)")
    report.add("activation checkpointing", "\n".join(lines))


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
    report.add("memory (one training step, estimated on fake tensors)", verdict.line)
    refuse = _enum_value(cfg.run.memory_check) == "refuse"
    if verdict.level >= logging.ERROR and refuse:
        report.problems.append(f"{verdict.line}; or run.memory_check=warn to try anyway")
    elif verdict.level >= logging.WARNING:
        report.warnings.append(verdict.line)


def _regions(model):
    try:
        from ds_hydra.activation_checkpointing import checkpointing_state
    except ImportError:
        return None
    state = checkpointing_state(model)
    return list(getattr(state, "regions", None) or []) if state is not None else None


def _recompute_marks(model, n: int) -> List[str]:
    """R/S/. per block, from the checkpointing state's regions, else from wrapper modules' names."""
    regions = _regions(model)
    marks = ["."] * n
    if regions is not None:
        for region in regions:
            for i in range(region.start, region.end):
                marks[i] = "S" if getattr(region, "selective", False) else "R"
        return marks
    from ds_hydra.activation_checkpointing import find_blocks

    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):  # wrappers: a checkpoint wrapper class, or a block swapped out
        if "checkpoint" in type(block).__name__.lower() or type(block).__name__ == "Identity":
            marks[i] = "R"
    return marks


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
