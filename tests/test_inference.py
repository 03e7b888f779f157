"""Inference: the config contract, KV-cache generation against the uncached loop, task=infer/eval, errors."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ds_hydra
from conftest import REPO, TINY, cli_in_process, compose, run_cli
from ds_hydra.errors import ConfigError, UserError, describe_exception
from ds_hydra.inference.config import default_inference_config, new_tokens
from ds_hydra.inference import run_inference as infer
from ds_hydra.inference.generate import compile_for_cuda_graphs, generate, sample_categorical, sample_next
from ds_hydra.inference.loading import load_run
from ds_hydra.models.gpt import GPT, Block, KVCache
from ds_hydra.validation import config_problems


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


# -- the config ------------------------------------------------------------------------------------
def test_default_inference_config_is_plain_json_equal_to_the_composed_group():
    defaults = ds_hydra.default_inference_config()
    assert json.loads(json.dumps(defaults)) == defaults
    assert defaults == OmegaConf.to_container(compose().inference, enum_to_str=True)
    assert defaults["dtype"] == "auto" and defaults["tensor_parallel"] == {"tp_size": 1}
    assert defaults["kv_cache"] is True and defaults["max_out_tokens"] == 256
    defaults["top_k"] = 1  # a fresh dict each call, not a shared one
    assert default_inference_config()["top_k"] == 200


def test_default_inference_config_does_not_import_torch():
    code = "import sys, ds_hydra; ds_hydra.default_inference_config(); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_inference_key_is_a_composition_error():
    with pytest.raises(Exception) as info:
        compose(["inference.top_kk=5"])
    message = describe_exception(info.value)
    assert "inference.top_kk" in message and "unknown key" in message and "top_k" in message


def test_aliases():
    cfg = compose(["inference.max_new_tokens=7", "inference.dtype=float16"])
    assert new_tokens(cfg.inference) == 7 and cfg.inference.dtype.value == "fp16"
    assert new_tokens(compose(["inference.max_out_tokens=9"]).inference) == 9


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["inference.tensor_parallel.tp_size=2"], "inference.tensor_parallel.tp_size=2: not supported"),
        (["task=infer"], "inference.checkpoint is not set: task=infer"),
        (["task=eval"], "inference.checkpoint is not set: task=eval"),
        (["inference.top_p=0"], "inference.top_p=0.0: must be in (0, 1]"),
        (["inference.max_new_tokens=0"], "inference.max_new_tokens=0: must be >= 1"),
        (["inference.min_out_tokens=300"], "inference.min_out_tokens=300: more than inference.max_out_tokens=256"),
        (["inference.device=gpu"], "inference.device=gpu: allowed values"),
    ],
)
def test_inference_values_are_validated(overrides, expected):
    problems = config_problems(compose(overrides))
    assert any(p.startswith(expected) for p in problems), problems


# -- generation ------------------------------------------------------------------------------------
def peaky_gpt(block_size: int = 16, seed: int = 0) -> GPT:
    """A random GPT whose weights are scaled up, so greedy decoding depends sharply on the context."""
    torch.manual_seed(seed)
    model = GPT(vocab_size=29, n_layer=2, n_head=2, n_embd=32, block_size=block_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


@torch.no_grad()
def test_cached_logits_equal_full_forward_at_every_position():
    model = peaky_gpt()
    seq = torch.randint(29, (3, 16))
    full = model(seq)  # logits at every position, (B, T, V)
    cache = KVCache(model, 3)
    prefill = model(seq[:, :5], kv_cache=cache)  # a prompt of 5, then one token at a time
    torch.testing.assert_close(prefill[:, 0], full[:, 4], rtol=0, atol=1e-5)
    for t in range(5, 16):
        step = model(seq[:, t : t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.full
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(seq[:, :1], kv_cache=cache)


def test_greedy_is_identical_with_and_without_cache_within_block_size():
    model = peaky_gpt(block_size=16)
    prompt = torch.randint(29, (2, 3))
    cached = generate(model, prompt, 13, temperature=0, kv_cache=True)  # 3 + 13 = block_size
    uncached = generate(model, prompt, 13, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 3:].flatten().tolist())) >= 5  # not a degenerate repeat


def test_full_window_refill_matches_the_uncached_sliding_window_everywhere():
    model = peaky_gpt(block_size=16)
    prompt = torch.randint(29, (2, 20))  # longer than block_size: both loops crop it
    uncached = generate(model, prompt, 60, temperature=0, kv_cache=False)
    refill_every_step = generate(model, prompt, 60, temperature=0, kv_cache=True, window_keep=16)
    assert torch.equal(refill_every_step, uncached)


@torch.no_grad()
def test_cache_past_block_size_follows_the_documented_half_window_refill():
    """Token m is predicted from out[s:m]; when that would exceed block_size, s jumps to m - block_size // 2."""
    model = peaky_gpt(block_size=16)
    prompt = torch.randint(29, (1, 4))
    cached = generate(model, prompt, 60, temperature=0, kv_cache=True)
    out, start = prompt.clone(), 0
    for m in range(4, 64):
        if m - start > 16:
            start = m - 8
        logits = model(out[:, start:m])
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, out)
    assert not torch.equal(cached, generate(model, prompt, 60, temperature=0, kv_cache=False))


