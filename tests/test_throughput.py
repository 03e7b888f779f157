"""Throughput accounting: the FLOP formula against torch's FlopCounterMode, the GPU peak table, MFU in
the trainer's metrics, the compiled path on CPU, and the GPU benchmark script's search and smoke run."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, TINY, compose
from ds_hydra.errors import UserError
from ds_hydra.models.gpt import GPT
from ds_hydra.training import throughput as tp
from ds_hydra.devices import resolve_precision
from ds_hydra.models.contract import CausalLMLoss
from ds_hydra.training.trainer import OLD_DYNAMO, Trainer, train


def _norm_params(model: GPT) -> int:
    """Parameters that are no matmul weight (norm gains; biases would be too): in 6N, not in the counter."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2)


def _count_train_flops(model: GPT, batch: int, math_attention: bool):
    """FlopCounterMode's FLOPs of one forward + backward, by aten op."""
    x = torch.randint(model.vocab_size, (batch, model.block_size), device=next(model.parameters()).device)
    y = torch.randint(model.vocab_size, (batch, model.block_size), device=x.device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext(), counter:
        CausalLMLoss()(model(x), y).backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


# -- the formula --------------------------------------------------------------------------------
def test_gpt2_124m_flops_match_the_counter_up_to_norm_gains():
    """6N + 12 L d T against torch's counter, for the shipped gpt2_124m preset (on the meta device).

    Matmuls (aten.mm) are 6 FLOPs per matmul weight per token, including the padded, tied lm_head;
    attention (aten.bmm, full T x T like the formula) is 12 L d T. The only gap is the 6 FLOPs per
    token that 6N charges for each norm gain (25 x 768 of them): 115,200 of 854.8M per token.
    """
    cfg = compose(["model=gpt2_124m"])
    m = cfg.model
    with torch.device("meta"):
        model = GPT(m.vocab_size, m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias, m.pad_vocab_to)
    assert model.wte.weight.shape[0] == 50304  # 50257 padded to a multiple of 64
    batch, T = 2, m.block_size
    counted = _count_train_flops(model, batch, math_attention=True)
    tokens = batch * T
    N = model.num_params()
    formula = tp.model_flops_per_token(model, m.block_size)
    assert N == 123_587_328
    assert formula == 6 * N + 12 * 12 * 768 * 1024 == 854_770_176
    assert counted["aten.mm"] == 6 * (N - _norm_params(model)) * tokens
    assert counted["aten.bmm"] == 12 * m.n_layer * m.n_embd * T * tokens
    counter_per_token = sum(counted.values()) / tokens
    assert formula - counter_per_token == 6 * _norm_params(model) == 115_200
    assert (formula - counter_per_token) / formula < 2e-4


@pytest.mark.parametrize("bias", [False, True])
def test_tiny_gpt_flops_on_real_tensors(bias):
    """The same identity on a CPU model with real data; with biases the gap is norms plus biases.

    On CPU the default SDPA kernel (flash attention for CPU) has no FLOP formula in the counter, so
    only the math kernel shows attention's FLOPs; the matmul count is the same either way.
    """
    torch.manual_seed(0)
    model = GPT(vocab_size=65, n_layer=3, n_head=2, n_embd=32, block_size=16, bias=bias, pad_vocab_to=64)
    tokens = 3 * 16
    N, L, d, T = model.num_params(), 3, 32, 16
    exact = _count_train_flops(model, 3, math_attention=True)
    assert exact["aten.mm"] + exact.get("aten.addmm", 0) == 6 * (N - _norm_params(model)) * tokens
    assert exact["aten.bmm"] == 12 * L * d * T * tokens
    assert tp.model_flops_per_token(model, T) * tokens - sum(exact.values()) == 6 * _norm_params(model) * tokens
    fused = _count_train_flops(model, 3, math_attention=False)
    matmuls = fused.get("aten.mm", 0) + fused.get("aten.addmm", 0)
    assert matmuls == 6 * (N - _norm_params(model)) * tokens
    assert sum(fused.values()) - matmuls in (0, 12 * L * d * T * tokens)  # 0: kernel not counted


def test_formula_terms():
    assert tp.transformer_flops_per_token(n_params=1000, n_layer=2, d_model=8, seq_len=4) == 6000 + 12 * 2 * 8 * 4


class TinyLM(torch.nn.Module):
    """A model that states no transformer shape: its FLOPs are measured, not estimated."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))))


def test_models_without_a_stated_shape_are_measured_once():
    model = TinyLM()
    T = 12
    counter = FlopCounterMode(display=False)
    with counter:
        CausalLMLoss()(model(torch.randint(40, (1, T))), torch.randint(40, (1, T))).backward()
    assert tp.transformer_shape(model) is None
    assert tp.model_flops_per_token(model, T) == counter.get_total_flops() // T == 6 * (16 * 16 + 16 * 40)  # matmul weights
    assert all(p.device.type == "cpu" for p in model.parameters())  # measured on a meta copy


def test_matmul_params_leave_out_lookup_only_tables():
    """Tied tables count once (the output matmul pays for them); position and untied input tables don't."""
    tied = GPT(vocab_size=65, n_layer=1, n_head=2, n_embd=16, block_size=8)
    assert tp.matmul_params(tied) == tied.num_params()  # nanoGPT's count: all but the position table
    untied = TinyLM()
    assert tp.matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - 40 * 16


def test_hf_models_take_their_shape_from_the_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    N = sum(p.numel() for p in model.parameters()) - 65 * 32  # the input embedding is a lookup
    assert tp.transformer_shape(model) == (2, 32)
    assert tp.model_flops_per_token(model, 16) == 6 * N + 12 * 2 * 32 * 16


# -- peaks and MFU ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device_name, expected, bf16, fp16",
    [
        ("NVIDIA H200", "H200 SXM", 989.4, 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5, 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4, 989.4),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5, 835.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0, 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0, 312.0),
        ("NVIDIA L4", "L4", 121.0, 121.0),
        ("NVIDIA L40S", "L40S", 362.1, 362.1),
        ("NVIDIA A10G", "A10G", 125.0, 125.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2, 165.2),
        ("Tesla V100-SXM2-16GB", "V100 SXM2", None, 125.0),
        ("Tesla V100-PCIE-32GB", "V100 PCIe", None, 112.0),
        ("Tesla T4", "T4", None, 65.0),
    ],
)
def test_peak_table_lookup(device_name, expected, bf16, fp16):
    entry = tp.lookup_gpu(device_name)
    assert (entry.name, entry.bf16, entry.fp16) == (expected, bf16, fp16)


