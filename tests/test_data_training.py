"""Training on one's own data: prepared and nanoGPT token directories, the run's saved tokenizer, exact
resume of sequential epochs, and refusals at start (ids beyond the model, another model's tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, compose, run_cli
from test_resume import one_thread  # noqa: F401  (autouse: runs compared bit for bit use one thread)
from test_token_data import nanogpt_char_dir
from ds_hydra.data.corpus import embedded_corpus_text
from ds_hydra.errors import UserError

EOS = "<|endoftext|>"


def prepared_dir(folder: Path, tokenizer: dict, chars: int = 120_000) -> Path:
    """A directory written by task=prepare from four text files of Tiny Shakespeare."""
    from ds_hydra.data.prepare import prepare_dataset
    from ds_hydra.data.prepare_inputs import resolve_inputs

    text = embedded_corpus_text()[:chars]
    corpus = folder.parent / f"{folder.name}_text"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(text[i * chars // 4:(i + 1) * chars // 4], encoding="utf-8")
    prepare_dataset(resolve_inputs([str(corpus)]), folder, tokenizer, progress=False)
    return folder


CHAR = {"kind": "char", "eos_token": EOS}


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    return prepared_dir(tmp_path_factory.mktemp("data") / "chars", CHAR)


def train_in_process(overrides, run_dir=None):
    from ds_hydra.training.trainer import train

    return train(compose(overrides), run_dir=run_dir)


def test_sequential_epochs_resume_bit_for_bit(tmp_path, monkeypatch, char_dir):
    from test_resume import assert_same_state, final_state, interrupt, loss_records

    from ds_hydra.common.signals import Stopped

    run = [*TINY, "data=tokens", f"data.dir={char_dir}", "data.sampling=sequential", "model.dropout=0.1",
           "trainer.grad_accum_steps=2", "trainer.save_every=2"]
    reference = train_in_process(run, tmp_path / "reference")
    with monkeypatch.context() as patch:
        interrupt(patch, 3, "SIGUSR1")
        with pytest.raises(Stopped):
            train_in_process(run, tmp_path / "run")
    resumed = train_in_process([*run, f"resume={tmp_path / 'run'}"])
    assert loss_records(tmp_path / "run") == loss_records(tmp_path / "reference")
    assert resumed["val_loss"] == reference["val_loss"]
    state = final_state(tmp_path / "run")
    assert_same_state(state, final_state(tmp_path / "reference"))
    assert state["data"] == {"batches": 6 * 2}  # the position: global micro-batches drawn


def test_the_run_keeps_its_tokenizer_and_refuses_data_prepared_again(tmp_path):
    pytest.importorskip("tokenizers")  # before the BPE tokenizer is trained
    from ds_hydra.data.tokenizer import load_tokenizer
    from ds_hydra.inference.loading import load_run

    data = prepared_dir(tmp_path / "data", {"kind": "bpe", "vocab_size": 300, "min_frequency": 2, "eos_token": EOS, "train_chars": None})
    train_in_process([*TINY, "data=tokens", f"data.dir={data}"], tmp_path / "run")
    saved = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert saved.fingerprint() == load_tokenizer(data).fingerprint() and saved.vocab_size == 300
    run = load_run(str(tmp_path / "run"), device="cpu")
    assert run.data.decode(run.data.encode("ROMEO: hello")) == "ROMEO: hello"
    prepared_dir(tmp_path / "data", {"kind": "bpe", "vocab_size": 280, "min_frequency": 2, "eos_token": EOS, "train_chars": None})
    with pytest.raises(UserError, match=r"tokenizer: the run was trained with the bpe tokenizer \(vocab 300.*but its data now has the bpe tokenizer \(vocab 280"):
        load_run(str(tmp_path / "run"), device="cpu")


def test_ids_beyond_the_model_and_another_models_tokenizer_are_refused(tmp_path, char_dir):
    from ds_hydra.data.base import build_data
    from ds_hydra.data.tokenizer import CharTokenizer

    with pytest.raises(UserError, match=r"^model.vocab_size=10: the data has 62 distinct tokens"):
        train_in_process([*TINY, "data=tokens", f"data.dir={char_dir}", "model.vocab_size=10"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    pytest.importorskip("tokenizers")
    from ds_hydra.data.tokenizer import train_bpe
    from omegaconf import OmegaConf

    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    bpe = train_bpe([embedded_corpus_text()[:50_000]], OmegaConf.create({"vocab_size": 300, "min_frequency": 2, "eos_token": EOS}))
    bpe.tokenizer.save(str(pretrained / "tokenizer.json"))
    cfg = compose(["data=tokens", f"data.dir={char_dir}", "model=hf_llama", f"model.pretrained={pretrained}"])
    with pytest.raises(UserError, match=r"^data: the data's char tokenizer \(vocab 62.*is not the tokenizer of model.pretrained=.*prepare the data with tokenizer=hf tokenizer.path="):
        build_data(cfg.data, cfg.tokenizer, cfg.model.pretrained)
    cfg = compose(["data=tokens", f"data.dir={char_dir}"])
    assert isinstance(build_data(cfg.data, cfg.tokenizer).tokenizer, CharTokenizer)


# The default run's losses (TINY, one thread) before the tokenizer group existed, when the embedded corpus
# was a torch tensor of character ids: the same tokens and batches must give the same numbers.
PINNED_LOSSES = [
    {"step": 2, "loss": 4.17620849609375},
    {"step": 3, "train_loss": 4.070722579956055, "val_loss": 4.084455966949463},
    {"step": 4, "loss": 4.090095043182373},
    {"step": 6, "loss": 4.067100524902344},
    {"step": 6, "train_loss": 4.015419960021973, "val_loss": 4.033684730529785},
]


def test_the_embedded_corpus_trains_as_it_always_did(tmp_path):
    from test_resume import loss_records

    train_in_process(list(TINY), tmp_path / "run")
    records = loss_records(tmp_path / "run")
    assert [r.keys() - {"lr"} for r in records] == [r.keys() for r in PINNED_LOSSES]
    for got, pinned in zip(records, PINNED_LOSSES):
        assert got["step"] == pinned["step"]
        for key in pinned.keys() - {"step"}:
            assert got[key] == pytest.approx(pinned[key], rel=1e-6, abs=0), (got, pinned)


def test_a_nanogpt_directory_trains_like_the_embedded_corpus(tmp_path):
    """nanoGPT's shakespeare_char directory is the embedded corpus, split alike: the same run, the same losses."""
    folder = nanogpt_char_dir(tmp_path / "shakespeare_char")
    ours = train_in_process(list(TINY), tmp_path / "embedded")
    theirs = train_in_process([*TINY, "data=tokens", f"data.dir={folder}"], tmp_path / "nanogpt")
    for key in ("train_loss", "val_loss"):
        assert theirs[key] == ours[key], key