def test_sampling_is_deterministic_per_seed_and_respects_top_k_top_p():
    model = peaky_gpt()
    prompt = torch.zeros(4, 1, dtype=torch.long)

    def run(seed, **kw):
        return generate(model, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    greedy = generate(model, prompt, 30, temperature=0)
    assert torch.equal(run(3, top_k=1), greedy) and torch.equal(run(3, top_p=1e-6), greedy)

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).flatten().tolist()) == {0, 1}
    nucleus = sample_next(logits, 1.0, top_p=0.8, generator=gen).flatten()  # 0.636 < 0.8 <= 0.870: tokens 0, 1
    assert set(nucleus.tolist()) == {0, 1}
    share = (nucleus == 0).float().mean().item()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.04


def test_categorical_sampler_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(40000, 1)
    drawn = sample_categorical(probs, torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    torch.testing.assert_close(freq, probs[0].double(), rtol=0, atol=0.01)  # 4 sigma is ~0.01
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens, also the last one, are never drawn
    unnormalised = sample_categorical(torch.tensor([[0.0, 2.0, 6.0]]).repeat(4000, 1), torch.Generator().manual_seed(1))
    assert abs((unnormalised == 2).double().mean().item() - 0.75) < 0.03


def test_cuda_graphs_map_to_reduce_overhead_compile(monkeypatch):
    model = peaky_gpt()
    with pytest.raises(UserError, match="enable_cuda_graph=true: CUDA graphs need a CUDA device"):
        compile_for_cuda_graphs(model, torch.device("cpu"))
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.update(kw, model=m) or m)
    assert compile_for_cuda_graphs(model, torch.device("cuda")) is model
    assert seen["mode"] == "reduce-overhead" and seen["model"] is model


# -- a trained run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 6-step gpt_tiny run, trained with activation checkpointing (so its saved names are wrapped)."""
    from ds_hydra.training.trainer import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose([*TINY, "ckpt.segments=2"]), run_dir=run_dir)
    return run_dir


