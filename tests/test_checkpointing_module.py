"""``ds_hydra.checkpointing``: DeepSpeed's activation-checkpointing module surface, on the CPU.

The reference for every gradient is the same model run without checkpointing: equal bit for bit, with
dropout on, from both the default generator and the model-parallel RNG tracker.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn

import ds_hydra.checkpointing as checkpointing
import megatron_style
from conftest import TINY, compose, run_cli, tiny_run_args
from ds_hydra.activation_checkpointing import rng
from ds_hydra.errors import UserError

SEED = 1234


@pytest.fixture(autouse=True)
def fresh_module(monkeypatch):
    """Every test starts unconfigured, with an empty tracker and the model's checkpointing on."""
    checkpointing.configure_for_run(None)
    rng.get_cuda_rng_tracker().reset()
    monkeypatch.setattr(megatron_style, "USE_CHECKPOINTING", True)
    yield
    checkpointing.configure_for_run(None)
    rng.get_cuda_rng_tracker().reset()


def build(n_layer=4, dropout=0.2):
    torch.manual_seed(SEED)
    return megatron_style.MegatronGPT(n_layer=n_layer, n_head=4, n_embd=32, block_size=16, vocab_size=65, dropout=dropout)


def loss_and_grads(model, use_checkpointing: bool, seed: int = 7, device: str = "cpu"):
    """One forward and backward from a fixed generator state (default and tracker)."""
    megatron_style.USE_CHECKPOINTING = use_checkpointing
    checkpointing.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randint(0, 65, (3, 16)).to(device)
    model.zero_grad(set_to_none=True)
    _, loss = model(x, x)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_bit_identical(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    unequal = [name for name in grads_a if not torch.equal(grads_a[name], grads_b[name])]
    assert not unequal, f"gradients differ: {unequal}"


# -- gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers_per_checkpoint", [1, 2])
def test_gradients_bit_identical_to_no_checkpointing_with_dropout(monkeypatch, layers_per_checkpoint):
    monkeypatch.setattr(megatron_style, "CHECKPOINT_NUM_LAYERS", layers_per_checkpoint)
    model = build()
    reference = loss_and_grads(model, use_checkpointing=False)
    layer_calls = [layer.calls for layer in model.layers]
    checkpointed = loss_and_grads(model, use_checkpointing=True)
    assert [layer.calls - before for layer, before in zip(model.layers, layer_calls)] == [2] * 4  # recomputed once
    assert_bit_identical(reference, checkpointed)


def loss_with_seeds(model, default_seed: int, tracker_seed: int):
    megatron_style.USE_CHECKPOINTING = False
    torch.manual_seed(0)
    x = torch.randint(0, 65, (3, 16))
    torch.manual_seed(default_seed)
    tracker = rng.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(rng.MODEL_PARALLEL_RNG_TRACKER_NAME, tracker_seed)
    with torch.no_grad():
        return model(x, x)[1]


def test_dropout_draws_from_both_generators():
    """The comparison above can fail: changing either generator's seed changes the loss."""
    model = build()
    base = loss_with_seeds(model, 7, 100)
    assert torch.equal(base, loss_with_seeds(model, 7, 100))
    assert not torch.equal(base, loss_with_seeds(model, 8, 100))  # hidden and embedding dropout
    assert not torch.equal(base, loss_with_seeds(model, 7, 101))  # attention dropout, under fork()


def test_without_tracker_replay_gradients_would_differ(monkeypatch):
    """The tracker replay is what makes them equal: turned off, the recompute draws other attention masks."""
    model = build()
    reference = loss_and_grads(model, use_checkpointing=False)
    monkeypatch.setattr(checkpointing, "replaying_tracker", lambda fn: fn)
    broken = loss_and_grads(model, use_checkpointing=True)
    assert torch.equal(reference[0], broken[0])  # the forward is the same
    assert any(not torch.equal(reference[1][n], broken[1][n]) for n in reference[1])


def test_non_reentrant_and_reentrant_agree():
    model = build()
    reference = loss_and_grads(model, use_checkpointing=False)
    checkpointing.configure_for_run({"use_reentrant": True})
    reentrant = loss_and_grads(model, use_checkpointing=True)
    assert_bit_identical(reference, reentrant)


def test_keyword_tensors_get_gradients_and_one_item_tuples_unwrap():
    weight = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)

    def block(x, scale=None):
        return ((x @ weight) * scale,)  # a one-item tuple: DeepSpeed hands back the tensor itself

    out = checkpointing.checkpoint(block, x, scale=scale)
    assert isinstance(out, torch.Tensor)
    out.sum().backward()
    grads = (x.grad.clone(), weight.grad.clone(), scale.grad.clone())
    x.grad = weight.grad = scale.grad = None
    block(x, scale=scale)[0].sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads, (x.grad, weight.grad, scale.grad)))


