"""Fine-tuning on a memory budget: low-bit and factored optimizer states, the optimizer step inside
backward, bf16 weights, and the batch size and checkpointing fitted to a memory limit.

The memory preflight's optimizer-state estimate is checked against the state each optimizer really
holds after one step (within 5%), losses against AdamW's on the same run, resumes against the
uninterrupted run (bit for bit), the in-backward step against the ordinary one (same weights), and
``batch_size=auto`` against the preflight's own verdict one sequence larger.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from conftest import TINY, compose
from test_resume import assert_same_tree

# gpt_tiny 128 wide: its matrices (128 x 128 = 16,384 elements) are above the 4,096 under which
# 8-bit optimizers keep fp32 state, so the quantized state is what is measured
WIDE = [*TINY, "model.n_embd=128", "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.compile=false"]
LLAMA_BF16 = ["model=hf_llama", "model.config.hidden_size=64", "model.config.intermediate_size=128",
              "model.config.num_hidden_layers=2", "model.dtype=bf16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _needs(optimizer: str) -> None:
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    if optimizer == "adamw4bit":
        pytest.importorskip("torchao.optim")
    if optimizer == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")


def _measured_state(optimizer) -> int:
    from ds_hydra.optim.in_backward import OptimizerInBackward
    from ds_hydra.optim.state_size import state_bytes_by_parameter

    optimizers = optimizer.per_parameter if isinstance(optimizer, OptimizerInBackward) else [optimizer]
    total = 0
    for opt in optimizers:
        own, shared = state_bytes_by_parameter(opt)
        total += sum(own.values()) + shared
    return total


def _one_step_state(overrides, tmp_path):
    """(the preflight's optimizer-state estimate, the state the trainer's optimizer holds after one step)."""
    from ds_hydra.training.memory_preflight import judge_step_memory
    from ds_hydra.training.trainer import Trainer

    cfg = compose(overrides)
    estimate = judge_step_memory(cfg).estimate
    trainer = Trainer(cfg, tmp_path)
    trainer.train_step()
    return estimate, _measured_state(trainer.optimizer), trainer


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor"])
def test_the_state_estimate_is_within_5_percent_of_the_state_after_one_step(optimizer, tmp_path):
    _needs(optimizer)
    estimate, measured, _ = _one_step_state([*WIDE, f"optimizer={optimizer}"], tmp_path)
    assert estimate.optimizer_state == pytest.approx(measured, rel=0.05)
    n_params = estimate.parameters // 4
    per_param = {"adamw": 8, "adamw8bit": 2, "adafactor": 0.1}[optimizer]  # bytes of state per parameter, roughly
    if optimizer == "adafactor":
        assert estimate.optimizer_state < per_param * n_params  # rows + columns: far below one float per parameter
    else:
        assert estimate.optimizer_state == pytest.approx(per_param * n_params, rel=0.1)


@pytest.mark.slow
def test_the_4bit_state_estimate_is_within_5_percent(tmp_path):
    _needs("adamw4bit")
    estimate, measured, _ = _one_step_state([*WIDE, "optimizer=adamw4bit"], tmp_path)
    assert estimate.optimizer_state == pytest.approx(measured, rel=0.05)
    assert estimate.optimizer_state == pytest.approx(estimate.parameters / 4, rel=0.1)  # 1 byte per parameter


def test_bf16_weights_with_8bit_state(tmp_path):
    """bf16 weights and gradients, 8-bit moments, the ordinary step: the state estimate against one real step."""
    _needs("adamw8bit")
    pytest.importorskip("transformers")
    run = [*TINY, *LLAMA_BF16, "trainer.batch_size=1", "data.seq_len=16", "optimizer=adamw8bit", "trainer.compile=false"]
    estimate, measured, trainer = _one_step_state(run, tmp_path)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert estimate.parameters == 2 * n_params and estimate.gradients == 2 * n_params
    assert estimate.optimizer_state == pytest.approx(measured, rel=0.05)


def _resident(key: str) -> int:
    """This process's resident size (VmRSS) or its peak since the last reset (VmHWM), in bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self: Linux with glibc")
