"""Memory of a training step in bytes per parameter, Llama shapes from 0.1B up, per memory mode, side by side.

    python bench/memory_scale.py estimate                  # every shape x mode: ds_hydra's estimate (fake tensors, ~1 min)
    python bench/memory_scale.py measure --shape 135M --mode adamw_fp32 --runner ds_hydra   # one real step, a child
    python bench/memory_scale.py small                     # every mode and runner measured on the small shape
    python bench/memory_scale.py largest --limit-gib 16    # per mode: the largest shape whose estimate fits, one real step

Modes (``MODES``): full AdamW in fp32; bf16 weights + 8-bit AdamW (bitsandbytes); the same with the
optimizer step inside backward; LoRA (r 8 on q_proj, v_proj) on a bf16 base; QLoRA (the base stored
in nf4, fp32 compute). Runners: ds_hydra (its Trainer, the estimate from its memory preflight) and
transformers' Trainer (``optim=adamw_torch`` / ``adamw_bnb_8bit``, + peft for LoRA; it has no
optimizer-in-backward; its QLoRA loads a saved model through bitsandbytes, not measured here).

A measurement runs in a child process: the model and trainer are built, the process's peak resident
memory (VmHWM) is reset (``/proc/self/clear_refs``), one training step runs (optimizer state created
in it), and the peak is read again: ``peak`` is the whole process (Python, torch, libraries included),
``bytes/param`` is the step's own bytes over the parameters: the peak less the resident size just
before the step, plus the weights (what the estimate counts: weights, gradients, optimizer state,
activations; the libraries and the interpreter are left out). Sequences are short (batch 1 x 64 tokens, per-block
checkpointing), so weights, gradients and optimizer state are what is compared. On a CPU without
bf16 arithmetic, bf16 steps are slow: measure them on small shapes. One measurement at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

GiB = 2**30
BATCH, SEQ = 1, 64

# name -> (hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings): published Llama-family shapes
SHAPES = {
    "135M": (576, 30, 1536, 9, 3, 49152, True),  # SmolLM2-135M
    "360M": (960, 32, 2560, 15, 5, 49152, True),  # SmolLM2-360M
    "0.5B": (896, 24, 4864, 14, 2, 151936, True),  # Qwen2.5-0.5B's shape (a Llama block)
    "1.2B": (2048, 16, 8192, 32, 8, 128256, True),  # Llama-3.2-1B
    "1.7B": (2048, 24, 8192, 32, 32, 49152, True),  # SmolLM2-1.7B
    "3.2B": (3072, 28, 8192, 24, 8, 128256, True),  # Llama-3.2-3B
    "6.7B": (4096, 32, 11008, 32, 32, 32000, False),  # Llama-2-7B
    "13B": (5120, 40, 13824, 40, 40, 32000, False),  # Llama-2-13B
}
SMALL = "small"  # 8M parameters: where bf16 steps are measured on this CPU
SHAPES_SMALL = {SMALL: (256, 8, 704, 4, 2, 8192, True)}

MODES = {
    "adamw_fp32": {"ds_hydra": ["optimizer=adamw"], "hf": {"optim": "adamw_torch", "dtype": "float32"}},
    "bf16_adamw8bit": {"ds_hydra": ["optimizer=adamw8bit", "model.dtype=bf16"], "hf": {"optim": "adamw_bnb_8bit", "dtype": "bfloat16"}},
    "bf16_adamw8bit_in_backward": {"ds_hydra": ["optimizer=adamw8bit", "model.dtype=bf16", "trainer.optimizer_in_backward=true"], "hf": None},
    "lora_bf16": {"ds_hydra": ["adapter=lora", "model.dtype=bf16"], "hf": {"optim": "adamw_torch", "dtype": "bfloat16", "lora": True}},
    "qlora_nf4": {"ds_hydra": ["adapter=lora", "model.quantize=nf4"], "hf": None},  # fp32 compute over nf4 storage
}


def shape_overrides(shape: str):
    hidden, layers, inter, heads, kv, vocab, tied = {**SHAPES, **SHAPES_SMALL}[shape]
    return [
        "model=hf_llama", f"model.config.hidden_size={hidden}", f"model.config.num_hidden_layers={layers}",
        f"model.config.intermediate_size={inter}", f"model.config.num_attention_heads={heads}",
        f"model.config.num_key_value_heads={kv}", f"model.config.tie_word_embeddings={str(tied).lower()}",
        f"model.config.max_position_embeddings={SEQ}",
        "data=synthetic", f"data.vocab_size={vocab}", f"data.seq_len={SEQ}", "data.num_tokens=4096",
    ]


def ds_hydra_overrides(shape: str, mode: str):
    return [*shape_overrides(shape), *MODES[mode]["ds_hydra"], f"trainer.batch_size={BATCH}", "trainer.grad_clip=0",
            "trainer.device=cpu", "trainer.compile=false", "trainer.progress=false", "ckpt=full", "run.memory_check=off",
            "trainer.max_steps=1", "trainer.eval_batches=1"]


def estimate(shape: str, mode: str):
    from conftest import compose

    from ds_hydra.training.memory_estimate import estimate_step_memory
    from ds_hydra.training.memory_preflight import step_spec

    return estimate_step_memory(step_spec(compose(ds_hydra_overrides(shape, mode))))


# -- one real step in this process (the child) -----------------------------------------------------------
def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset the peak resident size (VmHWM) to the current one (Linux >= 4.0); returns the current one."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def child_measure(shape: str, mode: str, runner: str) -> dict:
    import torch

    torch.manual_seed(0)
    base = _status("VmRSS")
    if runner == "ds_hydra":
        from conftest import compose

        from ds_hydra.training.trainer import Trainer

        cfg = compose(ds_hydra_overrides(shape, mode))
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir))
            n_params = sum(p.numel() for p in trainer.model.parameters())
            weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            before = _reset_peak()
            started = time.perf_counter()
            loss = float(trainer.train_step())
    else:
        n_params, weights, loss, started, before = _hf_trainer_step(shape, mode)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    step = peak - before + weights  # the step's growth over the resident weights, plus the weights
    return {"shape": shape, "mode": mode, "runner": runner, "params": n_params, "peak": peak, "base": base,
            "step_bytes": step, "bytes_per_param": step / n_params, "loss": loss, "step_s": seconds}


def _hf_trainer_step(shape: str, mode: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    hidden, layers, inter, heads, kv, vocab, tied = {**SHAPES, **SHAPES_SMALL}[shape]
    setting = MODES[mode]["hf"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=SEQ,
                         use_cache=False)
    dtype = getattr(torch, setting["dtype"])
    model = LlamaForCausalLM(config).to(dtype)
    if setting.get("lora"):  # peft's LoRA with ds_hydra's adapter defaults (r 8, alpha 16, Llama's q_proj, v_proj)
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = torch.randint(0, vocab, (8, SEQ))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=1, optim=setting["optim"],
                                 use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                                 gradient_checkpointing=True, max_grad_norm=0.0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        n_params = sum(p.numel() for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        before = _reset_peak()
        started = time.perf_counter()
        result = trainer.train()
    return n_params, weights, float(result.training_loss), started, before


# -- the parent ---------------------------------------------------------------------------------------
def measure(shape: str, mode: str, runner: str, limit_gib: float = 16.0, timeout: float = 3600) -> dict:
    """One real step in a nice'd child process, its address space capped at ``limit_gib`` + 2 GiB of
    libraries; the child's JSON line, or {"error": ...}."""
    cap = int((limit_gib + 2) * GiB)
    cmd = ["nice", "-n", "19", "prlimit", f"--as={cap * 4}", sys.executable, __file__, "measure", "--shape", shape,
           "--mode", mode, "--runner", runner, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"shape": shape, "mode": mode, "runner": runner, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}


