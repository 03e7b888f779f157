"""The model contract: the built-in GPT, Hugging Face causal LMs and a user's own module train alike.

A model is called as model(input_ids) and returns logits (a tensor, .logits, or a tuple's first item);
the trainer computes the loss. Everything else (block list, sequence length, FLOPs, resume, export,
fine-tuning) is found from the model itself.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose, run_cli
from ds_hydra.data.corpus import embedded_corpus_text
from ds_hydra.errors import UserError
from ds_hydra.models.contract import ChunkedHead, CausalLMLoss, logits_of, max_positions, model_vocab_size

BYO = REPO / "tests" / "byo"  # a user's own package: tests/byo/my_models.py
SHORT = [o for o in TINY if not o.startswith("model=")]
HF_TINY = [*SHORT, "model=hf_llama", "model.config.hidden_size=32", "model.config.intermediate_size=64",
           "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1", "data.seq_len=32"]


@pytest.fixture(autouse=True)
def _user_package_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BYO))


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="Hugging Face models are an optional extra (hf)")


# -- the contract ------------------------------------------------------------------------------------
def test_every_output_form_gives_the_logits():
    logits = torch.randn(2, 3, 5)

    class Output:  # a Hugging Face ModelOutput has the logits as an attribute
        def __init__(self):
            self.logits = logits

    assert logits_of(logits) is logits
    assert logits_of(Output()) is logits
    assert logits_of((logits, "aux")) is logits and logits_of([logits]) is logits
    with pytest.raises(TypeError, match="a model must return its logits"):
        logits_of({"logits": logits})


def test_loss_is_fp32_next_token_cross_entropy_over_labelled_positions():
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 6, 0]])
    expected = torch.nn.functional.cross_entropy(logits.float().view(-1, 7), labels.view(-1), ignore_index=-100)
    loss = CausalLMLoss()(logits, labels)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    with pytest.raises(ValueError, match=r"logits have shape \(2, 4, 7\) for labels of shape \(2, 3\)"):
        CausalLMLoss()(logits, labels[:, :3])


def test_chunked_head_is_the_same_loss():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 6, 8, requires_grad=True), torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 0] = -100
    whole = CausalLMLoss()(head(hidden), labels)
    chunked = CausalLMLoss()(ChunkedHead(hidden, head, 11, chunk_tokens=5), labels)
    torch.testing.assert_close(chunked, whole)


def test_what_a_model_says_about_itself():
    transformers = transformers_or_skip()
    from my_models import TinyLM

    from ds_hydra.models.gpt import GPT

    assert max_positions(GPT(65, 1, 2, 16, block_size=24)) == 24 and model_vocab_size(GPT(65, 1, 2, 16, 24)) == 65
    assert max_positions(TinyLM(50, max_seq_len=48)) == 48 and model_vocab_size(TinyLM(50)) is None
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=70, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=40))
    assert max_positions(llama) == 40 and model_vocab_size(llama) == 70
    assert max_positions(torch.nn.Linear(2, 2)) is None


# -- a model of the user's own -------------------------------------------------------------------------
def test_readme_shows_the_custom_model_that_is_tested():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    source = (BYO / "my_models.py").read_text(encoding="utf-8")
    code = source.split('"""', 2)[2].strip()  # the module without its docstring
    assert code in readme


def test_custom_module_trains_through_its_target(tmp_path):
    from ds_hydra.training.trainer import train

    cfg = compose([*SHORT, "model=custom", "model._target_=my_models.build_model", "+model.width=32",
                   "allowed_targets=[my_models]", "ckpt=full", "data.seq_len=24"])
    final = train(cfg, run_dir=tmp_path)
    log_free = json.loads((tmp_path / "completed.json").read_text())
    assert final["step"] == 6 and final["val_loss"] < 4.3 and log_free["metrics"]["val_loss"] == final["val_loss"]
    # measured (the model states no transformer shape) on the model as written: recompute is not model FLOPs
    from my_models import build_model

    from ds_hydra.training.throughput import measured_flops_per_token

    assert final["flops_per_token"] == measured_flops_per_token(build_model(65, width=32), 24) > 0
    assert 0 < final["activation_bytes"]


