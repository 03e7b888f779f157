"""trainer.profile: a Chrome trace of the scheduled steps, the top operators, a memory timeline; the run's
own numbers (losses, checkpoint) are the same as without profiling."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose

PROFILED = ["trainer.profile.enabled=true", "trainer.profile.wait=1", "trainer.profile.warmup=1", "trainer.profile.active=2"]


def run(tmp_path: Path, name: str, *overrides):
    from ds_hydra.training.trainer import train

    run_dir = tmp_path / name
    final = train(compose([*TINY, "trainer.eval_interval=0", "trainer.log_interval=1", *overrides]), run_dir=run_dir)
    return run_dir, final


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_scheduled_steps_and_changes_no_number(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ds_hydra")
    profiled, final = run(tmp_path, "profiled", *PROFILED, "trainer.profile.memory_timeline=true")
    plain, plain_final = run(tmp_path, "plain")

    # steps 1 (wait) and 2 (warmup) are not recorded; steps 3 and 4 are, as the profiler's steps #2 and #3
    trace = profiled / "profile" / "trace_rank0_step4.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in events)  # the model's matmuls
    assert any("Input Dims" in (e.get("args") or {}) for e in events)  # shapes recorded
    assert any(e.get("name") == "[memory]" for e in events)  # memory events recorded
    assert (profiled / "profile" / "memory_timeline_rank0_step4.html").stat().st_size > 1000
    assert "top operators by self time" in caplog.text and "Self CPU" in caplog.text
    assert sorted(p.name for p in (profiled / "profile").iterdir()) == ["memory_timeline_rank0_step4.html", "trace_rank0_step4.json"]

    # the run itself: same losses step by step, same final weights
    def losses(run_dir):
        return [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert losses(profiled) == losses(plain) and len(losses(plain)) >= 6
    assert final["val_loss"] == plain_final["val_loss"]
    from ds_hydra.training.state import latest_checkpoint

    a = torch.load(latest_checkpoint(profiled), weights_only=True)["model"]
    b = torch.load(latest_checkpoint(plain), weights_only=True)["model"]
    assert latest_checkpoint(profiled).name == latest_checkpoint(plain).name
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "profile").exists()


def test_profile_repeats_windows_without_a_timeline(tmp_path):
    profiled, _ = run(tmp_path, "profiled", "trainer.max_steps=4", *PROFILED[:3], "trainer.profile.active=1",
                      "trainer.profile.repeat=2", "trainer.profile.memory_timeline=false")
    # windows of wait 1, warmup 1, active 1: steps 3 and 6 would be recorded; the run ends at 4, in the second warm-up
    names = sorted(p.name for p in (profiled / "profile").iterdir())
    assert names == ["trace_rank0_step3.json"]
    events = json.loads((profiled / "profile" / names[0]).read_text())["traceEvents"]
    assert {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")} == {"ProfilerStep#2"}


def test_profile_settings_are_checked():
    from ds_hydra.validation import config_problems

    problems = config_problems(compose(["trainer.profile.active=0", "trainer.profile.wait=-1"]))
    assert "trainer.profile.wait=-1: must be >= 0" in problems
    assert "trainer.profile.active=0: must be >= 1" in problems


def test_out_of_memory_in_a_step_is_one_line():
    from ds_hydra.errors import UserError
    from ds_hydra.training.profiling import StepProfiler

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    cfg = compose([]).trainer.profile
    with pytest.raises(UserError, match=r"^step 4 ran out of CPU memory \(CUDA out of memory. Tried to allocate") as error:
        with StepProfiler(cfg, Path("/nonexistent"), 0, torch.device("cpu"), start_step=3):
            raise oom("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    assert "\n" not in str(error.value) and "trainer.batch_size" in str(error.value)
