"""task=lm_eval: ds_hydra's harness model gives the harness's own ``hf`` numbers on the same model.

The model is a tiny Llama saved with ``save_pretrained`` beside a tokenizer trained here
(tests/lm_eval_fixtures.py); the tasks are the local JSONL tasks of tests/lm_eval_tasks/ (a multiple-choice
task, a perplexity task and a generation task). Nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import TINY, compose, run_cli  # noqa: E402
from lm_eval_fixtures import build_model_dir, corpus_text, harness_hf, task_dir  # noqa: E402

from ds_hydra.errors import UserError  # noqa: E402

MC, PPL, GEN = "ds_hydra_mc", "ds_hydra_ppl", "ds_hydra_gen"
BATCH = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("hf_model"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return task_dir(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def reference(model_dir, tasks):
    """The harness's own hf model on the model directory."""
    return harness_hf(model_dir, tasks, [MC, PPL], batch_size=BATCH, bootstrap_iters=0)["results"]


def ds_hydra_lm_eval(tmp: Path, source: list, tasks: Path, names, *extra):
    from ds_hydra.harness.run import lm_eval_task

    cfg = compose([
        "task=lm_eval", *source, f"lm_eval.tasks=[{','.join(names)}]", f"lm_eval.include_path={tasks}",
        f"lm_eval.batch_size={BATCH}", "lm_eval.bootstrap_iters=0", "inference.device=cpu", *extra,
    ])
    from ds_hydra.validation import validate_config

    validate_config(cfg)
    return lm_eval_task(cfg, tmp)


def assert_same(metrics: dict, reference: dict, task: str, names) -> None:
    for name in names:
        ours, theirs = metrics[f"{task}/{name}"], reference[task][f"{name},none"]
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6), (task, name, ours, theirs)


def test_model_dir_gives_the_harness_hf_numbers(tmp_path, model_dir, tasks, reference):
    metrics = ds_hydra_lm_eval(tmp_path / "out", ["model=hf_causal_lm", f"model.pretrained={model_dir}"], tasks, [MC, PPL])
    assert_same(metrics, reference, MC, ["acc", "acc_norm"])
    assert_same(metrics, reference, PPL, ["word_perplexity", "byte_perplexity", "bits_per_byte"])
    assert 0 < metrics[f"{MC}/acc"] < 1 and metrics[f"{MC}/acc"] != metrics[f"{MC}/acc_norm"]  # the model tells choices apart
    report = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert report["metrics"][f"{MC}/acc"] == metrics[f"{MC}/acc"]
    assert report["results"][MC]["acc,none"] == reference[MC]["acc,none"]
    assert report["n-samples"][MC]["effective"] == 40
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])  # what the trackers got
    assert record[f"{PPL}/word_perplexity"] == metrics[f"{PPL}/word_perplexity"]


def test_perplexity_spans_several_windows(model_dir, tasks):
    """The documents are longer than the model's positions: rolling windows, summed, as the harness's own."""
    from lm_eval_fixtures import MAX_POSITIONS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in
               (Path(__file__).parent / "lm_eval_tasks" / "ds_hydra_ppl.jsonl").read_text().splitlines()]
    assert max(lengths) > MAX_POSITIONS


@pytest.mark.slow
def test_run_dir_and_its_export_give_the_harness_hf_numbers(tmp_path, model_dir, tasks):
    """Fine-tune the model a few steps with ds_hydra, export it; the run dir, the exported directory
    (through ds_hydra) and the harness's hf model on the exported directory all agree."""
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text() * 20, encoding="utf-8")
    run = tmp_path / "run"
    train = run_cli([
        "model=hf_causal_lm", f"model.pretrained={model_dir}", "data=text", f"data.path={text}", "tokenizer=hf",
        f"tokenizer.path={model_dir}", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.eval_batches=1",
        "trainer.device=cpu", "trainer.progress=false", "trainer.compile=false", f"hydra.run.dir={run}",
    ])
    assert train.returncode == 0, train.stderr[-2000:]
    export = run_cli(["task=export_hf", f"inference.checkpoint={run}", f"hydra.run.dir={tmp_path / 'export'}"])
    assert export.returncode == 0, export.stderr[-2000:]
    exported = tmp_path / "export" / "hf_model"  # the run's tokenizer came along: the harness reads it there

    reference = harness_hf(exported, tasks, [MC, PPL], batch_size=BATCH, bootstrap_iters=0)["results"]
    from_run = ds_hydra_lm_eval(tmp_path / "a", [f"inference.checkpoint={run}"], tasks, [MC, PPL])
    from_export = ds_hydra_lm_eval(tmp_path / "b", ["model=hf_causal_lm", f"model.pretrained={exported}"], tasks, [MC, PPL])
    for metrics in (from_run, from_export):
        assert_same(metrics, reference, MC, ["acc", "acc_norm"])
        assert_same(metrics, reference, PPL, ["word_perplexity", "byte_perplexity", "bits_per_byte"])


