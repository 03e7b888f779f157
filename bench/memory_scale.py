"""Memory of a training step in bytes per parameter, Llama shapes from 0.1B up, per memory mode, side by side.

    python bench/memory_scale.py estimate                  # every shape x mode: ds_hydra's estimate (fake tensors, ~1 min)
    python bench/memory_scale.py measure --shape 135M --mode adamw_fp32 --runner ds_hydra   # real steps in a child
    python bench/memory_scale.py small                     # every mode and runner measured on the small shape
    python bench/memory_scale.py largest --limit-gib 16    # per mode: the largest shape whose estimate fits, real steps

Modes (``MODES``): full AdamW in fp32; bf16 weights + 8-bit AdamW (bitsandbytes); the same with the
optimizer step inside backward; LoRA (r 8 on q_proj, v_proj) on a bf16 base; QLoRA (the base stored
in nf4, fp32 compute). Runners: ds_hydra (its Trainer, the estimate from its memory preflight),
transformers' Trainer (``optim=adamw_torch`` / ``adamw_bnb_8bit``, + peft for LoRA; it has no
optimizer-in-backward; its QLoRA saves the random model and reads it back through ``from_pretrained`` with
bitsandbytes' nf4, as QLoRA recipes load a base) and
DeepSpeed's engine on its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo; no oneCCL or Intel extension
needed), ZeRO stage 0, the same optimizers passed in.

A measurement runs in a child process (at most one at a time; the parent kills it the moment its
resident size passes ``--kill-gib``): the model and trainer are built, two training steps run, and the
second is measured: the first creates the optimizer state (bitsandbytes creates each parameter's state
as it steps that parameter, so a first step's peak misses most of it) and sets up what libraries set up
once. ``bytes/param`` is what the step holds over the parameters: the weights and the optimizer state
resident before it (counted from the tensors) plus the growth of the peak resident size (VmHWM, reset
through ``/proc/self/clear_refs`` after glibc's ``malloc_trim``) over the resident size just before it
(gradients, activations, temporaries, and whatever the allocator keeps resident after freeing it);
``peak`` is the whole process (Python, torch, libraries included). Sequences are short (``--batch``,
``--seq``; per-block checkpointing), so weights, gradients and optimizer state are what is compared.

Threads: ``--threads 1`` (the default). On a shared 2-core machine, two torch threads make every op wait
for a core the other processes hold (an op of microseconds then takes a scheduler slice): a LoRA step
of the 135M shape in bf16, batch 1 x 32, took 23 s with 2 threads and 4.4 s with 1 (fp32: 5.3 s and
1.6 s). bf16 itself costs about 3x fp32 on a CPU without bf16 arithmetic (AVX-512 without
AVX512_BF16): oneDNN's bf16 matmuls (2.6x fp32's time at 32 rows), the bf16 sdpa kernel, and for 8-bit
AdamW bitsandbytes' CPU kernel, which dequantizes both moments to fp32 and requantizes them per tensor.
"""
from __future__ import annotations

