"""Peak memory of fine-tuning a Llama: full, LoRA, LoRA + activation checkpointing, QLoRA, through ds_hydra,
side by side with the plain transformers + peft loop users would write instead.

    python bench/adapter_memory.py                          # SmolLM2-135M's shape, B=4, T=256, fp32 (~10 min, 5 GiB)
    python bench/adapter_memory.py --small                  # a 4-layer Llama, seconds
    python bench/adapter_memory.py --only lora --plain      # ds_hydra's lora cases and the plain loop's

Each case is its own process (``python -m ds_hydra`` for ours, this file's ``--plain-case`` for the plain
loop) and runs ``--steps`` optimizer steps (AdamW, the first creates the optimizer state); the number is the
process's peak resident memory (``ru_maxrss``, with the interpreter, torch and the model): what a user sees
in ``top``. The base model is a random initialisation of the shape, written once with ``save_pretrained``
(no download) and read through ``model.pretrained``, as a user fine-tunes a local model.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), random weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)

LORA = ["adapter=lora", "adapter.r=8", "adapter.target_modules=[q_proj,v_proj]"]
CASES = {  # name -> ds_hydra overrides
    "full": [],
    "lora r=8 q,v": LORA,
    "lora r=8 q,v + ckpt=full": [*LORA, "ckpt=full"],
    "qlora nf4 r=8 q,v + ckpt=full": [*LORA, "ckpt=full", "model.quantize=nf4"],
}
PLAIN = {"full": dict(lora=False, ckpt=False), "lora r=8 q,v": dict(lora=True, ckpt=False),
         "lora r=8 q,v + ckpt=full": dict(lora=True, ckpt=True)}


def write_base(folder: Path, shape: dict) -> None:
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(folder)


def run_ds_hydra(name: str, overrides, base: Path, batch: int, seq_len: int, steps: int, out: Path) -> float:
    args = [sys.executable, "-m", "ds_hydra", "model=hf_causal_lm", f"model.pretrained={base}", *overrides,
            f"trainer.batch_size={batch}", f"data.seq_len={seq_len}", f"trainer.max_steps={steps}", "trainer.eval_interval=0",
            "trainer.eval_batches=1", "trainer.log_interval=1", "trainer.device=cpu", "trainer.compile=false",
            "trainer.progress=false", "run.memory_check=off", "optimizer.lr=1e-4", f"hydra.run.dir={out / re.sub(r'[^A-Za-z0-9]+', '_', name)}"]
    return _peak_of(args, name)


def run_plain(name: str, base: Path, batch: int, seq_len: int, steps: int) -> float:
    spec = PLAIN[name]
    args = [sys.executable, __file__, "--plain-case", str(base), str(batch), str(seq_len), str(steps),
            str(int(spec["lora"])), str(int(spec["ckpt"]))]
    return _peak_of(args, f"plain {name}")


def _peak_of(args, name: str) -> float:
    """Run ``args`` alone and return its peak RSS in GiB (the largest of the children waited for so far)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")][-1]
    return kb / 2**20


def plain_case(base: str, batch: int, seq_len: int, steps: int, lora: bool, ckpt: bool) -> None:
    """The loop a user writes with transformers and peft: AdamW, fp32, one batch of random tokens."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        if ckpt:
            model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 4-layer Llama instead of SmolLM2-135M's shape")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--plain", action="store_true", help="also run the plain transformers + peft loop")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--plain-case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_case:
        base, batch, seq_len, steps, lora, ckpt = args.plain_case
        plain_case(base, int(batch), int(seq_len), int(steps), bool(int(lora)), bool(int(ckpt)))
        return
    shape = SMALL if args.small else SMOLLM2_135M
    work = Path(tempfile.mkdtemp(prefix="adapter_memory_"))
    base = work / "base"
    write_base(base, shape)
    label = "4-layer Llama" if args.small else "SmolLM2-135M shape"
    print(f"{label}, B={args.batch}, T={args.seq_len}, fp32, {args.steps} AdamW steps: peak RSS of the process (GiB)")
    print("| case | ds_hydra | plain transformers + peft |\n|---|---|---|")
    for name, overrides in CASES.items():
        if args.only not in name:
            continue
        ours = run_ds_hydra(name, overrides, base, args.batch, args.seq_len, args.steps, work / "runs")
        plain = run_plain(name, base, args.batch, args.seq_len, args.steps) if args.plain and name in PLAIN else None
        print(f"| {name} | {ours:.2f} | {'-' if plain is None else f'{plain:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