def test_generation_matches_the_harness_hf_model(model_dir, tasks):
    """generate_until: the same greedy continuations (cut at the task's stop strings) as the harness's hf model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ds_hydra.harness.model import DSHydraLM
    from ds_hydra.harness.run import load_for_harness

    cfg = compose(["task=lm_eval", "model=hf_causal_lm", f"model.pretrained={model_dir}", "inference.device=cpu"])
    loaded = load_for_harness(cfg)
    ours = DSHydraLM(loaded.model, loaded.encode, loaded.decode, device=loaded.device, batch_size=3,
                     max_length=loaded.max_length, prefix_token_id=loaded.prefix_token_id, eot_token_id=loaded.eot_token_id)
    theirs = HFLM(pretrained=str(model_dir), batch_size=3, device="cpu", dtype="float32")
    prompts = ["The sea is", "Say", "Now is the winter of our", "A knight rides a horse and"]
    requests = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 10, "do_sample": False}), n)
                for n, p in enumerate(prompts)]
    got, want = ours.generate_until(requests), theirs.generate_until(requests)
    assert got == want
    assert any(got)  # not all empty


BYO = Path(__file__).resolve().parent / "byo"  # tests/byo/my_models.py: README's own custom model


def trained_run(tmp_path: Path, *overrides) -> Path:
    from ds_hydra.train_task import train

    run = tmp_path / "run"
    train(compose([*TINY, "trainer.max_steps=2", "trainer.eval_interval=0", *overrides]), run_dir=run)
    return run


def test_kv_cache_generation_equals_the_uncached_loop():
    """The built-in GPT decodes with its KV cache; the text equals decoding without it, prompts of
    different lengths batched (each cut from the left to leave room for the new tokens)."""
    import torch
    from lm_eval.api.instance import Instance

    from ds_hydra.harness.model import DSHydraLM
    from ds_hydra.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=24).eval()
    encode, decode = (lambda text: list(text.encode("latin-1"))), (lambda ids: bytes(ids).decode("latin-1"))
    lm = DSHydraLM(model, encode, decode, device=torch.device("cpu"), batch_size=4, max_length=24,
                   prefix_token_id=10, eot_token_id=None)
    prompts = ["ROMEO:", "First Citizen:\nWe", "KING", "O"]
    requests = [Instance("generate_until", {}, (p, {"until": ["zz"], "max_gen_toks": 20}), n) for n, p in enumerate(prompts)]
    cached = lm.generate_until(requests)
    model.make_kv_cache = None  # the uncached loop: the whole (cropped) context each step
    uncached = lm.generate_until(requests)
    assert cached == uncached
    assert all(len(text) == 20 for text in cached) and len(set(cached)) > 1


@pytest.mark.slow
def test_custom_model_run_dir_loglikelihood_is_the_model_logprob(tmp_path, tasks, monkeypatch):
    """A custom model (README's TinyLM, char vocabulary) through its run dir: the multiple-choice task
    runs, and a request's loglikelihood is the sum of the model's own log-probabilities of the continuation."""
    import torch
    from lm_eval.api.instance import Instance

    from ds_hydra.harness.model import DSHydraLM
    from ds_hydra.harness.run import load_for_harness

    monkeypatch.syspath_prepend(str(BYO))
    custom = ["model=custom", "model._target_=my_models.build_model", "allowed_targets=[my_models]"]
    run = trained_run(tmp_path, *custom, "data.seq_len=32")
    metrics = ds_hydra_lm_eval(tmp_path / "out", [f"inference.checkpoint={run}", "allowed_targets=[my_models]"], tasks,
                               [MC], "lm_eval.limit=8")
    assert 0 <= metrics[f"{MC}/acc"] <= 1 and metrics["lm_eval_items_per_s"] > 0

    cfg = compose(["task=lm_eval", f"inference.checkpoint={run}", "inference.device=cpu", "allowed_targets=[my_models]"])
    loaded = load_for_harness(cfg)
    lm = DSHydraLM(loaded.model, loaded.encode, loaded.decode, device=loaded.device, batch_size=2,
                   max_length=loaded.max_length, prefix_token_id=loaded.prefix_token_id, eot_token_id=loaded.eot_token_id)
    (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("To be or", " not"), 0)])
    ids = loaded.encode("To be or not")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids[:-1]]))
    assert type(loaded.model).__name__ == "TinyLM" and loaded.max_length == 64  # its max_seq_len
    want = torch.log_softmax(logits.float(), -1)[0, -4:].gather(1, torch.tensor(ids[-4:])[:, None]).sum().item()
    assert logprob == pytest.approx(want, rel=1e-5)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_settings_are_one_line_each():
    from ds_hydra.validation import config_problems

    problems = config_problems(compose(["task=lm_eval", "lm_eval.limit=0", "lm_eval.batch_size=0"]))
    assert [p for p in problems if p.startswith("lm_eval.")] == [
        "lm_eval.tasks is empty: task=lm_eval needs harness task names, e.g. 'lm_eval.tasks=[arc_easy]'",
        "lm_eval.limit=0.0: must be a document count >= 1 or a fraction in (0, 1), or null for every document",
        "lm_eval.batch_size=0: must be >= 1",
    ]
    assert not [p for p in config_problems(compose(["lm_eval.limit=0.5"])) if p.startswith("lm_eval")]


@pytest.mark.slow
def test_unknown_task_names_close_matches(tmp_path, model_dir, tasks):
    with pytest.raises(UserError, match=r"unknown task 'ds_hydra_mcc' \(close: ds_hydra_mc"):
        ds_hydra_lm_eval(tmp_path, ["model=hf_causal_lm", f"model.pretrained={model_dir}"], tasks, ["ds_hydra_mcc"])


def test_task_needing_a_download_is_one_line_naming_the_dataset(tmp_path, model_dir, tasks):
    with pytest.raises(UserError) as error:
        ds_hydra_lm_eval(tmp_path, ["model=hf_causal_lm", f"model.pretrained={model_dir}"], tasks, [MC, "ds_hydra_remote"])
    message = str(error.value)
    assert "\n" not in message
    assert "task 'ds_hydra_remote' needs the dataset ds-hydra-tests/not-on-this-machine" in message
    assert "lm_eval.allow_download=true" in message


@pytest.mark.slow
def test_cli_refuses_limit_zero_and_names_the_extra_free_keys(tmp_path, model_dir):
    result = run_cli(["task=lm_eval", "model=hf_causal_lm", f"model.pretrained={model_dir}", "lm_eval.tasks=[x]",
                      "lm_eval.limit=0", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("ds_hydra: error: lm_eval.limit=0")
    result = run_cli(["task=lm_eval", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2 and "lm_eval.tasks is empty" in result.stderr


@pytest.mark.slow
def test_limit_and_fewshot_are_the_harness_own(tmp_path, model_dir, tasks):
    """lm_eval.limit and lm_eval.num_fewshot (with the seed picking the examples) as the harness applies them."""
    reference = harness_hf(model_dir, tasks, [MC], batch_size=BATCH, bootstrap_iters=0, limit=12, num_fewshot=2)
    metrics = ds_hydra_lm_eval(tmp_path, ["model=hf_causal_lm", f"model.pretrained={model_dir}"], tasks, [MC],
                               "lm_eval.limit=12", "lm_eval.num_fewshot=2")
    assert_same(metrics, reference["results"], MC, ["acc", "acc_norm"])
    report = json.loads((tmp_path / "lm_eval.json").read_text())
    assert report["n-samples"][MC]["effective"] == 12 and report["n-shot"][MC] == 2


def test_flatten_names():
    from ds_hydra.harness.run import flatten

    flat = flatten({"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A",
                              "sample_len": 8}, "arc": {"acc,none": 0.5}})
    assert flat == {"gsm8k/exact_match,strict-match": 0.25, "arc/acc": 0.5}
    assert not math.isnan(flat["arc/acc"])


@pytest.mark.slow
def test_after_training_adds_task_metrics_to_the_final_metrics(tmp_path, tasks):
    """lm_eval.after_training=true: the tasks run on the final checkpoint; their metrics join the final
    metrics (so a sweep's objective can be one), metrics.jsonl and the run's lm_eval.json."""
    from ds_hydra.sweeps import select_objective
    from ds_hydra.train_task import train

    overrides = [*TINY, "trainer.max_steps=2", "trainer.eval_interval=0", "lm_eval.after_training=true",
                 f"lm_eval.tasks=[{MC}]", f"lm_eval.include_path={tasks}", "lm_eval.limit=8", "objective=ds_hydra_mc/acc_norm"]
    cfg = compose(overrides)
    final = train(cfg, run_dir=tmp_path / "run")
    assert 0 <= final[f"{MC}/acc"] <= 1 and f"{MC}/acc_norm" in final and final["val_loss"] > 0
    assert select_objective(cfg, final) == final[f"{MC}/acc_norm"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last[f"{MC}/acc"] == final[f"{MC}/acc"]
    report = json.loads((tmp_path / "run" / "lm_eval.json").read_text())
    assert report["step"] == 2 and report["metrics"][f"{MC}/acc"] == final[f"{MC}/acc"]
    # the same checkpoint through task=lm_eval gives the same numbers
    again = ds_hydra_lm_eval(tmp_path / "again", [f"inference.checkpoint={tmp_path / 'run'}"], tasks, [MC], "lm_eval.limit=8")
    assert again[f"{MC}/acc"] == final[f"{MC}/acc"] and again[f"{MC}/acc_norm"] == final[f"{MC}/acc_norm"]


@pytest.mark.slow
def test_lora_run_dir_gives_the_harness_hf_numbers_of_its_merged_export(tmp_path, model_dir, tasks):
    """A LoRA run (adapter=lora on the model directory) evaluates through its run dir as it trained (base
    plus adapter, through the one run loader); the harness's hf model on its export (the adapter merged
    into the weights) gives the same acc and acc_norm, and perplexities equal to float rounding."""
    pytest.importorskip("peft")
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.train_task import train

    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text() * 20, encoding="utf-8")
    run = tmp_path / "run"
    train(compose([
        "model=hf_causal_lm", f"model.pretrained={model_dir}", "adapter=lora", "optimizer.lr=0.05", "data=text",
        f"data.path={text}", "tokenizer=hf", f"tokenizer.path={model_dir}", "trainer.max_steps=3", "trainer.batch_size=2",
        "trainer.eval_batches=1", "trainer.eval_interval=0", "trainer.device=cpu", "trainer.progress=false",
        "trainer.compile=false",
    ]), run_dir=run)
    export_hf(run, run_dir=tmp_path / "export")
    exported = tmp_path / "export" / "hf_model"  # with the run's tokenizer

    reference = harness_hf(exported, tasks, [MC, PPL], batch_size=BATCH, bootstrap_iters=0)["results"]
    base = harness_hf(model_dir, tasks, [PPL], batch_size=BATCH, bootstrap_iters=0)["results"]
    metrics = ds_hydra_lm_eval(tmp_path / "a", [f"inference.checkpoint={run}"], tasks, [MC, PPL])
    assert_same(metrics, reference, MC, ["acc", "acc_norm"])
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert metrics[f"{PPL}/{name}"] == pytest.approx(reference[PPL][f"{name},none"], rel=1e-4)
    # the adapter trained: the base model's perplexity differs
    assert metrics[f"{PPL}/bits_per_byte"] != pytest.approx(base[PPL]["bits_per_byte,none"], rel=1e-3)