import argparse
import ctypes
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
PRETRAINED = None  # --pretrained: the Trainer's QLoRA reads this model directory instead of a saved random model

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
    "qlora_nf4": {"ds_hydra": ["adapter=lora", "model.quantize=nf4"],  # fp32 compute over nf4 storage
                  "hf": {"optim": "adamw_torch", "dtype": "float32", "lora": True, "quantize": "nf4"}},
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
    """Reset the peak resident size (VmHWM) to the current one (Linux >= 4.0); returns the current one.
    Freed heap memory is handed back first (glibc's ``malloc_trim``), so that what an earlier phase
    freed but kept resident is not counted as in use."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


class StepPeaks:
    """The peak resident size of the last of ``steps`` training steps over the resident size just before
    it. The first step creates the optimizer state (bitsandbytes creates each parameter's as it steps
    it, so while it steps the first parameter the others have none yet: a first step's peak is lower
    than every later one's) and whatever libraries set up once (oneDNN's kernels, bitsandbytes' library:
    tens of MiB, not the step's); the last step is the one a long run repeats."""

    def __init__(self, steps: int, from_start: bool = False):
        self.steps, self.done, self.process_peak, self.from_start = steps, 0, 0, from_start
        self.before = _reset_peak()
        self.started = time.perf_counter()

    def step_done(self) -> None:
        self.done += 1
        self.process_peak = max(self.process_peak, _status("VmHWM"))
        if self.done < self.steps:  # the next step's peak is read alone, and so is its time
            before = _reset_peak()
            self.before = self.before if self.from_start else before
            self.started = time.perf_counter()
        else:
            self.peak, self.seconds = _status("VmHWM"), time.perf_counter() - self.started


def _unquantized_numel(p) -> int:
    from ds_hydra.models.adapters import unpacked_numel

    return unpacked_numel(p)


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (ds_hydra's in-backward optimizers, accelerate's wrapper)."""
    from ds_hydra.optim.state_size import state_bytes_by_parameter

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    total = 0
    for opt in getattr(optimizer, "per_parameter", [optimizer]):
        own, shared = state_bytes_by_parameter(opt)
        total += sum(own.values()) + shared
    return total


def child_measure(shape: str, mode: str, runner: str, steps: int = 2) -> dict:
    import torch

    torch.manual_seed(0)
    base = _status("VmRSS")
    if runner == "ds_hydra":
        from conftest import compose

        from ds_hydra.training.trainer import Trainer

        cfg = compose(ds_hydra_overrides(shape, mode))
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir))
            n_params = sum(_unquantized_numel(p) for p in trainer.model.parameters())
            weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
            load_peak = _status("VmHWM")  # building (and, for QLoRA, quantizing) the model, before any step
            peaks = StepPeaks(steps)
            for _ in range(steps):
                loss = float(trainer.train_step())
                peaks.step_done()
            state = _state_bytes(trainer.optimizer) if steps > 1 else 0
    elif runner == "deepspeed":
        load_peak = None
        n_params, weights, loss, peaks, state = _deepspeed_steps(shape, mode, steps)
    else:
        load_peak = None
        n_params, weights, loss, peaks, state = _hf_trainer_steps(shape, mode, steps)
    # what the step holds: the weights and the optimizer state resident before it (counted from the
    # tensors), and its own growth over the resident size before it (gradients, activations, temporaries)
    step = peaks.peak - peaks.before + weights + state
    return {"shape": shape, "mode": mode, "runner": runner, "params": n_params, "peak": peaks.process_peak, "base": base,
            "step_bytes": step, "bytes_per_param": step / n_params, "state_bytes": state, "loss": loss,
            "step_s": peaks.seconds, "load_peak": load_peak, "batch": BATCH, "seq": SEQ, "steps": steps, "threads": torch.get_num_threads()}


def _hf_model(shape: str, mode: str):
    """(transformers' Llama of the shape in the mode's dtype, + peft's LoRA where the mode has it; its vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab, tied = {**SHAPES, **SHAPES_SMALL}[shape]
    setting = MODES[mode]["hf"]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=SEQ,
                         use_cache=False)
    dtype = getattr(torch, setting["dtype"])
    if setting.get("quantize") and PRETRAINED:  # a shape too large to build whole first: its directory, read quantized
        model = _hf_quantized(None, dtype, folder=PRETRAINED)
        return _with_lora(model, setting), vocab
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy first
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if setting.get("quantize"):  # QLoRA as transformers does it: from_pretrained with a BitsAndBytesConfig
        model = _hf_quantized(model, dtype)
    return _with_lora(model, setting), vocab


def _with_lora(model, setting):
    """peft's LoRA with ds_hydra's adapter defaults (r 8, alpha 16, Llama's q_proj, v_proj), where the mode has it."""
    if not setting.get("lora"):
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _hf_quantized(model, dtype, folder=None):
    """``model`` saved and read back (or the model directory ``folder``) through ``from_pretrained`` with
    bitsandbytes' nf4 (double-quantized scales and fp32 compute, as ds_hydra's ``model.quantize=nf4``;
    transformers keeps ``lm_head`` unquantized, as ds_hydra does). The full-precision model is freed before the read."""
    import gc

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    if folder is not None:
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu", dtype=dtype)
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        del model
        gc.collect()
        return LlamaForCausalLM.from_pretrained(saved, quantization_config=quantization, device_map="cpu", dtype=dtype)


def _deepspeed_steps(shape: str, mode: str, steps: int):
    """DeepSpeed's engine on its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo, one process), ZeRO stage 0,
    the mode's optimizer passed in (DeepSpeed's own optimizer types JIT-compile a C++ op first), bf16 as
    DeepSpeed does it (its BF16_Optimizer: fp32 master weights and gradients), transformers' gradient
    checkpointing. The step is measured from before ``deepspeed.initialize``: what the engine adds counts."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch

    model, vocab = _hf_model(shape, mode)
    setting = MODES[mode]["hf"]
    model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if setting["optim"] == "adamw_bnb_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 0}, "bf16": {"enabled": setting["dtype"] == "bfloat16"}}
    n_params = sum(_unquantized_numel(p) for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = StepPeaks(steps, from_start=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        peaks.step_done()
    return n_params, weights, float(loss), peaks, 0


def _hf_trainer_steps(shape: str, mode: str, steps: int):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, vocab = _hf_model(shape, mode)
    setting = MODES[mode]["hf"]
    ids = torch.randint(0, vocab, (8 * steps, SEQ))
    data = [{"input_ids": row, "labels": row} for row in ids]

    class Peaks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            peaks.step_done()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, optim=setting["optim"],
                                 use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                                 gradient_checkpointing=True, max_grad_norm=0.0, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Peaks()])
        n_params = sum(_unquantized_numel(p) for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peaks = StepPeaks(steps)
        result = trainer.train()
        state = _state_bytes(trainer.optimizer) if steps > 1 else 0
    return n_params, weights, float(result.training_loss), peaks, state


# -- the parent ---------------------------------------------------------------------------------------
def measure(shape: str, mode: str, runner: str, limit_gib: float = 16.0, timeout: float = 3600, threads: int = 1,
            steps: int = 2) -> dict:
    """Real steps in a nice'd child process, killed as soon as its resident size passes ``limit_gib``
    (watched every 0.2 s: on a shared machine a shape that does not fit must not take the others'
    memory); the child's JSON line, or {"error": ...}."""
    cmd = ["nice", "-n", "19", sys.executable, __file__, "measure", "--child", "--shape", shape, "--mode", mode, "--runner", runner,
           "--batch", str(BATCH), "--seq", str(SEQ), "--steps", str(steps), "--threads", str(threads), "--json",
           *(["--pretrained", PRETRAINED] if PRETRAINED else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cap, over, started = limit_gib * GiB, 0, time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        while child.poll() is None:
            try:
                over = max(over, _child_rss(child.pid))
            except (OSError, KeyError):  # it just ended
                pass
            if over > cap or time.monotonic() - started > timeout:
                child.kill()
                child.wait()
                what = f"over {limit_gib:g} GiB resident" if over > cap else f"over {timeout:.0f} s"
                return {"shape": shape, "mode": mode, "runner": runner, "error": f"stopped: {what}"}
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "max_rss_sampled": over}  # the whole run's resident size, load included
    return {"shape": shape, "mode": mode, "runner": runner, "error": (stderr.strip().splitlines() or ["?"])[-1][:200]}


def _child_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def row(result: dict, est=None) -> str:
    if "error" in result:
        return f"| {result['shape']} | {result['mode']} | {result['runner']} | failed: {result['error']} |"
    est_text = f"{est.total / result['params']:.2f}" if est is not None else "-"
    return (f"| {result['shape']} | {result['mode']} | {result['runner']} | {result['params'] / 1e6:.0f}M | "
            f"{result['peak'] / GiB:.2f} | {result['bytes_per_param']:.2f} | {est_text} | {result['step_s']:.1f} |")


HEADER = ("| shape | mode | runner | params | peak GiB (process) | measured bytes/param | estimate bytes/param | step s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    global BATCH, SEQ, PRETRAINED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["estimate", "measure", "small", "largest"])
    ap.add_argument("--shape", default=SMALL)
    ap.add_argument("--mode", default="adamw_fp32", choices=list(MODES))
    ap.add_argument("--runner", default="ds_hydra", choices=["ds_hydra", "hf", "deepspeed"])
    ap.add_argument("--limit-gib", type=float, default=16.0, help="largest: the memory a shape must fit in")
    ap.add_argument("--kill-gib", type=float, default=None, help="a child is killed past this resident size (default: --limit-gib)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="estimate: these shapes")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--steps", type=int, default=2, help="real steps per measurement; the last one's peak is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the child (1: on a shared machine, threads that wait for a busy core "
                         "make each small op cost a scheduler slice)")
    ap.add_argument("--json", action="store_true", help="measure: print the child's JSON line")
    ap.add_argument("--pretrained", default=None,
                    help="measure, --runner hf, qlora_nf4: read this model directory (bench/write_llama_base.py) quantized, "
                         "for shapes too large to build whole first")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measure: run the steps in this process
    args = ap.parse_args(argv)
    BATCH, SEQ, PRETRAINED = args.batch, args.seq, args.pretrained
    kill = args.kill_gib or args.limit_gib
    import logging

    logging.disable(logging.WARNING)
    if args.what == "measure":
        if args.child:
            import torch

            torch.set_num_threads(args.threads)
            result = child_measure(args.shape, args.mode, args.runner, args.steps)
        else:
            result = measure(args.shape, args.mode, args.runner, kill, threads=args.threads, steps=args.steps)
        print(json.dumps(result) if args.json else row(result, estimate(args.shape, args.mode) if args.runner == "ds_hydra" and "error" not in result else None), flush=True)
        return 0
    modes = args.modes.split(",")
    if args.what == "estimate":
        print(f"batch {BATCH} x {SEQ} tokens, ckpt=full")
        print("| shape | params | " + " | ".join(f"{m} bytes/param (GiB)" for m in modes) + " |")
        print("|---|---:|" + "---:|" * len(modes))
        for shape in [SMALL, *args.shapes.split(",")]:
            n = parameter_count(shape)
            cells = [f"{est.total / n:.2f} ({est.total / GiB:.1f})" for est in (estimate(shape, mode) for mode in modes)]
            print(f"| {shape} | {n / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)
        return 0
    print(f"batch {BATCH} x {SEQ} tokens, ckpt=full, {args.threads} thread(s), the peak of step {args.steps} of {args.steps}")
    print(HEADER)
    if args.what == "small":
        for mode in modes:
            est = estimate(SMALL, mode)
            for runner in ("ds_hydra", "hf", "deepspeed"):
                if runner != "ds_hydra" and MODES[mode]["hf"] is None:
                    continue
                print(row(measure(SMALL, mode, runner, kill, threads=args.threads, steps=args.steps), est), flush=True)
        return 0
    limit = args.limit_gib * GiB
    for mode in modes:  # largest: by the estimate, then real steps confirm it
        fitting = [s for s in SHAPES if estimate(s, mode).total <= limit - 1 * GiB]  # 1 GiB for the process itself
        if not fitting:
            print(f"| - | {mode} | no shape fits |")
            continue
        shape = fitting[-1]
        result = measure(shape, mode, "ds_hydra", kill, timeout=5400, threads=args.threads, steps=args.steps)
        print(row(result, estimate(shape, mode)) + (" fits" if "peak" in result and result["peak"] <= limit else " OVER"), flush=True)
    return 0


def parameter_count(shape: str) -> int:
    """Parameters of the Llama shape (embeddings, attention with grouped KV heads, SwiGLU MLP, RMSNorms, head)."""
    hidden, layers, inter, heads, kv, vocab, tied = {**SHAPES, **SHAPES_SMALL}[shape]
    head_dim = hidden // heads
    block = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * block + hidden


if __name__ == "__main__":
    sys.exit(main())