def test_unknown_gpu_and_cpu_have_no_peak(monkeypatch):
    assert tp.lookup_gpu("NVIDIA GeForce GTX 1080") is None
    assert tp.peak_flops(torch.device("cpu"), None) is None
    assert tp.peak_flops(torch.device("cpu"), None, override_tflops=2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert tp.peak_flops(torch.device("cuda"), torch.bfloat16) is None


def test_peak_follows_the_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert tp.peak_flops(cuda, torch.bfloat16) == pytest.approx(989.4e12)
    assert tp.peak_flops(cuda, torch.float16) == pytest.approx(989.4e12)
    matmul, previous = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # set and restored by hand: torch < 2.5 serves this flag from __getattr__, which monkeypatch cannot undo
        matmul.allow_tf32 = True
        assert tp.peak_flops(cuda, None) == pytest.approx(494.7e12)  # fp32 matmuls run as TF32
        matmul.allow_tf32 = False
        assert tp.peak_flops(cuda, None) is None  # plain fp32 has no tensor-core entry
    finally:
        matmul.allow_tf32 = previous
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert tp.peak_flops(cuda, torch.bfloat16) is None  # no bf16 tensor cores: no MFU rather than a wrong one


def test_mfu_and_metrics_on_cpu():
    meter = tp.Throughput(flops_per_token=1_000_000_000, peak=1e15, device=torch.device("cpu"))
    assert meter.mfu(100_000) == pytest.approx(0.1)
    assert meter.metrics(100_000) == {"tokens_per_s": 100_000, "mfu": pytest.approx(0.1)}  # no CUDA memory
    assert tp.Throughput(1_000, None, torch.device("cpu")).metrics(5.0) == {"tokens_per_s": 5.0}


def test_auto_precision_per_gpu_generation(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_precision("auto", torch.device("cuda")) is torch.float16  # V100: fp16 with loss scaling


# -- the trainer ----------------------------------------------------------------------------------
def test_train_logs_tokens_flops_and_mfu(tmp_path):
    """MFU = flops_per_token * tokens/s / peak in every log record and in train()'s final metrics."""
    from ds_hydra.training.metrics import read_metrics

    cfg = compose([*TINY, "trainer.peak_tflops=0.5"])
    final = train(cfg, tmp_path / "run")
    m = cfg.model
    n_params = GPT(65, m.n_layer, m.n_head, m.n_embd, m.block_size).num_params()
    flops = 6 * n_params + 12 * m.n_layer * m.n_embd * m.block_size
    assert final["flops_per_token"] == flops
    assert final["mfu"] == pytest.approx(flops * final["tokens_per_s"] / 0.5e12)
    assert "peak_memory_gib" not in final  # CPU: no allocator statistics
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(logged) == 3 and all(r["tokens_per_s"] > 0 for r in logged)
    for r in logged:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 0.5e12)


def test_cpu_trainer_reports_no_mfu_without_a_peak(tmp_path):
    trainer = Trainer(compose(TINY), tmp_path)
    assert trainer.throughput.peak_flops is None and trainer.throughput.flops_per_token > 0
    assert trainer.throughput.metrics(123.0) == {"tokens_per_s": 123.0}


def test_bad_peak_and_small_vocab_are_user_errors(tmp_path):
    from ds_hydra.validation import config_problems

    problems = config_problems(compose([*TINY, "trainer.peak_tflops=-1", "model.head_chunk_tokens=-2"]))
    assert any(p.startswith("trainer.peak_tflops=-1") and "must be > 0" in p for p in problems)
    assert any(p.startswith("model.head_chunk_tokens=-2: must be >= 0") for p in problems)
    with pytest.raises(UserError, match=r"model.vocab_size=10: the data has 65 distinct tokens"):
        Trainer(compose([*TINY, "model.vocab_size=10"]), tmp_path)


def test_padded_vocab_logits_are_the_real_vocabulary():
    """The padding columns never leave the model; the trainer's loss is cross-entropy over the real vocabulary."""
    torch.manual_seed(0)
    model = GPT(vocab_size=65, n_layer=1, n_head=2, n_embd=16, block_size=8, pad_vocab_to=64)
    x, y = torch.randint(65, (2, 8)), torch.randint(65, (2, 8))
    logits = model(x)
    assert logits.shape == (2, 8, 65)
    assert model.lm_head.weight.shape[0] == 128
    assert torch.equal(CausalLMLoss()(logits, y), F.cross_entropy(logits.reshape(-1, 65), y.reshape(-1)))
    y[0, :3] = -100  # ignored positions carry no loss: the mean is over the rest
    assert torch.equal(CausalLMLoss()(logits, y), F.cross_entropy(logits.reshape(-1, 65), y.reshape(-1), ignore_index=-100))
    y[:] = -100
    assert CausalLMLoss()(logits, y).item() == 0.0  # no labelled position: zero, not NaN


def _saved_bytes_and_grads(model: GPT, x, y):
    """Bytes autograd saves in the forward (distinct storages), the loss and every gradient."""
    from torch.autograd.graph import saved_tensors_hooks

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        output = model(x)
        loss = CausalLMLoss()(output, y)
    loss.backward()
    logits = output if isinstance(output, torch.Tensor) else None
    return sum(storages.values()), logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [64, 100])  # whole sequences, and chunks that straddle them