@pytest.mark.slow
def test_from_a_folder_of_text_to_decoded_samples(tmp_path):
    """README's path: prepare a folder with BPE, train, infer; then the same with model=hf_llama."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = embedded_corpus_text()
    for i in range(8):
        (corpus / f"play{i}.txt").write_text(text[i * 100_000:(i + 1) * 100_000], encoding="utf-8")
    data = tmp_path / "data" / "mycorpus"
    prepared = run_cli(["task=prepare", f"prepare.input={corpus}/*.txt", f"prepare.output={data}", "tokenizer=bpe",
                        "tokenizer.vocab_size=512", f"hydra.run.dir={tmp_path}/prep"])
    assert prepared.returncode == 0, prepared.stderr
    models = [["model=gpt_tiny"]]
    try:
        import transformers  # noqa: F401

        models.append(["model=hf_llama"])
    except ImportError:
        pass
    for n, model in enumerate(models):
        run = tmp_path / f"run{n}"
        trained = run_cli([*model, "data=tokens", f"data.dir={data}", "trainer.max_steps=30", "trainer.eval_interval=30",
                           "trainer.eval_batches=2", "trainer.device=cpu", "trainer.progress=false", f"hydra.run.dir={run}"])
        assert trained.returncode == 0, trained.stderr
        assert json.loads((run / "tokenizer" / "tokenizer_meta.json").read_text())["kind"] == "bpe"
        sampled = run_cli(["task=infer", f"inference.checkpoint={run}", "inference.prompt=ROMEO:", "inference.max_new_tokens=24",
                           f"hydra.run.dir={tmp_path}/infer{n}"])
        assert sampled.returncode == 0, sampled.stderr
        sample = (tmp_path / f"infer{n}" / "samples.txt").read_text(encoding="utf-8").split("----------------")[0]
        assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:") and sample in sampled.stdout  # printed
        assert "\ufffd" not in sample and not sample[6:].strip().replace(" ", "").isdigit()  # decoded text, not ids
