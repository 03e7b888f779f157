"""A tiny Hugging Face model directory and the local harness tasks of tests/lm_eval_tasks/, built offline.

``build_model_dir`` trains a byte-level BPE tokenizer on the tasks' own text (``tokenizers``), saves it
as a transformers tokenizer (the harness's ``hf`` model reads one from the directory), and saves a
randomly initialised two-layer Llama beside it with ``save_pretrained``. ``task_dir`` copies the task
YAMLs with their ``data_files`` made absolute (the harness resolves them against the working directory).
"""
from __future__ import annotations

import json
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
EOS = "<|endoftext|>"
MAX_POSITIONS = 48  # shorter than the perplexity documents: they are scored in several windows


def task_dir(tmp: Path) -> Path:
    out = Path(tmp) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for path in TASKS.iterdir():
        if path.suffix == ".yaml":
            text = path.read_text(encoding="utf-8").replace("tests/lm_eval_tasks/", f"{TASKS}/")
            (out / path.name).write_text(text, encoding="utf-8")
    return out


def corpus_text() -> str:
    """Every text the tasks hold, once: what the tokenizer is trained on (and a run's training data)."""
    lines = []
    for path in sorted(TASKS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            lines += [v if isinstance(v, str) else " ".join(v) for v in doc.values() if isinstance(v, (str, list))]
    return "\n".join(lines) + "\n"


def build_tokenizer_dir(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus_text()] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return folder


def build_model_dir(folder: Path, seed: int = 0) -> Path:
    """A tokenizer and a tiny Llama saved together in ``folder`` (what ``from_pretrained`` reads)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    build_tokenizer_dir(folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    config = LlamaConfig(
        vocab_size=vocab + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init: the choices' scores differ clearly
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def harness_hf(model_dir: Path, tasks_dir: Path, tasks, batch_size: int = 4, tokenizer_dir: Path = None, **kwargs):
    """The harness's own ``hf`` model on ``model_dir``: its results dict."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), tokenizer=str(tokenizer_dir or model_dir), batch_size=batch_size,
              device="cpu", dtype="float32")
    seed = kwargs.pop("seed", 1234)
    return simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=False, **kwargs,
    )