def fingerprint(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_infer_cli_is_deterministic_and_leaves_the_trained_run_alone(trained_run, tmp_path):
    before = fingerprint(trained_run)
    args = ["task=infer", f"inference.checkpoint={trained_run}", "inference.max_out_tokens=40", "inference.num_samples=2"]
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'cli'}"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "cli" / "inference.json").read_text())
    text = (tmp_path / "cli" / "samples.txt").read_text()
    assert report["samples"][0] in proc.stdout and report["samples"][0] in text
    assert len(report["samples"]) == 2 and all(len(s) == 1 + 40 for s in report["samples"])  # "\n" + 40
    assert report["samples"][0] != report["samples"][1]  # two draws, not one copied
    assert report["tokens_per_s"] > 0 and report["kv_cache"] is True
    assert "no_cache" not in json.dumps(report)  # generated once: the comparison is bench/inference.py's
    # the same seed in another process gives the same samples; another seed does not
    assert infer(compose(args), run_dir=tmp_path / "again")["samples"] == report["samples"]
    assert infer(compose([*args, "inference.seed=7"]), run_dir=tmp_path / "other")["samples"] != report["samples"]
    assert fingerprint(trained_run) == before


def test_loaded_model_is_clean(trained_run):
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    saved = safe_torch_load(latest_checkpoint(trained_run))["model"]
    run = load_run(str(trained_run), device="cpu")
    model = run.model
    assert all(type(block) is Block for block in model.blocks) and len(model.blocks) == 4
    # no training wrapper or swapped checkpointing class anywhere: only the model's own and torch.nn's modules
    assert {type(m).__module__.split(".")[0] + "." + type(m).__module__.split(".")[1] for m in model.modules()} <= {
        "ds_hydra.models", "torch.nn"}
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(GPT(65, 4, 2, 32, 32).state_dict())
    assert run.dtype == torch.float32 and run.step == 6
    # the trained weights, under the model's own names: checkpointing (segments=2) changes no name
    assert set(saved) == set(model.state_dict())
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], saved["blocks.1.attn.qkv.weight"])
    assert not torch.equal(saved["blocks.1.attn.qkv.weight"], GPT(65, 4, 2, 32, 32).state_dict()["blocks.1.attn.qkv.weight"])


def test_eval_reports_the_trainers_val_loss_and_perplexity(trained_run, tmp_path):
    from ds_hydra.cli import TASKS

    logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final_val = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    assert TASKS["eval"] == "ds_hydra.inference.evaluate:evaluate" and TASKS["infer"] == "ds_hydra.inference:run_inference"
    cfg = compose(["task=infer", "inference.mode=eval", f"inference.checkpoint={trained_run}", "inference.device=cpu"])
    metrics = infer(cfg, run_dir=tmp_path / "eval")  # inference.mode=eval: the same as task=eval
    assert metrics["val_loss_estimate"] == pytest.approx(final_val, abs=1e-5)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert abs(metrics["val_loss"] - final_val) < 0.15 and 3.0 < metrics["val_loss"] < math.log(65) + 0.3
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == metrics


def test_infer_in_process_from_a_step_file(trained_run, tmp_path, caplog):
    step_file = sorted((trained_run / "checkpoints").glob("step_*.pt"))[-1]
    cfg = compose(["task=infer", f"inference.checkpoint={step_file}", "inference.temperature=0",
                   "inference.max_new_tokens=20", "inference.prompt=ROMEO:", "inference.replace_with_kernel_inject=true"])
    with caplog.at_level("INFO"):
        metrics = infer(cfg, run_dir=tmp_path / "out")
    assert metrics["samples"][0].startswith("ROMEO:") and len(metrics["samples"][0]) == 26
    assert "same_tokens" not in metrics  # generated once (cache vs no cache: test_greedy_is_identical_..., bench/inference.py)
    assert "fused SDPA" in caplog.text
    assert (tmp_path / "out" / "samples.txt").read_text().startswith("ROMEO:")


# -- errors ----------------------------------------------------------------------------------------
def copy_run(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run, dest)
    return dest


def _missing(run, tmp):
    return tmp / "nope"


def _not_a_run(run, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _no_weights(run, tmp):
    (tmp / "bare").mkdir()
    shutil.copy(run / "config_resolved.yaml", tmp / "bare")
    return tmp / "bare"


def _other_model(run, tmp):
    dest = copy_run(run, tmp / "wide")
    cfg = dest / "config_resolved.yaml"
    cfg.write_text(cfg.read_text().replace("n_embd: 32", "n_embd: 64"))
    return dest


def _corrupt(run, tmp):
    dest = copy_run(run, tmp / "corrupt")
    sorted((dest / "checkpoints").glob("step_*.pt"))[-1].write_bytes(b"\x00not a checkpoint" * 10)
    return dest


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.marker),))


