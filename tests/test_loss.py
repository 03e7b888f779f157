"""The loss: a step's loss is the mean over every label token of the step, whatever its split into
micro-batches and ranks; packed examples are kept apart; the chunked loss equals the plain one;
evaluation is token-weighted; what is knowable before step 1 is refused before step 1."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, compose
from ds_hydra.data.base import IGNORE_INDEX, TRAIN_STREAM
from ds_hydra.errors import UserError

CPU = torch.device("cpu")
SPLITS = ((8, 1), (4, 2), (2, 4), (1, 8))
# The run: the shipped SFT examples, one SGD step, no clipping (the step's gradient as it is).
SFT_STEP = [
    "model=gpt_tiny", "data=sft", "model.block_size=128", "trainer.grad_clip=0", "trainer.max_steps=1",
    "trainer.device=cpu", "trainer.progress=false", "trainer.compile=false", "optimizer=sgd", "optimizer.momentum=0",
    "scheduler=constant",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


def split_run(batch_size: int, accum: int, extra=()):
    return [*SFT_STEP, f"trainer.batch_size={batch_size}", f"trainer.grad_accum_steps={accum}", *extra]


def rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    scale = want.abs().max().clamp(min=1e-12)
    assert ((got - want).abs().max() / scale).item() <= rtol, what


# -- one loss for any split -------------------------------------------------------------------------
def test_four_splits_give_the_whole_batch_token_mean_and_equal_parameters(tmp_path):
    from ds_hydra.training.trainer import Trainer

    reference = Trainer(compose(split_run(8, 1)), tmp_path / "reference")
    model, lr = reference.model, reference.optimizer.param_groups[0]["lr"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # the step's global batch, as one batch of 8: the reference loss on the whole batch
    batch = reference.data.sampler("train", reference.seq_len, 8, reference.cfg.trainer.seed, stream=TRAIN_STREAM).next_batch(CPU)
    labels = batch["labels"]
    n_labels = (labels != IGNORE_INDEX).sum()
    assert 0 < n_labels < labels.numel()  # masked prompts: rows weigh differently, so a mean of means would differ
    logits = model(batch["input_ids"])
    want_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum") / n_labels
    want_loss.backward()
    want_params = {name: before[name] - lr * p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    losses = {}
    for batch_size, accum in SPLITS:
        trainer = Trainer(compose(split_run(batch_size, accum)), tmp_path / f"{batch_size}x{accum}")
        losses[batch_size, accum] = trainer.train_step().item()
        rel_close(torch.tensor(losses[batch_size, accum]), want_loss.detach(), 1e-5, f"loss of {batch_size} x {accum}")
        for name, p in trainer.model.named_parameters():
            rel_close(p.detach(), want_params[name], 1e-5, f"{name} after {batch_size} x {accum}")
    # a mean of micro-batch means (what the step used to be) is not what any split returns
    means = [(F.cross_entropy(model(batch["input_ids"][i:i + 1]).reshape(-1, logits.size(-1)), labels[i].reshape(-1))).item() for i in range(8)]
    assert abs(np.mean(means) - want_loss.item()) > 1e-3
    assert max(losses.values()) - min(losses.values()) <= 1e-5 * want_loss.item()


def test_a_step_draws_the_same_examples_whatever_its_split():
    from ds_hydra.data.batches import RandomBlocks
    from ds_hydra.data.samplers import RowSampler, SequentialWindows

    tokens = np.arange(5000, dtype=np.int64)
    rows = (np.arange(50 * 4).reshape(50, 4), np.arange(50 * 4).reshape(50, 4), None)
    make = {
        "random windows": lambda b, r, w: RandomBlocks(tokens, 16, b, seed=3, rank=r, world_size=w),
        "sequential windows": lambda b, r, w: SequentialWindows(tokens, 16, b, seed=3, rank=r, world_size=w),
        "sft rows": lambda b, r, w: RowSampler(*rows, b, seed=3, rank=r, world_size=w),
    }
    for name, sampler in make.items():
        steps = {}
        for batch_size, accum, world in ((8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)):
            ranks = [sampler(batch_size, r, world) for r in range(world)]
            seen = []
            for _step in range(3):
                step = [ranks[r].next_batch(CPU)["input_ids"][:, 0] for _ in range(accum) for r in range(world)]
                seen.append(sorted(torch.cat(step).tolist()))
            steps[batch_size, accum, world] = seen
        assert len({json.dumps(s) for s in steps.values()}) == 1, name


# -- pretraining keeps its numbers --------------------------------------------------------------------
# Recorded before the step became a token mean (every position of a window is labelled, so the token
# mean of a step is the mean of its micro-batch means: equal up to fp32 rounding).
PINNED = {
    "shakespeare_char": ([4.1899847984313965, 4.139815330505371, 4.115813255310059, 4.042868614196777, 4.065204620361328,
                          4.0308637619018555], 4.012445449829102),
    "tokens_sequential": ([4.084603309631348, 4.059915542602539, 4.028924942016602, 3.9776527881622314, 3.9655580520629883,
                           3.94804048538208], 3.9409079551696777),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED))
def test_pretraining_keeps_its_numbers(tmp_path, name):
    from test_data_training import CHAR, prepared_dir

    from ds_hydra.training.trainer import train

    run = [*TINY, "trainer.log_interval=1", "trainer.compile=false"]
    if name == "shakespeare_char":
        run += ["trainer.grad_accum_steps=2"]
    else:
        data = prepared_dir(tmp_path / "chars", CHAR, chars=40_000)
        run += ["data=tokens", f"data.dir={data}", "data.sampling=sequential", "trainer.grad_accum_steps=2"]
    final = train(compose(run), run_dir=tmp_path / "run")
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    losses, val_loss = PINNED[name]
    np.testing.assert_allclose(logged, losses, rtol=1e-5)
    np.testing.assert_allclose(final["val_loss"], val_loss, rtol=1e-5)


# -- packing keeps examples apart -------------------------------------------------------------------
def packed_row(lengths, vocab, seed=0):
    """Examples of ``lengths`` tokens (inputs, labels all trained) and their packed row with positions."""
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(vocab, (n + 1,), generator=g) for n in lengths]
    inputs = torch.cat([e[:-1] for e in examples])[None]
    labels = torch.cat([e[1:] for e in examples])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return examples, {"input_ids": inputs, "labels": labels, "position_ids": positions}


def per_token_losses(model, batch):
    from ds_hydra.loss.inputs import run_model
    from ds_hydra.models.contract import logits_of

    logits = logits_of(run_model(model, batch))
    return F.cross_entropy(logits[0].float(), batch["labels"][0], reduction="none")


def check_packed_equals_one_by_one(model, vocab):
    lengths = [7, 1, 12, 5]
    examples, batch = packed_row(lengths, vocab)
    packed = per_token_losses(model, batch)
    alone = torch.cat([per_token_losses(model, {"input_ids": e[None, :-1], "labels": e[None, 1:]}) for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # changing the third example leaves every other example's outputs as they were
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 8:20] = (changed["input_ids"][0, 8:20] + 1) % vocab
    after = per_token_losses(model, changed)
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[8:20] = False
    assert torch.equal(after[keep], packed[keep]) and not torch.equal(after[~keep], packed[~keep])


def test_packed_row_of_the_built_in_gpt_equals_its_examples_one_by_one():
    from ds_hydra.models.gpt import GPT
    from ds_hydra.models.packing import packing_problem

    torch.manual_seed(0)
    model = GPT(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=32).eval()
    assert packing_problem(model) is None
    check_packed_equals_one_by_one(model, 50)


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("eager", marks=pytest.mark.slow),
                                       pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_row_of_a_hugging_face_llama_equals_its_examples_one_by_one(attention):
    pytest.importorskip("transformers")
    from ds_hydra.models.hf import causal_lm
    from ds_hydra.models.packing import packing_problem

    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    model = causal_lm(config=config, vocab_size=50, attn_implementation=attention).eval()
    if attention == "flex_attention" and not torch.cuda.is_available():
        model.requires_grad_(False)  # flex attention has no backward on the CPU; its forward is what is compared
    assert packing_problem(model) is None
    check_packed_equals_one_by_one(model, 50)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "mistral"])
def test_packed_rows_of_other_hugging_face_families_equal_their_examples_one_by_one(model_type):
    pytest.importorskip("transformers")
    from ds_hydra.models.hf import causal_lm
    from ds_hydra.models.packing import packing_problem

    torch.manual_seed(0)
    if model_type == "gpt2":
        config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    else:
        config = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    model = causal_lm(config=config, vocab_size=50).eval()
    assert packing_problem(model) is None
    check_packed_equals_one_by_one(model, 50)


def test_a_model_that_would_mix_packed_examples_is_refused(tmp_path):
    from ds_hydra.models.packing import check_packing

    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    class TakesPositions(torch.nn.Module):
        def forward(self, input_ids, position_ids=None):
            return input_ids

    with pytest.raises(UserError, match=r"data.pack=true: Plain would let packed examples attend to each other \(Plain's forward takes no position_ids"):
        check_packing(Plain())
    with pytest.raises(UserError, match=r"TakesPositions does not say it keeps packed examples apart"):
        check_packing(TakesPositions())
    TakesPositions.packs_documents = True
    check_packing(TakesPositions())


# -- the chunked loss ---------------------------------------------------------------------------------
def gradients(model, loss_fn, batch):
    from ds_hydra.loss.step import mean_loss

    model.zero_grad(set_to_none=True)
    loss = mean_loss(model, loss_fn, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def check_chunked_equals_plain(model, vocab):
    from ds_hydra.loss.cross_entropy import ChunkedCrossEntropyLoss, CrossEntropyLoss

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (3, 24), generator=g)
    labels = torch.randint(vocab, (3, 24), generator=g)
    labels[:, :5] = IGNORE_INDEX  # masked prompts
    batch = {"input_ids": ids, "labels": labels}
    plain_loss, plain = gradients(model, CrossEntropyLoss(), batch)
    chunked_loss, chunked = gradients(model, ChunkedCrossEntropyLoss(chunk_tokens=10), batch)  # 72 tokens: 8 chunks, the last short
    rel_close(chunked_loss, plain_loss, 1e-6, "loss")
    assert chunked.keys() == plain.keys()
    for name in plain:
        rel_close(chunked[name], plain[name], 1e-6 if plain[name].abs().max() > 1e-4 else 1e-4, name)


def test_chunked_loss_equals_the_plain_one_for_the_built_in_gpt():
    from ds_hydra.models.gpt import GPT

    torch.manual_seed(0)
    check_chunked_equals_plain(GPT(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=32, pad_vocab_to=64), 61)


def test_chunked_loss_equals_the_plain_one_for_a_hugging_face_llama():
    pytest.importorskip("transformers")
    from ds_hydra.models.hf import causal_lm

    torch.manual_seed(0)
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    check_chunked_equals_plain(causal_lm(config=config, vocab_size=50), 50)


def test_chunked_loss_never_holds_the_whole_logits():
    """Inside the chunked loss the largest tensor with a vocabulary dimension is one chunk's logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ds_hydra.loss.cross_entropy import ChunkedCrossEntropyLoss, CrossEntropyLoss
    from ds_hydra.loss.step import mean_loss
    from ds_hydra.models.gpt import GPT

    vocab = 997

    class Largest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == vocab:
                    Largest.rows = max(Largest.rows, t.numel() // vocab)
            return out

    model = GPT(vocab_size=vocab, n_layer=1, n_head=2, n_embd=16, block_size=64)
    batch = {"input_ids": torch.randint(vocab, (4, 64)), "labels": torch.randint(vocab, (4, 64))}
    for loss_fn, rows in ((CrossEntropyLoss(), 4 * 64), (ChunkedCrossEntropyLoss(chunk_tokens=32), 32)):
        Largest.rows = 0
        with Largest():
            mean_loss(model, loss_fn, batch).backward()
        assert Largest.rows == rows, type(loss_fn).__name__


@pytest.mark.slow
def test_the_loss_group_trains_and_refuses_what_chunking_cannot_do(tmp_path):
    from ds_hydra.loss.cross_entropy import output_layer
    from ds_hydra.training.trainer import train

    plain = train(compose([*TINY, "trainer.max_steps=2", "trainer.compile=false"]), run_dir=tmp_path / "plain")
    chunked = train(compose([*TINY, "trainer.max_steps=2", "trainer.compile=false", "loss=chunked_cross_entropy", "loss.chunk_tokens=50"]),
                    run_dir=tmp_path / "chunked")
    assert chunked["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)

    class Capped(torch.nn.Module):
        config = type("Config", (), {"final_logit_softcapping": 30.0})()

    with pytest.raises(UserError, match=r"loss=chunked_cross_entropy: Capped transforms its logits after the output layer \(config.final_logit_softcapping=30.0\)"):
        output_layer(Capped())
    with pytest.raises(UserError, match=r"loss=chunked_cross_entropy: Module has no output layer to chunk"):
        output_layer(torch.nn.Module())


# -- evaluation and the checks before step 1 ----------------------------------------------------------
def test_packed_and_padded_evaluation_of_one_model_agree():
    from ds_hydra.data.sft import SFTData
    from ds_hydra.loss.cross_entropy import CrossEntropyLoss
    from ds_hydra.loss.step import token_mean_loss
    from ds_hydra.models.gpt import GPT

    char = {"kind": "char", "eos_token": "<|endoftext|>"}
    padded, packed = SFTData(tokenizer_cfg=char), SFTData(tokenizer_cfg=char, pack=True)
    torch.manual_seed(0)
    model = GPT(vocab_size=padded.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=256).eval()
    results = {}
    for name, data in (("padded", padded), ("packed", packed)):
        whole = data.whole_split("val", 256, batch_size=3)
        results[name] = token_mean_loss(model, CrossEntropyLoss(), whole.batches(CPU), CPU)
    assert len(packed.rows("val", 256)[0]) < len(padded.rows("val", 256)[0])  # packing did pack
    assert results["packed"] == pytest.approx(results["padded"], rel=1e-5)
    # ranks split the whole split and each weighs its own tokens: two ranks' sums are the one process's
    sums = torch.zeros(2, dtype=torch.float64)
    for rank in range(2):
        for batch in padded.whole_split("val", 256, batch_size=3, rank=rank, world_size=2).batches(CPU):
            from ds_hydra.loss.step import loss_sum

            with torch.no_grad():
                sums[0] += loss_sum(model, CrossEntropyLoss(), batch).double()
            sums[1] += (batch["labels"] != IGNORE_INDEX).sum()
    assert (sums[0] / sums[1]).item() == pytest.approx(results["padded"], rel=1e-6)


def test_an_sft_config_whose_val_set_is_empty_within_seq_len_is_refused_before_any_step(tmp_path):
    from conftest import run_cli

    run_dir = tmp_path / "run"  # gpt_tiny: 32 positions, shorter than any example's prompt
    done = run_cli(["model=gpt_tiny", "data=sft", "trainer.device=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "ds_hydra: error: data.seq_len=32: no val example has a trained (response) token within it; raise data.seq_len "
        "(or model.block_size when data.seq_len is null)"
    )
    assert "3 of 3 val examples have no trained token within it and were dropped" in done.stdout + done.stderr
    assert not run_dir.exists()  # refused in the preflight: no step, and nothing written


@pytest.mark.slow
def test_packed_training_runs_on_the_shipped_examples(tmp_path):
    from ds_hydra.training.trainer import train

    final = train(compose([*TINY, "data=sft", "data.pack=true", "model.block_size=256", "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    assert np.isfinite(final["val_loss"])


@pytest.mark.slow
def test_two_ranks_under_torchrun_compute_the_step_of_one_process_with_accumulation(tmp_path):
    """2 ranks x batch 4 (DDP on gloo) against 1 process x batch 4 x accumulation 2, on SFT data whose rows
    label different numbers of tokens: the same step loss and the same parameters after one SGD step."""
    from test_distributed import only_run_dir, torchrun

    from ds_hydra.training.state import safe_torch_load
    from ds_hydra.training.trainer import train

    one = train(compose(split_run(4, 2, ["trainer.eval_batches=2"])), run_dir=tmp_path / "one")
    (tmp_path / "ranks").mkdir()
    done = torchrun(split_run(4, 1, ["trainer.eval_batches=2", "engine=ddp", "trainer.checkpoint_format=full"]), cwd=tmp_path / "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = only_run_dir(tmp_path / "ranks")

    def step_loss(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    np.testing.assert_allclose(step_loss(ranks), step_loss(tmp_path / "one"), rtol=1e-5)
    got = safe_torch_load(ranks / "checkpoints" / "step_0000001.pt")["model"]
    want = safe_torch_load(tmp_path / "one" / "checkpoints" / "step_0000001.pt")["model"]
    for name, tensor in want.items():
        rel_close(got[name], tensor, 1e-5, name)
    assert one["val_loss"] == pytest.approx(json.loads((ranks / "metrics.jsonl").read_text().splitlines()[-1]).get("val_loss", one["val_loss"]), rel=1e-5)