def row(result: dict, est=None) -> str:
    if "error" in result:
        return f"| {result['shape']} | {result['mode']} | {result['runner']} | failed: {result['error']} |"
    est_text = f"{est.total / result['params']:.2f}" if est is not None else "-"
    return (f"| {result['shape']} | {result['mode']} | {result['runner']} | {result['params'] / 1e6:.0f}M | "
            f"{result['peak'] / GiB:.2f} | {result['bytes_per_param']:.2f} | {est_text} | {result['step_s']:.1f} |")


HEADER = ("| shape | mode | runner | params | peak GiB (process) | measured bytes/param | estimate bytes/param | step s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["estimate", "measure", "small", "largest"])
    ap.add_argument("--shape", default=SMALL)
    ap.add_argument("--mode", default="adamw_fp32", choices=list(MODES))
    ap.add_argument("--runner", default="ds_hydra", choices=["ds_hydra", "hf"])
    ap.add_argument("--limit-gib", type=float, default=16.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="estimate: these shapes")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    if args.what == "measure":
        result = child_measure(args.shape, args.mode, args.runner)
        print(json.dumps(result) if args.json else row(result), flush=True)
        return 0
    modes = args.modes.split(",")
    if args.what == "estimate":
        print("| shape | params | " + " | ".join(f"{m} bytes/param (GiB)" for m in modes) + " |")
        print("|---|---:|" + "---:|" * len(modes))
        for shape in [SMALL, *args.shapes.split(",")]:
            cells, n = [], None
            for mode in modes:
                est = estimate(shape, mode)
                n = n or est.parameters // (4 if mode == "adamw_fp32" else 2)
                cells.append(f"{est.total / n:.2f} ({est.total / GiB:.1f})")
            print(f"| {shape} | {n / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)
        return 0
    print(HEADER)
    if args.what == "small":
        for mode in modes:
            est = estimate(SMALL, mode)
            for runner in ("ds_hydra", "hf"):
                if runner == "hf" and MODES[mode]["hf"] is None:
                    continue
                print(row(measure(SMALL, mode, runner, args.limit_gib), est), flush=True)
        return 0
    limit = args.limit_gib * GiB
    for mode in modes:  # largest: by the estimate, then one real step confirms it
        fitting = [s for s in SHAPES if estimate(s, mode).total <= limit - 1 * GiB]  # 1 GiB for the process itself
        if not fitting:
            print(f"| - | {mode} | no shape fits |")
            continue
        shape = fitting[-1]
        result = measure(shape, mode, "ds_hydra", args.limit_gib, timeout=5400)
        print(row(result, estimate(shape, mode)) + (" fits" if "peak" in result and result["peak"] <= limit else " OVER"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