def test_the_8bit_kernel_temporaries_are_what_bitsandbytes_allocates_on_the_cpu():
    """The estimate adds the CPU kernel's fp32 copies for the largest tensor's step (no probe sees them:
    they are made outside torch's dispatch of the optimizer); their count per element against the
    growth of the peak resident size in a real step of a 10M-element bf16 tensor, its state made by a
    first step. Its fp32 copies (42 MB each) are above glibc's 32 MB mmap threshold, so each freed copy
    goes back to the system at once, as a model's embedding's do."""
    _needs("adamw8bit")
    import ctypes
    import gc

    bnb = pytest.importorskip("bitsandbytes")

    from ds_hydra.optim.state_size import kernel_temporaries_per_element

    per_element = kernel_temporaries_per_element(bnb.optim.AdamW8bit, "cpu")
    p = torch.nn.Parameter(torch.full((4096, 2560), 0.5, dtype=torch.bfloat16))
    optimizer = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what earlier tests freed is not the step's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from the current one
    before = _resident("VmRSS")
    optimizer.step()
    grown = _resident("VmHWM") - before
    assert grown == pytest.approx(per_element * p.numel(), rel=0.05), (grown / p.numel(), per_element)


def test_state_sizes_extrapolated_from_small_probes_equal_a_real_step():
    """Shapes far above the probe size: the two-probe extrapolation against one real step at full size."""
    bnb = pytest.importorskip("bitsandbytes")
    from functools import partial

    from ds_hydra.optim.state_size import PROBE_ELEMENTS, optimizer_state_bytes

    shapes = [((2048, 512), torch.float32), ((3000, 256), torch.float32), ((1000,), torch.float32), ((64, 64), torch.float32)]
    assert any(r * c > PROBE_ELEMENTS for (r, c), _ in shapes[:2])
    for make in [partial(bnb.optim.AdamW8bit, lr=1e-3)] + ([partial(torch.optim.Adafactor)] if hasattr(torch.optim, "Adafactor") else []):
        params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape, dtype in shapes]
        optimizer = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        estimate, _ = optimizer_state_bytes(make, shapes)
        assert estimate == _measured_state(optimizer), make


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_loss_after_a_few_steps_is_close_to_adamws(optimizer, tmp_path):
    from ds_hydra.training.trainer import train

    _needs(optimizer)
    run = [*WIDE, "trainer.max_steps=8", "trainer.eval_interval=0", "scheduler=constant"]
    adamw = train(compose(run), run_dir=tmp_path / "adamw")
    other = train(compose([*run, f"optimizer={optimizer}"]), run_dir=tmp_path / optimizer)  # each option's own lr
    assert other["train_loss"] == pytest.approx(adamw["train_loss"], rel=0.05)
    assert other["train_loss"] < 4.0  # from ln(65) = 4.17 at the start: it trained


def _final_state(run_dir):
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    return safe_torch_load(latest_checkpoint(run_dir))


def key_is_timing(where: str) -> bool:
    return where.endswith(".config")  # the resumed run's config names resume=


