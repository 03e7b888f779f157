"""engine=deepspeed: the JSON ds_hydra derives is what DeepSpeed accepts, and DeepSpeed's engine trains
the same model as ds_hydra's own loop (CPU accelerator, a one-process gloo group).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ENGINE_RUN, ENGINE_STEPS, compose, run_cli

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
ds_config_module = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed")

STEPS = ENGINE_STEPS
RUN = [*ENGINE_RUN, "trainer.grad_accum_steps=2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class DataParallel:
    """The one method DeepSpeedConfig asks an ``mpu`` for: the world size the file is checked against."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def export(tmp_path: Path, *overrides: str) -> dict:
    from ds_hydra.cli import dispatch

    path = tmp_path / "ds.json"
    metrics = dispatch(compose([*RUN, "task=export_deepspeed", "engine=deepspeed", f"engine.config_file={path}", *overrides]))
    assert metrics["deepspeed_config"] == str(path)
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "overrides, world, expect",
    [
        ([], 1, {"stage": 2, "train_batch_size": 8, "bf16": False}),
        (["engine.zero_stage=0", "trainer.grad_clip=0"], 1, {"stage": 0, "train_batch_size": 8, "clip": 0.0}),
        (["engine.zero_stage=1", "trainer.precision=bf16", "trainer.batch_size=3"], 1, {"stage": 1, "train_batch_size": 6, "bf16": True}),
        (["engine.zero_stage=3", "engine.offload_param=cpu", "engine.offload_optimizer=cpu", "engine.export_world_size=8"], 8,
         {"stage": 3, "train_batch_size": 64, "offload": "cpu"}),
        (["engine.zero_stage=2", "engine.offload_optimizer=nvme", "engine.nvme_path=/local_nvme", "trainer.device=cuda",
          "trainer.precision=fp16", "trainer.grad_accum_steps=4", "engine.export_world_size=16"], 16,
         {"stage": 2, "train_batch_size": 256, "fp16": True, "offload": "nvme"}),
    ],
)
def test_exported_json_is_what_deepspeed_accepts(tmp_path, monkeypatch, overrides, world, expect):
    config = export(tmp_path, *overrides)
    # As on rank 0 of a job of `world` ranks (DeepSpeedConfig asks the mpu only once a backend is up).
    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda: 0)
    parsed = ds_config_module.DeepSpeedConfig(config, mpu=DataParallel(world))  # asserts DeepSpeed's batch equation
    cfg = compose([*RUN, "engine=deepspeed", *overrides])
    micro, accum = cfg.trainer.batch_size, cfg.trainer.grad_accum_steps
    assert parsed.train_batch_size == micro * accum * world == expect["train_batch_size"]
    assert parsed.train_micro_batch_size_per_gpu == micro
    assert parsed.gradient_accumulation_steps == accum
    assert parsed.gradient_clipping == expect.get("clip", cfg.trainer.grad_clip)
    assert parsed.zero_optimization_stage == expect["stage"]
    assert parsed.bfloat16_config.enabled == expect.get("bf16", False)
    assert parsed.float16_config.enabled == expect.get("fp16", False)
    assert parsed.steps_per_print == cfg.trainer.log_interval  # the file prints as the run logs
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == cfg.optimizer.lr
    assert parsed.scheduler_name is None  # ds_hydra's cosine schedule has no DeepSpeed type
    from ds_hydra.deepspeed.json_export import deepspeed_config

    assert deepspeed_config(cfg, world, "fp32")["steps_per_print"] > 10**9  # training: DeepSpeed's prints off
    if "offload" in expect:
        assert parsed.zero_config.offload_optimizer.device == expect["offload"]
        assert config["zero_force_ds_cpu_optimizer"] is False  # ds_hydra passes a torch optimizer
    else:
        assert parsed.zero_config.offload_optimizer is None


def test_activation_checkpointing_section_and_extra_keys(tmp_path):
    config = export(
        tmp_path, "ckpt=segments", "ckpt.segments=2",
        "++engine.extra.zero_optimization.stage3_max_live_parameters=12345", "++engine.extra.wall_clock_breakdown=true",
    )
    parsed = ds_config_module.DeepSpeedConfig(config)
    assert parsed.activation_checkpointing_config.number_checkpoints == 2
    assert parsed.activation_checkpointing_config.partition_activations is False
    assert parsed.zero_config.max_live_parameters == 12345
    assert parsed.zero_config.stage == 2  # extra merges into the section; the derived keys stay
    assert parsed.wall_clock_breakdown is True


def test_export_writes_into_the_run_dir_by_default(tmp_path):
    from ds_hydra.deepspeed.json_export import DEEPSPEED_CONFIG_FILE, export_deepspeed

    metrics = export_deepspeed(compose(["engine=deepspeed", *RUN]), run_dir=tmp_path)
    assert metrics == {"deepspeed_config": str(tmp_path / DEEPSPEED_CONFIG_FILE), "train_batch_size": 8, "world_size": 1}