def test_custom_target_outside_the_allowlist_is_one_line(tmp_path):
    proc = run_cli([*SHORT, "model=custom", "model._target_=my_models.build_model", f"hydra.run.dir={tmp_path / 'r'}"],
                   env={"PYTHONPATH": str(BYO)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "model._target_=my_models.build_model: not an allowed target" in lines[0]
    assert "allowed_targets=[my_models]" in lines[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_sequence_length_beyond_the_models_positions_is_refused(tmp_path):
    from ds_hydra.training.trainer import Trainer

    with pytest.raises(UserError, match=r"^data.seq_len=64: GPT takes at most 32 positions; set data.seq_len <= 32$"):
        Trainer(compose([*TINY, "data.seq_len=64"]), tmp_path)


def test_sequence_length_is_the_datas(tmp_path):
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*TINY, "data.seq_len=16"]), tmp_path)
    assert trainer.seq_len == 16 and trainer.train_batches.next_batch(torch.device("cpu"))["input_ids"].shape == (4, 16)
    assert Trainer(compose(TINY), tmp_path).seq_len == 32  # null: the model's block_size


# -- Hugging Face models ----------------------------------------------------------------------------------
def test_hf_llama_trains_and_its_blocks_are_found(tmp_path):
    transformers_or_skip()
    from ds_hydra.activation_checkpointing import checkpointing_state
    from ds_hydra.training.trainer import Trainer, train

    cfg = compose([*HF_TINY, "ckpt.segments=2"])
    trainer = Trainer(cfg, tmp_path / "inspect")
    assert type(trainer.model).__name__ == "LlamaForCausalLM" and not trainer.model.config.use_cache
    assert checkpointing_state(trainer.model).path == "model.layers"
    L, d, T = 4, 32, 32
    N = sum(p.numel() for p in trainer.model.parameters())  # tied embedding: one table, counted once
    assert trainer.throughput.flops_per_token == 6 * N + 12 * L * d * T
    final = train(cfg, run_dir=tmp_path / "run")
    assert final["step"] == 6 and final["val_loss"] < 4.2


