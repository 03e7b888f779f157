"""lm-evaluation-harness throughput: ds_hydra's harness model vs the harness's own ``hf`` model, same directory.

    python bench/harness.py                      # Llama d=256, L=4 on the CPU, batch 8, one thread (~6 min)
    python bench/harness.py --device cuda --hidden 1024 --layers 12 --docs 2000
    python bench/harness.py --rounds 1 --docs 100   # a quicker look

Both run the harness's ``simple_evaluate`` over the same local tasks (tests/lm_eval_tasks/: a
multiple-choice task repeated to ``--docs`` documents, the perplexity task to a fifth of that and the
generation task to a quarter)
on the same model directory (a tiny Llama saved with ``save_pretrained`` beside a tokenizer trained
here), with the same batch size and seed. ds_hydra loads the directory as ``task=lm_eval
model=hf_causal_lm model.pretrained=<dir>`` does. Printed per task: items (documents) per second
for each, their ratio, and whether the metrics agree; the best of interleaved rounds (timings on a
shared machine are noisy: read the ratios). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = {"ds_hydra_mc": "loglikelihood (multiple choice)", "ds_hydra_ppl": "loglikelihood_rolling (perplexity)",
         "ds_hydra_gen": "generate_until (greedy, KV cache)"}


def build(folder: Path, hidden: int, layers: int, docs: int) -> tuple:
    import torch
    from lm_eval_fixtures import build_tokenizer_dir, task_dir
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_dir = build_tokenizer_dir(folder / "model")
    vocab = len(json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(vocab_size=vocab + 1, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir), safe_serialization=True)
    tasks = task_dir(folder)
    for task, count in (("ds_hydra_mc", docs), ("ds_hydra_ppl", max(1, docs // 5)), ("ds_hydra_gen", max(1, docs // 4))):
        lines = (REPO / "tests" / "lm_eval_tasks" / f"{task}.jsonl").read_text().splitlines()
        big = folder / f"{task}.jsonl"
        big.write_text("\n".join((lines * (count // len(lines) + 1))[:count]) + "\n")
        yaml = tasks / f"{task}.yaml"
        yaml.write_text("\n".join(f"    test: {big}" if line.strip().startswith("test:") else line
                                  for line in yaml.read_text().splitlines()) + "\n")
    return model_dir, tasks


def evaluate(lm, tasks_dir: Path, task: str, seed: int = 1234):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    started = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False, bootstrap_iters=0)
    seconds = time.perf_counter() - started
    items = out["n-samples"][task]["effective"]
    metrics = {k: v for k, v in out["results"][task].items() if isinstance(v, float)}
    return items / seconds, items, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--docs", type=int, default=120, help="multiple-choice documents (4 requests each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = parser.parse_args()

    import logging

    import torch

    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from conftest import compose
    from ds_hydra.harness.model import DSHydraLM
    from ds_hydra.harness.run import load_for_harness

    folder = Path(tempfile.mkdtemp(prefix="bench_lm_eval."))
    try:
        model_dir, tasks = build(folder, args.hidden, args.layers, args.docs)
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        theirs = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device=args.device, dtype=dtype)
        cfg = compose(["task=lm_eval", "model=hf_causal_lm", f"model.pretrained={model_dir}", f"inference.device={args.device}",
                       f"inference.dtype={'fp32' if args.device == 'cpu' else 'bf16'}"])
        loaded = load_for_harness(cfg)
        ours = DSHydraLM(loaded.model, loaded.encode, loaded.decode, device=loaded.device, batch_size=args.batch_size,
                         max_length=loaded.max_length, prefix_token_id=loaded.prefix_token_id, eot_token_id=loaded.eot_token_id)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(f"Llama d={args.hidden} L={args.layers} ({params / 1e6:.2f}M parameters) on {args.device} ({dtype}), batch size "
              f"{args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.rounds} rounds")
        print(f"{'task':<16} {'requests':<36} {'items':>6} {'ds_hydra it/s':>14} {'hf it/s':>10} {'ratio':>7}  same metrics")
        for task, kind in TASKS.items():
            best = {"ds_hydra": 0.0, "hf": 0.0}
            metrics = {}
            for _ in range(args.rounds):  # interleaved: a slow moment of the machine hits both
                for name, lm in (("ds_hydra", ours), ("hf", theirs)):
                    rate, items, metrics[name] = evaluate(lm, tasks, task)
                    best[name] = max(best[name], rate)
            same = all(abs(metrics["ds_hydra"][k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in metrics["hf"].items())
            print(f"{task:<16} {kind:<36} {items:>6} {best['ds_hydra']:>14.1f} {best['hf']:>10.1f} "
                  f"{best['ds_hydra'] / best['hf']:>6.2f}x  {same}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