def test_deepspeed_keys_ds_hydra_derives_are_refused_in_extra():
    from ds_hydra.validation import config_problems

    problems = config_problems(compose([
        "engine=deepspeed", "++engine.extra.train_batch_size=64", "++engine.extra.zero_optimization.stage=3",
        "engine.zero_stage=2", "engine.offload_param=cpu", "engine.offload_optimizer=nvme",
    ]))
    assert problems == [
        "engine.offload_param=cpu: needs engine.zero_stage=3 (got 2)",
        "engine.nvme_path: must be set (a folder on a fast local disk) when an offload is nvme",
        "engine.extra.train_batch_size: derived by ds_hydra; set trainer.batch_size, trainer.grad_accum_steps instead",
        "engine.extra.zero_optimization.stage: derived by ds_hydra; set engine.zero_stage instead",
    ]
    assert config_problems(compose(["task=export_deepspeed", "engine=ddp"])) == [
        "task=export_deepspeed: needs engine=deepspeed (it writes that engine's JSON), got engine=ddp"
    ]


def final_checkpoint(run_dir: Path):
    from ds_hydra.training.state import safe_torch_load

    return safe_torch_load(run_dir / "checkpoints" / f"step_{STEPS:07d}.pt")


def assert_same_weights(got, want, atol):
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    proc = run_cli([*RUN, f"hydra.run.dir={run_dir}"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# DeepSpeed on the CPU accelerator JIT-builds its shared-memory collective op (g++) on first use and
# starts slowly: these runs take 20-40 s each.
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_trains_the_same_model_as_the_plain_loop(tmp_path, plain_run, stage):
    """Same optimizer, scheduler, accumulation and clipping: the weights after 4 steps agree with ds_hydra's
    own loop (stage 0 exactly; ZeRO-2's flat fp32 buffers to rounding), and the saved model loads in one
    process without DeepSpeed."""
    from ds_hydra.models.gpt import GPT

    run_dir = tmp_path / "run"
    proc = run_cli([*RUN, "engine=deepspeed", f"engine.zero_stage={stage}", f"hydra.run.dir={run_dir}"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = final_checkpoint(run_dir)
    assert_same_weights(got["model"], final_checkpoint(plain_run)["model"], atol=1e-6)
    assert got["optimizer"] == {"deepspeed_checkpoint": f"step_{STEPS:07d}"}
    assert (run_dir / "checkpoints" / "deepspeed" / f"step_{STEPS:07d}").is_dir()
    model = GPT(vocab_size=65, n_layer=4, n_head=2, n_embd=32, block_size=32)
    model.load_state_dict(got["model"])
    log = (run_dir / "ds_hydra.log").read_text()
    assert f"deepspeed: ZeRO stage {stage}, fp32, train_batch_size 8 (micro-batch 4 x accumulation 2 x 1 ranks)" in log


@pytest.mark.slow
def test_deepspeed_resumes_from_its_own_checkpoint(tmp_path):
    """Resumed from step 2 (DeepSpeed's checkpoint: ZeRO-2 shards, master weights, optimizer, scheduler),
    the run ends where the uninterrupted one does."""
    from ds_hydra.training.state import checkpoint_path

    run = [*RUN, "engine=deepspeed", "engine.zero_stage=2", "trainer.save_every=2", "scheduler=cosine"]
    whole = tmp_path / "whole"
    proc = run_cli([*run, f"hydra.run.dir={whole}"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    proc = run_cli([*run, f"resume={checkpoint_path(resumed, 2)}"], env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (resumed / "ds_hydra.log").read_text()
    assert_same_weights(final_checkpoint(resumed)["model"], final_checkpoint(whole)["model"], atol=1e-7)


@pytest.mark.slow
def test_two_deepspeed_ranks_train_what_one_process_does(tmp_path, plain_run):
    """torchrun, 2 ranks x 1 micro-batch of 4 under ZeRO-2 (gradients reduced, optimizer state sharded)
    = one process x 2 micro-batches of 4."""
    from test_distributed import only_run_dir, torchrun

    proc = torchrun([*RUN, "trainer.grad_accum_steps=1", "engine=deepspeed", "engine.zero_stage=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["rank0.log", "rank1.log"]
    assert "train_batch_size 8 (micro-batch 4 x accumulation 1 x 2 ranks)" in (run_dir / "rank0.log").read_text()
    # Both ranks wrote their ZeRO shards into the one DeepSpeed checkpoint.
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "deepspeed" / f"step_{STEPS:07d}").glob("zero_pp_rank_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert_same_weights(final_checkpoint(run_dir)["model"], final_checkpoint(plain_run)["model"], atol=1e-6)
