"""Generation speed with and without the KV cache, side by side in one run (compare ratios, not times).

    python bench/inference.py                      # trains a nanoGPT-CPU model briefly, then measures
    python bench/inference.py outputs/<date>/<time> # measures a trained run (e.g. experiment=nanogpt_cpu)
    python bench/inference.py --batch 1 --batch 8 --tokens 256 --rounds 5

The model is nanoGPT's CPU configuration (4 layers, 4 heads, 128 wide, block 64, Tiny Shakespeare
characters). For each batch size the cached and the uncached loop generate ``--tokens`` new tokens
with the same seed and sampling settings, in interleaved rounds so machine noise hits both alike; the
table shows the median and best tokens/s of each and the ratio (target: >= 3x at 256 tokens on CPU).
Past block_size the cached loop re-prefills half a window (see ds_hydra/inference/generate.py), so
the two loops' texts agree only within the first block_size tokens; the check column says whether they do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

NANOGPT_CPU = [
    "experiment=nanogpt_cpu",
    "trainer.eval_interval=0",
    "trainer.eval_batches=20",
    "trainer.log_interval=100",
    "trainer.progress=false",
]


def train_quickly(steps: int, run_dir: Path) -> Path:
    """``python -m ds_hydra experiment=nanogpt_cpu`` for ``steps`` steps (in process), into ``run_dir``."""
    from conftest import compose

    from ds_hydra.training.trainer import train

    cfg = compose([*NANOGPT_CPU, f"trainer.max_steps={steps}", f"scheduler.total_steps={steps}"])
    started = time.perf_counter()
    final = train(cfg, run_dir=run_dir)
    print(f"trained {steps} steps in {time.perf_counter() - started:.0f} s: val loss {final['val_loss']:.3f} ({run_dir})")
    return run_dir


def measure(run, batch: int, tokens: int, rounds: int, seed: int, prompt: str):
    import torch

    from ds_hydra.inference.generate import encode_prompt, timed_generate

    ids = encode_prompt(run.data, prompt, run.model.vocab_size)
    prompt_t = torch.tensor([ids] * batch, dtype=torch.long, device=run.device)
    sampling = dict(temperature=0.8, top_k=200)
    times = {True: [], False: []}
    outputs = {}
    timed_generate(run.model, prompt_t, 8, run.device, seed, kv_cache=True, **sampling)  # warm-up
    timed_generate(run.model, prompt_t, 8, run.device, seed, kv_cache=False, **sampling)
    for _ in range(rounds):
        for kv_cache in (True, False):
            out, seconds = timed_generate(run.model, prompt_t, tokens, run.device, seed, kv_cache=kv_cache, **sampling)
            times[kv_cache].append(seconds)
            outputs[kv_cache] = out
    within = min(outputs[True].size(1), run.model.block_size)
    same = bool(torch.equal(outputs[True][:, :within], outputs[False][:, :within]))
    produced = batch * tokens
    row = {
        "batch": batch,
        "tokens": tokens,
        "kv_tok_s_median": produced / statistics.median(times[True]),
        "no_cache_tok_s_median": produced / statistics.median(times[False]),
        "kv_tok_s_best": produced / min(times[True]),
        "no_cache_tok_s_best": produced / min(times[False]),
        "ratio_median": statistics.median(times[False]) / statistics.median(times[True]),
        "ratio_best": min(times[False]) / min(times[True]),
        "same_within_block": same,
    }
    return row, run.data.decode(outputs[True][0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a trained run directory (default: train one briefly)")
    parser.add_argument("--steps", type=int, default=500, help="training steps when no run dir is given")
    parser.add_argument("--keep", metavar="DIR", help="train into DIR and keep it (default: a temporary dir)")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sample")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1 and 8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per batch size")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: a 0.8M-parameter model gains nothing from more, "
                             "and one thread keeps numbers stable on a shared machine; 0: torch's default)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON lines")
    args = parser.parse_args()

    import torch

    from ds_hydra.inference.loading import load_run

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.keep:
        run_dir = train_quickly(args.steps, Path(args.keep))
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ds_hydra_bench_inference_")
        run_dir = train_quickly(args.steps, Path(tmp.name) / "run")
    run = load_run(str(run_dir), device="cpu", dtype="fp32")
    m = run.model
    print(
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, block {m.block_size}, "
        f"{m.num_params() / 1e6:.2f}M parameters; step {run.step}; cpu fp32, {torch.get_num_threads()} thread(s); "
        f"torch {torch.__version__}"
    )
    rows, sample = [], None
    for batch in args.batch or [1, 8]:
        row, text = measure(run, batch, args.tokens, args.rounds, args.seed, args.prompt)
        rows.append(row)
        sample = sample or text
    header = f"{'batch':>5} {'tokens':>6} | {'KV cache tok/s':>15} {'no cache tok/s':>15} | {'ratio':>6} | {'best: KV':>9} {'no cache':>9} {'ratio':>6} | same<=block"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['batch']:>5} {r['tokens']:>6} | {r['kv_tok_s_median']:>15.0f} {r['no_cache_tok_s_median']:>15.0f} | "
            f"{r['ratio_median']:>5.2f}x | {r['kv_tok_s_best']:>9.0f} {r['no_cache_tok_s_best']:>9.0f} {r['ratio_best']:>5.2f}x | "
            f"{r['same_within_block']}"
        )
    print("(medians over rounds; target: KV cache >= 3x at 256 tokens)")
    print(f"\nsample (KV cache, batch row 0, {args.tokens} new tokens):\n{sample}")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