def _pickle_with_code(run, tmp):
    dest = copy_run(run, tmp / "evil")
    _RunsCode.marker = str(tmp / "code_ran")
    torch.save({"model": _RunsCode(), "step": 1}, sorted((dest / "checkpoints").glob("step_*.pt"))[-1])
    return dest


def _foreign_target(run, tmp):
    dest = copy_run(run, tmp / "foreign")
    cfg = OmegaConf.load(dest / "config_resolved.yaml")
    cfg.allowed_targets = ["pathlib"]  # a run dir cannot widen the allowlist of the process loading it
    cfg.data = {"_target_": "pathlib.Path.touch", "self": str(tmp / "code_ran")}
    OmegaConf.save(cfg, dest / "config_resolved.yaml")
    return dest


@pytest.mark.parametrize(
    "make,expected",
    [
        (_missing, "no such directory"),
        (_not_a_run, "no config_resolved.yaml"),
        (_no_weights, "the run has no weights"),
        (_other_model, r"wte.weight, lm_head.weight are \(65, 32\) in the checkpoint but \(65, 64\) in the model; .*blocks.\[0-3\].attn.qkv.weight are"),
        (_corrupt, r"step_0000006\.pt: not a (PyTorch|loadable)"),
        (_pickle_with_code, r"step_0000006\.pt: (refused|not a loadable)"),
        (_foreign_target, r"config_resolved\.yaml: data\._target_=pathlib\.Path\.touch: not an allowed target"),
    ],
    ids=["missing", "not-a-run", "no-weights", "shape-mismatch", "corrupt", "pickled-code", "foreign-target"],
)
def test_bad_checkpoints_are_one_clear_line(trained_run, tmp_path, make, expected):
    path = make(trained_run, tmp_path)
    with pytest.raises(UserError) as info:
        load_run(str(path), device="cpu")
    message = str(info.value)
    assert re.search(expected, message) and "\n" not in message, message
    assert not (tmp_path / "code_ran").exists()


def test_infer_never_writes_into_the_trained_run(trained_run):
    before = fingerprint(trained_run)
    cfg = compose(["task=infer", f"inference.checkpoint={trained_run}"])
    with pytest.raises(UserError, match=r"^hydra.run.dir=.*: is the trained run given as inference.checkpoint"):
        infer(cfg, run_dir=trained_run)
    assert fingerprint(trained_run) == before


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_weights_and_cache(trained_run, dtype, expected):
    run = load_run(str(trained_run), device="cpu", dtype=dtype)
    assert {p.dtype for p in run.model.parameters()} == {expected}
    cache = KVCache(run.model, 2)
    assert cache.layers[0].k.dtype == expected
    out = generate(run.model, torch.zeros(2, 3, dtype=torch.long), 40, temperature=0)  # past block_size 32
    assert out.shape == (2, 43) and int(out.max()) < 65


def test_prompt_outside_the_vocabulary_names_the_key(trained_run, tmp_path):
    cfg = compose(["task=infer", f"inference.checkpoint={trained_run}"])
    cfg.inference.prompt = "héllo"
    with pytest.raises(UserError, match=r"^inference.prompt='héllo': characters not in the vocabulary: 'é'"):
        infer(cfg, run_dir=tmp_path / "out")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["inference.checkpoint=does/not/exist"], "inference.checkpoint=does/not/exist: no such directory"),
    ],
    ids=["missing-run"],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, args, expected):
    proc = cli_in_process(["task=infer", f"hydra.run.dir={tmp_path / 'out'}", *args])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ds_hydra: error: ") and expected in lines[0]