@pytest.mark.parametrize("setting", [
    ["optimizer=adamw8bit"],
    ["optimizer=adafactor"],
    ["trainer.optimizer_in_backward=true", "trainer.grad_clip=0"],
    ["trainer.optimizer_in_backward=true", "trainer.grad_clip=0", "optimizer=adamw8bit"],
])
def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(setting, tmp_path):
    from ds_hydra.training.state import checkpoint_path
    from ds_hydra.training.trainer import train

    for item in setting:
        if item.startswith("optimizer="):
            _needs(item.split("=")[1])
    run = [*WIDE, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=3", "model.dropout=0.1", *setting]
    run_dir = tmp_path / "run"
    train(compose(run), run_dir=run_dir)
    reference = _final_state(run_dir)
    train(compose([*run, f"resume={checkpoint_path(run_dir, 2)}"]), run_dir=run_dir)
    assert_same_tree(reference, _final_state(run_dir), "state", key_is_timing)


def test_in_backward_steps_give_the_weights_of_ordinary_steps(tmp_path):
    from ds_hydra.training.trainer import Trainer

    run = [*WIDE, "trainer.grad_clip=0", "model.dropout=0.0"]
    plain = Trainer(compose(run), tmp_path / "plain")
    fused = Trainer(compose([*run, "trainer.optimizer_in_backward=true"]), tmp_path / "in_backward")
    for _ in range(3):
        plain.train_step()
        fused.train_step()
        assert all(p.grad is None for p in fused.model.parameters())  # freed as soon as each stepped
    for (name, a), b in zip(plain.model.named_parameters(), fused.model.parameters()):
        assert torch.equal(a, b), name
    assert plain.optimizer.param_groups[0]["lr"] == fused.optimizer.param_groups[0]["lr"]


def test_in_backward_holds_no_gradients_at_the_peak():
    from ds_hydra.training.memory_preflight import judge_step_memory

    run = [*WIDE, "trainer.grad_clip=0", "ckpt=full", "model.n_layer=8", "trainer.batch_size=1"]
    plain = judge_step_memory(compose(run)).estimate
    fused = judge_step_memory(compose([*run, "trainer.optimizer_in_backward=true"])).estimate
    assert fused.gradients == 0 and plain.gradients == plain.parameters
    assert fused.total < plain.total - plain.gradients / 2  # most of the gradients are never alive together
    assert "freed once its parameter steps" in fused.breakdown()


@pytest.mark.parametrize("override,fix", [
    ("trainer.grad_accum_steps=2", "trainer.grad_accum_steps=1"),
    ("trainer.grad_clip=1.0", "trainer.grad_clip=0"),
    ("trainer.skip_nonfinite=2", "trainer.skip_nonfinite=0"),
    ("engine=ddp", "engine=auto"),
])
def test_in_backward_refuses_what_it_cannot_honour_in_one_line(override, fix):
    from ds_hydra.errors import ConfigError
    from ds_hydra.validation import validate_config

    base = [o for o in WIDE if not o.startswith("trainer.grad_clip")]
    cfg = compose([*base, "trainer.grad_clip=0", "trainer.optimizer_in_backward=true", override])
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    lines = [line for line in str(refused.value).splitlines() if "optimizer_in_backward" in line]
    assert len(lines) == 1 and fix in lines[0], str(refused.value)


def test_bf16_weights_with_8bit_state_in_backward(tmp_path):
    """bf16 weights: 2 bytes each, bf16 gradients, 8-bit moments; estimate against one real step."""
    _needs("adamw8bit")
    pytest.importorskip("transformers")
    run = [*TINY, *LLAMA_BF16, "trainer.batch_size=1", "data.seq_len=16", "optimizer=adamw8bit",
           "trainer.optimizer_in_backward=true", "trainer.grad_clip=0", "trainer.compile=false"]
    estimate, measured, trainer = _one_step_state(run, tmp_path)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert estimate.parameters == 2 * n_params and estimate.gradients == 0
    assert estimate.optimizer_state == pytest.approx(measured, rel=0.05)


# -- fitted to a memory limit -----------------------------------------------------------------------
FIT = [*WIDE, "trainer.global_batch_size=24", "trainer.batch_size=auto"]


def _estimate_for(overrides, batch):
    from ds_hydra.training.memory_preflight import judge_step_memory

    return judge_step_memory(compose([*[o for o in overrides if "batch_size=" not in o], f"trainer.batch_size={batch}",
                                      f"trainer.grad_accum_steps={max(1, 24 // batch)}"])).estimate.total


def test_batch_size_auto_picks_the_largest_that_fits_and_keeps_the_global_batch():
    from ds_hydra.errors import UserError
    from ds_hydra.training.memory_fit import fit_to_memory
    from ds_hydra.training.memory_preflight import check_step_memory

    limit = (_estimate_for(WIDE, 6) + _estimate_for(WIDE, 7)) // 2  # 6 fits, 7 does not; 6 divides 24
    cfg = compose([*FIT, f"trainer.memory_limit={limit}"])
    lines = fit_to_memory(cfg)
    verdict = check_step_memory(cfg)
    b = cfg.trainer.batch_size
    assert (b, cfg.trainer.grad_accum_steps) == (6, 4) and b * cfg.trainer.grad_accum_steps == 24
    assert verdict.level == logging.INFO and verdict.estimate.total <= limit
    assert lines[0].startswith("trainer.batch_size=auto: micro-batch 6 x grad_accum_steps 4 x world size 1 = global batch 24")
    with pytest.raises(UserError, match="over trainer.memory_limit"):  # the preflight refuses one sequence more
        check_step_memory(compose([*WIDE, "trainer.batch_size=7", "trainer.grad_accum_steps=3", f"trainer.memory_limit={limit}"]))


def test_batch_size_auto_lowers_to_a_divisor_of_the_global_batch():
    from ds_hydra.training.memory_fit import fit_to_memory

    limit = (_estimate_for(WIDE, 5) + _estimate_for(WIDE, 6)) // 2  # 5 fits, 5 does not divide 24: 4
    cfg = compose([*FIT, f"trainer.memory_limit={limit}"])
    lines = fit_to_memory(cfg)
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum_steps) == (4, 6)
    assert "the largest that fits is 5; 4 divides 24" in lines[0]


