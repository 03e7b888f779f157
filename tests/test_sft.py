"""data=sft: the loss covers response tokens only; rows padded or packed; bad records refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ds_hydra.data.base import IGNORE_INDEX
from ds_hydra.data.sft import SFTData, build_rows
from ds_hydra.errors import UserError
from ds_hydra.models.contract import CausalLMLoss

CHAR = {"kind": "char", "eos_token": "<|endoftext|>"}
CPU = torch.device("cpu")


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def text_of(data, ids):
    return data.tokenizer.decode([i for i in ids if i != IGNORE_INDEX])


def test_prompt_is_context_and_response_plus_eos_is_trained(tmp_path):
    path = write(tmp_path / "ex.jsonl", [{"prompt": "Q: 2+2?\nA: ", "response": "4"}, {"prompt": "Hi ", "response": "there"}])
    data = SFTData(path, val_path=path, tokenizer_cfg=CHAR)
    inputs, labels, positions = data.rows("train", 16)
    assert positions is None  # padded rows: one example each, positions from 0 as usual
    assert inputs.shape == labels.shape == (2, 16)
    eos = data.tokenizer.eos_id
    row = data.tokenizer.encode("Q: 2+2?\nA: 4") + [eos]
    assert inputs[0, :12].tolist() == row[:-1] and (inputs[0, 12:] == eos).all()  # padded with eos ids
    # position t predicts token t + 1: only "4" (predicted at the last prompt position) and eos carry loss
    assert labels[0].tolist() == [IGNORE_INDEX] * 10 + [row[11], eos] + [IGNORE_INDEX] * 4
    assert text_of(data, labels[1]) == "there<|endoftext|>"


def test_chat_records_train_on_the_assistant_only(tmp_path):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Ciao"}]}
    path = write(tmp_path / "chat.jsonl", [record])
    data = SFTData(path, val_path=path, tokenizer_cfg=CHAR)
    inputs, labels, _ = data.rows("train", 96)
    shown = data.tokenizer.decode(inputs[0][inputs[0] != data.tokenizer.eos_id].tolist())
    assert shown.startswith("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello")
    assert text_of(data, labels[0]) == "Hello<|endoftext|>Ciao<|endoftext|>"
    data = SFTData(path, val_path=path, tokenizer_cfg=CHAR, train_roles=["user"])
    assert text_of(data, data.rows("train", 96)[1][0]) == "Hi<|endoftext|>Bye<|endoftext|>"


def test_padding_packing_and_cutting():
    ex = lambda n, trained_from: (np.arange(n), np.arange(n) >= trained_from)  # noqa: E731
    examples = [ex(5, 2), ex(4, 1), ex(9, 3), ex(3, 2)]
    inputs, labels, _ = build_rows(examples, 8, pack=False, pad_id=99)
    assert inputs.shape == (4, 8) and inputs[0].tolist() == [0, 1, 2, 3, 99, 99, 99, 99]
    assert labels[0].tolist() == [IGNORE_INDEX, 2, 3, 4] + [IGNORE_INDEX] * 4
    assert inputs[2].tolist() == list(range(8)) and labels[2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6, 7, 8]  # cut to 8
    packed_inputs, packed_labels, positions = build_rows(examples, 8, pack=True, pad_id=99)
    # 4 + 3 fit in one row; the 8 of the cut example need their own; 2 follow in the last row
    assert packed_inputs.tolist() == [[0, 1, 2, 3, 0, 1, 2, 99], list(range(8)), [0, 1, 99, 99, 99, 99, 99, 99]]
    assert packed_labels[0].tolist() == [IGNORE_INDEX, 2, 3, 4, 1, 2, 3, IGNORE_INDEX]  # no target crosses examples
    # positions restart at each example (and at the padding): what keeps packed examples apart
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], list(range(8)), [0, 1, 0, 1, 2, 3, 4, 5]]
    with pytest.raises(UserError, match=r"data.seq_len=1: no train example has a trained \(response\) token within it"):
        build_rows([ex(5, 3)], 1, pack=False, pad_id=0)


def test_masked_positions_carry_no_gradient():
    from ds_hydra.models.gpt import GPT

    data = SFTData(tokenizer_cfg=CHAR)  # the example set shipped with ds_hydra
    batch = data.sampler("train", 128, 4, seed=0).next_batch(CPU)
    masked = batch["labels"] == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    torch.manual_seed(0)
    model = GPT(vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128)
    hidden = {}

    def keep(module, args, out):
        out.retain_grad()
        hidden["h"] = out

    model.ln_f.register_forward_hook(keep)
    loss = CausalLMLoss()(model(batch["input_ids"]), batch["labels"])  # the trainer's loss
    loss.backward()
    grad = hidden["h"].grad  # (B, T, C): position t's only path to the loss is its own prediction
    assert grad[masked].abs().max() == 0
    assert (grad[~masked].abs().sum(-1) > 0).all()
    # the loss is the mean over the trained positions only
    logits = model.lm_head(hidden["h"]).detach()
    expected = torch.nn.functional.cross_entropy(logits[~masked], batch["labels"][~masked])
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_sampler_resumes_and_splits_ranks():
    data = SFTData(tokenizer_cfg=CHAR, pack=True)
    whole = [data.sampler("train", 64, 2, seed=1).next_batch(CPU)["input_ids"] for _ in range(1)]
    one = data.sampler("train", 64, 2, seed=1)
    first = [one.next_batch(CPU)["input_ids"] for _ in range(3)]
    assert torch.equal(first[0], whole[0])
    resumed = data.sampler("train", 64, 2, seed=1)
    resumed.load_state_dict({"batches": 2})
    assert torch.equal(resumed.next_batch(CPU)["input_ids"], first[2])
    ranks = [data.sampler("train", 64, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(ranks[1].next_batch(CPU)["input_ids"], first[1])


@pytest.mark.parametrize("line,message", [
    ("not json", "byte 0: the line is not JSON (Expecting value)"),
    ('{"prompt": "a"}', "byte 0: a record needs 'prompt' and 'response', or 'messages' (fields: prompt)"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "byte 0: no message of a trained role (assistant); set data.train_roles"),
    ('{"messages": [{"role": "user"}]}', "byte 0: message 0 must have string 'role' and 'content' fields"),
])
def test_bad_records_name_the_file_and_offset(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError) as raised:
        SFTData(str(path), val_path=str(path), tokenizer_cfg=CHAR)
    assert str(raised.value) == f"{path}: {message}"