def test_parameters_get_gradients_when_no_input_requires_grad():
    """DeepSpeed's reentrant checkpoint loses them here; the default non-reentrant one does not."""
    layer = nn.Linear(4, 4)
    out = checkpointing.checkpoint(layer, torch.randn(2, 4))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_without_grad_the_function_just_runs():
    calls = []

    def block(x):
        calls.append(1)
        return x * 2

    with torch.no_grad():
        out = checkpointing.checkpoint(block, torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and len(calls) == 1


def test_inside_a_block_ds_hydra_checkpoints_the_call_runs_directly():
    """ckpt.full on a model that checkpoints itself: the block is recomputed once, not twice over."""
    from ds_hydra.activation_checkpointing import checkpoint_activations

    model = build(dropout=0.0)
    reference = loss_and_grads(model, use_checkpointing=False)
    checkpoint_activations(model, full=True)
    before = [layer.calls for layer in model.layers]
    both = loss_and_grads(model, use_checkpointing=True)
    assert [layer.calls - b for layer, b in zip(model.layers, before)] == [2] * 4
    assert_bit_identical(reference, both)


def test_block_policy_replays_the_tracker_too():
    """ds_hydra's own policy (ckpt.full) on a model that forks the tracker: gradients stay equal."""
    from ds_hydra.activation_checkpointing import checkpoint_activations

    model = build()
    reference = loss_and_grads(model, use_checkpointing=False)
    checkpoint_activations(model, full=True)
    assert_bit_identical(reference, loss_and_grads(model, use_checkpointing=False))


# -- configure ----------------------------------------------------------------------------------------
def test_configure_reads_deepspeeds_arguments_and_config(tmp_path, caplog):
    assert not checkpointing.is_configured()
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_batch_size": 8, "activation_checkpointing": {
        "partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": False,
        "number_checkpoints": 4, "synchronize_checkpoint_boundary": True, "profile": False}}))
    with caplog.at_level(logging.INFO, logger=checkpointing.log.name):
        checkpointing.configure(None, deepspeed_config=str(path), profile=True, synchronize=False)
    assert checkpointing.is_configured()
    assert checkpointing.current_settings() == checkpointing.Settings(
        partition_activations=True, num_checkpoints=4, checkpoint_in_cpu=True, synchronize=False, profile=True)
    assert "partition_activations=True: the inputs of each checkpoint stay whole" in caplog.text
    # DeepSpeed's module globals read the same
    assert checkpointing.PARTITION_ACTIVATIONS and checkpointing.CPU_CHECKPOINT and checkpointing.PROFILE_TIME
    assert checkpointing.num_layers == 4 and not checkpointing.SYNCHRONIZE
    checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"profile": True}})
    assert checkpointing.current_settings() == checkpointing.Settings(profile=True)  # configure starts afresh


def test_configure_starts_from_the_runs_settings():
    """A model's own configure(mpu) keeps what the run's ckpt config asked for."""
    checkpointing.configure_for_run(compose(["ckpt=deepspeed", "ckpt.cpu_checkpointing=true", "ckpt.profile=true"]).ckpt)
    assert checkpointing.is_configured()
    checkpointing.configure(None)
    settings = checkpointing.current_settings()
    assert settings.checkpoint_in_cpu and settings.profile and settings.num_checkpoints == 4
    checkpointing.configure(None, profile=False)
    assert not checkpointing.current_settings().profile