def test_batch_size_auto_is_written_into_the_run_and_a_resume_repeats_it(tmp_path):
    from omegaconf import OmegaConf

    from ds_hydra.training.trainer import train

    limit = (_estimate_for(WIDE, 6) + _estimate_for(WIDE, 7)) // 2
    run = [*FIT, "trainer.max_steps=2", f"trainer.memory_limit={limit}"]
    train(compose(run), run_dir=tmp_path / "run")
    resolved = OmegaConf.load(tmp_path / "run" / "config_resolved.yaml")
    assert (resolved.trainer.batch_size, resolved.trainer.grad_accum_steps) == (6, 4)
    resumed = compose([*FIT, "trainer.max_steps=3", "trainer.memory_limit=1GiB", f"resume={tmp_path / 'run'}"])  # more room now
    from ds_hydra.training.memory_fit import fit_to_memory

    lines = fit_to_memory(resumed)
    assert resumed.trainer.batch_size == 6 and "as " in lines[0] and "chose when it started" in lines[0]


def test_batch_size_auto_refuses_when_one_sequence_does_not_fit():
    from ds_hydra.errors import UserError
    from ds_hydra.training.memory_fit import fit_to_memory

    with pytest.raises(UserError, match="not even one sequence per micro-batch fits 1.0 MiB") as refused:
        fit_to_memory(compose([*FIT, "trainer.memory_limit=1MiB"]))
    assert "\n" not in str(refused.value)


def test_ckpt_auto_recomputes_only_when_it_must():
    from ds_hydra.training.memory_fit import fit_to_memory
    from ds_hydra.training.memory_preflight import judge_step_memory

    run = [*WIDE, "trainer.batch_size=16", "ckpt=auto"]
    roomy = compose([*run, "trainer.memory_limit=1GiB"])
    fit_to_memory(roomy)
    assert roomy.ckpt.memory_budget is None and not roomy.ckpt.full
    none = judge_step_memory(compose([*WIDE, "trainer.batch_size=16"])).estimate
    full = judge_step_memory(compose([*WIDE, "trainer.batch_size=16", "ckpt=full"])).estimate
    limit = (none.total + full.total) // 2
    tight = compose([*run, f"trainer.memory_limit={limit}"])
    fit_to_memory(tight)
    budget = int(tight.ckpt.memory_budget)
    assert full.kept < budget < none.kept  # some blocks recomputed, not all
    assert judge_step_memory(tight).estimate.total <= limit


def test_validate_prints_the_breakdown(capsys):
    from ds_hydra.validate_task import validate_task

    validate_task(compose([*WIDE, "task=validate", "optimizer=adafactor"] if hasattr(torch.optim, "Adafactor") else [*WIDE, "task=validate"]))
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer state", "activations", "logits", "step peak"):
        assert f"\n  {part} " in out, part


def test_a_quantized_base_counts_at_the_bytes_bitsandbytes_stores(tmp_path):
    """QLoRA: the estimate builds the base plain (bitsandbytes' tensors cannot be faked) and counts each
    quantized weight packed; against the real model's parameters plus their quantization statistics."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from pathlib import Path

    from ds_hydra.optim.state_size import tensor_bytes
    from ds_hydra.training.memory_preflight import judge_step_memory
    from ds_hydra.training.trainer import Trainer

    run = [*TINY, *[o for o in LLAMA_BF16 if "dtype" not in o], "model.config.hidden_size=256", "model.config.intermediate_size=512",
           "adapter=lora", "model.quantize=nf4", "trainer.batch_size=1", "data.seq_len=16", "trainer.compile=false"]
    estimate = judge_step_memory(compose(run)).estimate
    model = Trainer(compose(run), Path(tmp_path)).model
    params = list(model.parameters())
    statistics = 0
    for p in params:
        state = getattr(p, "quant_state", None)
        if state is not None:
            statistics += sum(tensor_bytes(t) for t in [state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset])
    stored = sum(tensor_bytes(p) for p in params) + statistics
    assert estimate.parameters == pytest.approx(stored, rel=0.02)
    assert estimate.frozen_parameters == pytest.approx(sum(tensor_bytes(p) for p in params if not p.requires_grad) + statistics, rel=0.02)
    trained = sum(p.numel() for p in params if p.requires_grad)
    assert estimate.gradients == 4 * trained and estimate.optimizer_state == 8 * trained  # fp32 AdamW on the adapters only
