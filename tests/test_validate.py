"""task=validate: every problem in one message (exit 2), else the dry-run report (exit 0)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import cli_in_process, compose
from ds_hydra.errors import ConfigError
from ds_hydra.instantiate import signature_problems
from ds_hydra.validate_task import lr_curve, sparkline, validate_task

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the LR plot goes to the run dir, which defaults to ./outputs/...


def gpt_params(V: int, T: int, L: int, d: int) -> int:
    """GPT without biases, tied embeddings: token + position tables, 12 d^2 + 2 LayerNorms per block, final norm."""
    return V * d + T * d + L * (12 * d * d + 2 * d) + d


@pytest.mark.skipif(not NO_CUDA, reason="the planted device errors assume a machine without CUDA")
def test_planted_errors_are_all_reported_in_one_message():
    cfg = compose([
        "model=gpt_tiny",
        "ckpt.segments=9",                                   # more segments than the 4 blocks
        "optimizer.lr=-1",                                   # a group range check
        "data._target_=ds_hydra.data.corpus.SyntheticTokens",  # CharCorpus keys for another callable
        "scheduler._target_=ds_hydra.deepspeed.lr_schedules.WarmupDecayLR",  # cosine keys, DeepSpeed names
        "trainer.device=cuda",                               # no CUDA here
        "engine=deepspeed", "engine.offload_optimizer=cpu",  # offload needs CUDA
        "allowed_targets=[]",
        "task=validate",
    ])
    with pytest.raises(ConfigError) as err:
        validate_task(cfg)
    problems = err.value.problems
    expected = [
        "optimizer.lr=-1.0: must be > 0",
        "ckpt.segments=9: must be 0..4",
        "data.path: ds_hydra.data.corpus.SyntheticTokens has no argument 'path'",
        "scheduler.warmup_steps: ds_hydra.deepspeed.lr_schedules.WarmupDecayLR has no argument 'warmup_steps' (did you mean 'warmup_num_steps'?)",
        "scheduler.total_steps: ds_hydra.deepspeed.lr_schedules.WarmupDecayLR has no argument 'total_steps' (did you mean 'total_num_steps'?)",
        "trainer.device=cuda: CUDA is not available",
        "engine.offload_optimizer=cpu: offloading moves state off a GPU, so it needs CUDA",
    ]
    for text in expected:
        assert sum(text in p for p in problems) == 1, (text, problems)
    assert str(err.value).startswith(f"{len(problems)} config problems:")


# StepLR's arguments as this torch has them (torch < 2.7 also takes the deprecated ``verbose``)
STEP_LR_ARGS = ", ".join(inspect.signature(torch.optim.lr_scheduler.StepLR).parameters)


def test_signature_check_names_unknown_and_missing_arguments():
    cfg = OmegaConf.create({
        "allowed_targets": [],
        "sched": {"_target_": "ds_hydra.optim.schedules.WarmupCosineDecay", "warmup_step": 5},
        "later": {"_target_": "ds_hydra.optim.schedules.WarmupCosineDecay", "_partial_": True, "warmup_steps": 5},
        "nested": {"inner": [{"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 3, "gama": 0.5}]},
        "evil": {"_target_": "ds_hydra.cli.os.system", "command": "true"},
    })
    problems = signature_problems(cfg)
    assert len(problems) == 1 and "evil._target_=ds_hydra.cli.os.system: not an allowed target" in problems[0]  # refused first
    del cfg["evil"]
    problems = signature_problems(cfg)
    assert sorted(problems) == sorted([
        "sched.warmup_step: ds_hydra.optim.schedules.WarmupCosineDecay has no argument 'warmup_step' (did you mean "
        "'warmup_steps'?); it takes: optimizer, warmup_steps, total_steps, min_lr_ratio, last_epoch",
        "sched.optimizer: missing; ds_hydra.optim.schedules.WarmupCosineDecay needs it (set sched.optimizer=...)",
        "nested.inner[0].gama: torch.optim.lr_scheduler.StepLR has no argument 'gama' (did you mean 'gamma'?); "
        f"it takes: {STEP_LR_ARGS}",
        "nested.inner[0].optimizer: missing; torch.optim.lr_scheduler.StepLR needs it (set nested.inner[0].optimizer=...)",
    ])  # the _partial_ node may leave its optimizer to the caller


def test_valid_config_prints_param_groups_lr_curve_and_plan(capsys, tmp_path):
    cfg = compose(["ckpt.segments=3", "trainer.max_steps=400", "task=validate"])
    metrics = validate_task(cfg)
    out = capsys.readouterr().out
    assert out.startswith("config OK")
    assert metrics["parameters"] == gpt_params(V=65, T=64, L=4, d=128) == 804_096
    # param groups: matrices decay, the 9 norm gains (2 per block + final) do not
    assert any(line.split()[:3] == ["no_decay", "9", "1,152"] for line in out.splitlines())
    # cosine with 5% warmup: lr(t) = peak (t+1)/(W+1) for t < W, then cosine to 10% at the end
    warmup, peak = 20, 1e-3
    assert metrics["lr_peak"] == pytest.approx(peak)
    assert metrics["lr_last"] == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 379 / 380))))
    assert f"peak 0.001 at step {warmup}" in out
    assert (tmp_path / "outputs").exists() and metrics["lr_png"].endswith("lr_schedule.png")
    # 4 blocks in 3 segments, the last one kept: blocks 0-1 and 2 recomputed
    assert "plan    R  R  R  ." in out and metrics["checkpointed_blocks"] == 3


def test_lr_curve_matches_stepping_the_scheduler():
    from ds_hydra.optim.schedules import WarmupCosineDecay

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        return opt, WarmupCosineDecay(opt, warmup_steps=3, total_steps=10, min_lr_ratio=0.2)

    opt, sched = fresh()
    closed, truncated = lr_curve(sched, opt, 12)
    stepped = []
    opt, sched = fresh()
    for _ in range(12):
        stepped.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert not truncated and [row[0] for row in closed] == pytest.approx(stepped)


def test_sparkline_spans_lowest_to_highest_bar():
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline([2.0] * 5) == "█████"


def test_large_model_validates_on_the_meta_device():
    """GPT-2 small (124M) is counted from its shapes; nothing is allocated or initialised."""
    metrics = validate_task(compose(["model=gpt2_124m", "trainer.max_steps=50", "task=validate"]))
    assert metrics["parameters"] == gpt_params(V=50304, T=1024, L=12, d=768) == 124_373_760


def test_validate_from_the_command_line(tmp_path):
    """task=validate through the CLI: its report, exit 0, nothing trained (its refusals: test_bad_input.py)."""
    ok = cli_in_process(["task=validate", "model=gpt_tiny", "trainer.max_steps=100", f"hydra.run.dir={tmp_path / 'ok'}"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "== learning rate" in ok.stdout and (tmp_path / "ok" / "lr_schedule.png").is_file()
    assert not (tmp_path / "ok" / "checkpoints").exists()  # nothing trained, nothing saved


@pytest.mark.parametrize("max_steps", [1, 3, 13, 14])
def test_short_runs_draw_their_lr_curve(capsys, max_steps):
    """A run shorter than the axis labels still gets its curve: one bar per step, both ends labelled."""
    metrics = validate_task(compose(["model=gpt_tiny", f"trainer.max_steps={max_steps}", "task=validate"]))
    lines = capsys.readouterr().out.splitlines()
    bars = next(i for i, line in enumerate(lines) if line.startswith("|") and line.endswith("|"))
    assert len(lines[bars]) == max_steps + 2 and metrics["problems"] == 0
    axis = lines[bars + 1]
    assert axis.startswith(" step 0") and (max_steps == 1 or axis.endswith(f"step {max_steps - 1}"))


def test_step_axis_ends_under_the_last_bar():
    from ds_hydra.validate_task import step_axis

    assert step_axis(60, 399) == " step 0" + " " * 46 + "step 399"  # width + 1: under "|" + 60 bars
    assert step_axis(3, 2) == " step 0 .. step 2"
    assert step_axis(1, 0) == " step 0"