def test_unknown_model_type_and_bad_pretrained_dirs_are_one_line(tmp_path):
    transformers = transformers_or_skip()
    from ds_hydra.training.trainer import Trainer

    with pytest.raises(UserError, match=r"^model.config.model_type=lama: not a transformers architecture \(did you mean llama"):
        Trainer(compose([*HF_TINY, "model.config.model_type=lama"]), tmp_path)
    with pytest.raises(UserError, match=r"^model.config.hidden_sise: LlamaConfig has no such field"):
        Trainer(compose([*HF_TINY, "+model.config.hidden_sise=8"]), tmp_path)
    base = ["model=hf_causal_lm", *SHORT]
    with pytest.raises(UserError, match=r"^model.pretrained=.*nowhere: no such directory"):
        Trainer(compose([*base, f"model.pretrained={tmp_path / 'nowhere'}"]), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no config.json there"):
        Trainer(compose([*base, f"model.pretrained={empty}"]), tmp_path)
    small = transformers.LlamaConfig(vocab_size=65, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32)
    small.save_pretrained(empty)
    with pytest.raises(UserError, match=r"no model.safetensors there \(found: config.json\)"):
        Trainer(compose([*base, f"model.pretrained={empty}"]), tmp_path)
    transformers.LlamaForCausalLM(small).save_pretrained(empty)
    small.hidden_size = 32  # the config no longer matches the weights
    small.save_pretrained(empty)
    with pytest.raises(UserError, match=r"^model.pretrained=.*: cannot load it \("):
        Trainer(compose([*base, f"model.pretrained={empty}"]), tmp_path)


def test_missing_transformers_names_the_extra(tmp_path):
    hidden = tmp_path / "no_transformers" / "transformers"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
    proc = run_cli([*HF_TINY, f"hydra.run.dir={tmp_path / 'r'}"], env={"PYTHONPATH": str(hidden.parent)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "pip install 'ds-hydra[hf]'" in lines[0]


def test_a_transformers_that_turned_its_models_off_is_one_line(monkeypatch):
    """transformers 5 imports on torch < 2.6 but leaves its PyTorch models out: say so, not an AttributeError."""
    transformers = pytest.importorskip("transformers")
    from ds_hydra.models.hf import causal_lm

    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    with pytest.raises(UserError, match=r"^model: transformers .* does not run on torch .*'transformers<5' for torch < 2.6$"):
        causal_lm(config={"model_type": "llama"}, vocab_size=65)


def test_import_ds_hydra_never_imports_transformers():
    code = "import ds_hydra, sys; ds_hydra.register_configs(); print('transformers' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- weights in and out -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    from ds_hydra.training.trainer import train

    run_dir = tmp_path_factory.mktemp("gpt_run")
    train(compose([*TINY, "model.dropout=0.1", "model.bias=true"]), run_dir=run_dir)
    return run_dir


def test_export_hf_gpt_is_a_gpt2_with_our_logits_and_trains_again(gpt_run, tmp_path):
    transformers = transformers_or_skip()
    import ds_hydra
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.training.trainer import train

    metrics = export_hf(gpt_run, run_dir=tmp_path / "export")
    folder = Path(metrics["export_dir"])
    assert folder == tmp_path / "export" / "hf_model" and (folder / "model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ours = ds_hydra.load_model(gpt_run)
    assert type(hf).__name__ == "GPT2LMHeadModel" and not ours.training
    ids = torch.randint(0, 65, (3, 32))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-5
    # The run's tokenizer came along: the ids it gives the corpus are the ids the run trained on.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    trained_on = ds_hydra.load_run(str(gpt_run), device="cpu").data.tokens("train")[:2000]
    text = embedded_corpus_text()[:2000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == [int(i) for i in trained_on]
    assert tokenizer.decode(trained_on) == text and metrics["tokenizer"] == "char"
    final = train(compose([*SHORT, "model=hf_causal_lm", f"model.pretrained={folder}"]), run_dir=tmp_path / "again")
    start = [json.loads(line) for line in (gpt_run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    assert final["val_loss"] < start["val_loss"]  # fine-tuning went on from the exported weights


def test_export_hf_of_an_hf_run_round_trips(tmp_path):
    transformers = transformers_or_skip()
    import ds_hydra
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.training.trainer import train

    train(compose(HF_TINY), run_dir=tmp_path / "run")
    metrics = export_hf(tmp_path / "run", run_dir=tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(metrics["export_dir"], local_files_only=True).eval()
    ours = ds_hydra.load_model(tmp_path / "run")
    ids = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)


def test_export_hf_of_token_ids_without_a_tokenizer_says_so(tmp_path, caplog):
    """Bare token files (train.bin, val.bin: no tokenizer) train a run whose export is the model alone,
    and the log says which tokenizer to hand transformers instead."""
    import numpy as np

    transformers_or_skip()
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.training.trainer import train

    ids = np.arange(5000, dtype=np.uint16) % 50
    ids[:4500].tofile(tmp_path / "train.bin")
    ids[4500:].tofile(tmp_path / "val.bin")
    train(compose([*TINY, "data=tokens", f"data.dir={tmp_path}", "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    with caplog.at_level("WARNING", logger="ds_hydra"):
        metrics = export_hf(tmp_path / "run", run_dir=tmp_path / "export")
    folder = Path(metrics["export_dir"])
    assert metrics["tokenizer"] is None and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("tokenizer*"))
    assert any("holds no tokenizer" in r.getMessage() for r in caplog.records)


def test_export_hf_of_a_model_without_an_equivalent_is_one_line(tmp_path):
    transformers_or_skip()
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.training.trainer import train

    train(compose([*SHORT, "model=custom", "model._target_=my_models.build_model", "allowed_targets=[my_models]",
                   "data.seq_len=16"]), run_dir=tmp_path / "run")
    with pytest.raises(UserError, match=r"^task=export_hf: my_models.TinyLM has no transformers equivalent"):
        export_hf(tmp_path / "run", run_dir=tmp_path / "export", allowed_targets=["my_models"])
    assert not list((tmp_path / "export").glob("*hf_model*"))  # nothing half-written


def test_init_from_takes_weights_only(gpt_run, tmp_path):
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*TINY, "model.bias=true", f"trainer.init_from={gpt_run}"]), tmp_path)
    saved = safe_torch_load(latest_checkpoint(gpt_run))["model"]
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in saved.items())
    assert trainer.step == 0 and not trainer.optimizer.state  # a fresh optimizer and schedule
    assert trainer.scheduler.last_epoch == 0


def test_init_from_lists_every_mismatch(gpt_run, tmp_path):
    from ds_hydra.training.trainer import Trainer

    with pytest.raises(UserError) as error:
        Trainer(compose([*TINY, "model.n_layer=3", "model.n_embd=64", f"trainer.init_from={gpt_run}"]), tmp_path)
    message = str(error.value)
    assert message.startswith(f"trainer.init_from={gpt_run}: ") and "\n" not in message
    assert "blocks.3.ln_1.weight" in message  # names: a block the model has not (listed with every other)
    assert "unexpected blocks.[0-3].ln_1.bias" in message  # the run had biases: every layer's, folded
    assert re.search(r"wte.weight(, \S+)* (is|are) \(65, 32\) in the checkpoint but \(65, 64\) in the model", message)


def test_load_model_from_python(gpt_run):
    import ds_hydra

    model = ds_hydra.load_model(gpt_run)
    assert type(model).__name__ == "GPT" and not model.training
    with pytest.raises(UserError, match=r"^load_model=.*nowhere: no such directory"):
        ds_hydra.load_model(gpt_run / "nowhere")
