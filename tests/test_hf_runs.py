"""A Hugging Face model through everything ds_hydra does: resume, inference, evaluation, torchrun DDP and
FSDP, DeepSpeed, sweeps. The same checks the built-in GPT has, on transformers' LlamaForCausalLM."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ENGINE_RUN, ENGINE_STEPS, compose, run_cli

pytest.importorskip("transformers", reason="Hugging Face models are an optional extra (hf)")

LLAMA = ["model=hf_llama", "model.config.hidden_size=32", "model.config.intermediate_size=64",
         "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1", "data.seq_len=32"]
RUN = [*[o for o in ENGINE_RUN if not o.startswith("model=")], *LLAMA]  # no dropout: ranks draw other masks
DROPOUT = "+model.config.attention_dropout=0.1"


def final_state(run_dir: Path):
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    return safe_torch_load(latest_checkpoint(run_dir))


def assert_same_weights(got, want, atol: float = 0.0):
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        if atol:
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=atol, msg=name)
        else:
            assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process, two micro-batches of 4 per step: what two ranks of 4 sequences each see."""
    from ds_hydra.training.trainer import train

    run_dir = tmp_path_factory.mktemp("hf_one_process")
    train(compose([*RUN, "trainer.grad_accum_steps=2", "trainer.save_every=2"]), run_dir=run_dir)
    return run_dir


def test_hf_run_resumes_bit_for_bit(tmp_path):
    """With attention dropout (the RNG matters) and accumulation (the data position matters)."""
    from ds_hydra.training.state import checkpoint_path
    from ds_hydra.training.trainer import train

    run = [*RUN, DROPOUT, "trainer.grad_accum_steps=2", "trainer.save_every=2"]
    train(compose(run), run_dir=tmp_path / "whole")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    train(compose([*run, f"resume={checkpoint_path(resumed, 2)}"]))
    got, want = final_state(resumed), final_state(tmp_path / "whole")
    assert got["step"] == want["step"] == ENGINE_STEPS
    assert_same_weights(got["model"], want["model"])
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_hf_infer_decodes_through_generate_and_eval_reports_perplexity(one_process, tmp_path):
    from ds_hydra.inference import run_inference

    args = ["task=infer", f"inference.checkpoint={one_process}", "inference.max_new_tokens=20", "inference.prompt=ROMEO:",
            "inference.temperature=0"]
    metrics = run_inference(compose(args), run_dir=tmp_path / "infer")
    assert metrics["samples"][0].startswith("ROMEO:") and len(metrics["samples"][0]) == len("ROMEO:") + 20
    uncached = run_inference(compose([*args, "inference.kv_cache=false"]), run_dir=tmp_path / "infer_no_cache")
    assert uncached["samples"] == metrics["samples"]  # greedy: transformers' generate with and without its KV cache agree
    evaluated = run_inference(compose(["task=infer", "inference.mode=eval", f"inference.checkpoint={one_process}"]),
                              run_dir=tmp_path / "eval")
    logged = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert evaluated["val_loss_estimate"] == pytest.approx([r for r in logged if "val_loss" in r][-1]["val_loss"], abs=1e-5)


def test_hf_validate_builds_on_the_meta_device(tmp_path):
    from ds_hydra.activation_checkpointing.selective import selective_available

    policy = "ckpt=selective" if selective_available() else "ckpt=full"  # (selective needs torch >= 2.5)
    proc = run_cli(["task=validate", *LLAMA, policy, f"hydra.run.dir={tmp_path / 'v'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "-> LlamaForCausalLM:" in proc.stdout and "model.layers: 4 blocks, 4 recomputed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_hf_two_ranks_train_what_one_process_does(tmp_path, one_process, engine):
    from test_distributed import only_run_dir, torchrun

    from ds_hydra.engine.fsdp import fsdp_unsupported

    if engine == "fsdp" and fsdp_unsupported(torch.device("cpu")):
        pytest.skip(fsdp_unsupported(torch.device("cpu")))
    # a full checkpoint to compare (several ranks write sharded ones by default)
    proc = torchrun([*RUN, f"engine={engine}", "trainer.save_every=2", "trainer.checkpoint_format=full"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert f"{engine}: rank 0 of 2" in (run_dir / "rank0.log").read_text()
    assert_same_weights(final_state(run_dir)["model"], final_state(one_process)["model"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_hf_deepspeed_trains_what_one_process_does(tmp_path, one_process, stage):
    pytest.importorskip("deepspeed", reason="deepspeed is an optional extra")
    run_dir = tmp_path / "run"
    proc = run_cli([*RUN, "trainer.grad_accum_steps=2", "trainer.save_every=2", "engine=deepspeed",
                    f"engine.zero_stage={stage}", f"hydra.run.dir={run_dir}"], env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final_state(run_dir)["model"], final_state(one_process)["model"], atol=1e-6)


@pytest.mark.slow
def test_hf_sweep_writes_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *RUN, "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "sweep_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert all(float(r["val_loss"]) < 4.2 for r in rows)