def test_chunked_head_same_loss_and_gradients_without_holding_logits(chunk):
    B, T, V = 4, 64, 500
    x = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(1))
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(2))
    runs = {}
    for tokens in (0, chunk):
        torch.manual_seed(0)
        model = GPT(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=T, pad_vocab_to=64, head_chunk_tokens=tokens)
        runs[tokens] = _saved_bytes_and_grads(model, x, y)
    (whole, logits, loss, grads), (chunked, no_logits, chunk_loss, chunk_grads) = runs[0], runs[chunk]
    assert logits.shape == (B, T, V) and no_logits is None
    assert chunk_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-5, atol=1e-7)
    assert whole - chunked >= B * T * V * 4  # the fp32 logits (B, T, V) are no longer held for backward


def test_gpt2_124m_preset_composes():
    cfg = compose(["experiment=gpt2_124m"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (12, 12, 768, 1024)
    assert (cfg.model.vocab_size, cfg.model.pad_vocab_to, cfg.data.vocab_size) == (50257, 64, 50257)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    """torch.compile on CPU: same losses as eager, and 10 blocks (more than dynamo's default cache of 8
    graphs per function) share their graphs instead of falling back to eager past the limit."""
    from torch._dynamo.utils import counters

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = compose([*TINY, "model.n_layer=10", f"trainer.compile={str(compiled).lower()}"])
        trainer = Trainer(cfg, tmp_path / str(compiled))
        losses[compiled] = [trainer.train_step().item() for _ in range(4)] + [trainer.evaluate()["val_loss"]]
        if compiled:
            graphs = counters["stats"]["unique_graphs"]
            if OLD_DYNAMO:  # one graph per block (train and eval) and the loss's: all 10 compiled, none past the limit
                assert graphs == 2 * 10 + 2, graphs
            else:  # block and loss, each for training and for no-grad evaluation: not one graph per block
                assert 2 <= graphs <= 4, graphs
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-5)


# -- the GPU benchmark script ----------------------------------------------------------------------
def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit, guess", [(300, 280), (300, 330), (300, 40), (37, 200), (33, 33)])
def test_batch_search_finds_the_limit(limit, guess):
    bench = _gpu_bench()
    probed = []

    def probe(batch):
        probed.append(batch)
        return batch <= limit

    best, failed, tried = bench.largest_batch(probe, fits=32, guess=guess, max_probes=12)
    assert best <= limit and failed is not None and failed > limit
    assert failed - best <= max(1, int(best * 0.03))  # within the search's 3% tolerance
    assert tried == [(b, b <= limit) for b in probed] and len(set(probed)) == len(probed)


@pytest.mark.slow
def test_gpu_script_smoke_runs_on_cpu(tmp_path):
    """bench/gpu.sh --smoke end to end on the CPU: every section, one results file."""
    out = tmp_path / "gpu.md"
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(out), "--policies", "none,segments=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    raw = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert [r["policy"] for r in raw["throughput"]] == ["none", "segments=4"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in raw["throughput"])
    assert [r["max_batch"] for r in raw["max_batch"]] == [24, 24]  # the simulated limit
    assert raw["nanogpt"]["steps"] == 20 and math.isfinite(raw["nanogpt"]["best_val_loss"])


def test_a_slow_throughput_is_shown_with_its_digits_not_as_zero():
    from ds_hydra.training.trainer import tokens_per_s_text

    assert [tokens_per_s_text(r) for r in (0.0, 0.4213, 42.16, 100.4, 1234.4)] == ["0", "0.421", "42.2", "100", "1,234"]