def test_configure_refuses_a_missing_or_broken_file(tmp_path):
    with pytest.raises(UserError, match=r"deepspeed_config=.*nope.json: no such file"):
        checkpointing.configure(None, deepspeed_config=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size" 8}')  # DeepSpeed's hjson takes single quotes and comments, not this
    with pytest.raises(UserError, match=r"not valid JSON( or hjson)? \(line 1, column 21"):
        checkpointing.configure(None, deepspeed_config=bad)


def test_profile_logs_one_line_per_backward(caplog):
    checkpointing.configure(None, profile=True)
    model = build()
    with caplog.at_level(logging.INFO, logger=checkpointing.log.name):
        loss_and_grads(model, use_checkpointing=True)
        loss_and_grads(model, use_checkpointing=True)
    lines = [r.getMessage() for r in caplog.records if "checkpointing.profile" in r.getMessage()]
    assert len(lines) == 2 and all(line.startswith("checkpointing.profile: 4 checkpointed calls: forward") for line in lines)


def test_cpu_checkpointing_and_synchronize_on_a_cpu(caplog):
    """Nothing to move or synchronize on a CPU: said once, and the gradients are unchanged."""
    model = build()
    reference = loss_and_grads(model, use_checkpointing=False)
    checkpointing.configure(None, checkpoint_in_cpu=True, synchronize=True)
    with caplog.at_level(logging.INFO, logger=checkpointing.log.name):
        assert_bit_identical(reference, loss_and_grads(model, use_checkpointing=True))
    assert caplog.text.count("the inputs are in host memory already") <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpointing_on_cuda_moves_the_inputs_and_keeps_gradients():
    from ds_hydra.activation_checkpointing import SavedActivationCounter

    model = build().cuda()
    reference = loss_and_grads(model, use_checkpointing=False, device="cuda")
    checkpointing.configure(None, checkpoint_in_cpu=True, synchronize=True, profile=True)
    with SavedActivationCounter(model) as saved:
        offloaded = loss_and_grads(model, use_checkpointing=True, device="cuda")
    assert_bit_identical(reference, offloaded)
    assert saved.offloaded_bytes >= 4 * 3 * 16 * 32 * 4  # each layer's input (3 x 16 x 32 fp32) went to host memory


def test_reset_drops_unfinished_profile_records():
    checkpointing.configure(None, profile=True)
    with torch.enable_grad():
        checkpointing.checkpoint(lambda x: x * 2, torch.ones(2, requires_grad=True))  # a forward, no backward
    checkpointing.reset()
    assert checkpointing._STATE.profile.forward == []


# -- seeds and the tracker ------------------------------------------------------------------------------
class FakeMPU:
    """Megatron's model-parallel unit at tensor-parallel rank ``rank`` of ``size``."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def get_tensor_model_parallel_rank(self):
        return self.rank

    def get_tensor_model_parallel_world_size(self):
        return self.size


class OldMPU:
    """An mpu from before Megatron's pipeline parallelism: the model-parallel names."""

    def get_model_parallel_rank(self):
        return 1

    def get_model_parallel_world_size(self):
        return 2


@pytest.mark.parametrize("mpu", [FakeMPU(rank=1, size=2), OldMPU()], ids=["tensor-parallel names", "old names"])
def test_model_parallel_seed_is_deepspeeds(mpu):
    checkpointing.configure(mpu)
    checkpointing.model_parallel_cuda_manual_seed(100)
    expected = torch.Generator().manual_seed(100 + 2718 + 1).get_state()
    assert torch.equal(rng.get_cuda_rng_tracker().get_states()[rng.MODEL_PARALLEL_RNG_TRACKER_NAME], expected)
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(100).get_state())


def test_tracker_fork_keeps_its_state_and_restores_the_default():
    tracker = checkpointing.get_cuda_rng_tracker()
    tracker.add("a", 5)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("a"):
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([first, second]), expected)  # "a" went on where it left off
    with pytest.raises(ValueError, match="seed 5 already exists"):
        tracker.add("b", 5)
    with pytest.raises(ValueError, match="state 'missing' is not added"):
        with tracker.fork("missing"):
            pass


def test_reconfigure_tp_seed_changes_only_the_tracker():
    checkpointing.model_parallel_cuda_manual_seed(3)
    default = torch.get_rng_state()
    checkpointing.model_parallel_reconfigure_tp_seed(50)
    assert torch.equal(torch.get_rng_state(), default)
    state = rng.get_cuda_rng_tracker().get_states()[rng.MODEL_PARALLEL_RNG_TRACKER_NAME]
    assert torch.equal(state, torch.Generator().manual_seed(50 + 2718).get_state())


# -- through the trainer ------------------------------------------------------------------------------
MEGATRON = ["model._target_=megatron_style.MegatronGPT", "allowed_targets=[megatron_style]", "model.dropout=0.1"]


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="model's own checkpointing"),
    pytest.param(["ckpt.full=true"], id="and ckpt.full", marks=pytest.mark.slow),
])
def test_trainer_runs_a_megatron_style_model_bit_identically(tmp_path, monkeypatch, overrides):
    """train() with the model's checkpoint calls on equals train() with them off: same losses, same weights."""
    from ds_hydra.training.trainer import train

    cfg = compose([*TINY, *MEGATRON, "trainer.max_steps=4", "trainer.eval_interval=0", *overrides])
    losses, weights = {}, {}
    for use in (True, False):
        monkeypatch.setattr(megatron_style, "USE_CHECKPOINTING", use)
        train(cfg, run_dir=tmp_path / str(use))
        records = [json.loads(line) for line in (tmp_path / str(use) / "metrics.jsonl").read_text().splitlines()]
        losses[use] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]
        weights[use] = torch.load(tmp_path / str(use) / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    assert losses[True] == losses[False] and len(losses[True]) >= 2
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    assert checkpointing.is_configured()  # the run configured the module


@pytest.mark.slow  # a subprocess: ~8 s
def test_cli_trains_it_with_the_runs_ckpt_settings(tmp_path):
    run = run_cli(tiny_run_args(tmp_path / "run", "model._target_=tests.megatron_style.MegatronGPT",
                                "allowed_targets=[tests.megatron_style]", "ckpt=deepspeed", "ckpt.number_checkpoints=null",
                                "ckpt.profile=true", "ckpt.cpu_checkpointing=true", "ckpt.partition_activations=true"))
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "run" / "ds_hydra.log").read_text()
    assert "checkpointing.profile: 4 checkpointed calls" in log
    assert "ckpt.partition_activations=true: DeepSpeed splits each checkpoint's inputs" in log
    assert "the inputs are in host memory already" in log
