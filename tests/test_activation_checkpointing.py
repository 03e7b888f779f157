"""Activation checkpointing: equal gradients, bytes as predicted, budgets respected, clear errors.

Every policy is checked on the CPU in fp32 with dropout active: the gradients must be bit-identical
to the un-checkpointed model's, and the bytes kept for backward must equal what the probe's measurements
add up to for the plan (``ActivationProfile.kept_bytes``) exactly. Stand-ins with the structure of common third-party models (GPT-2's
``transformer.h`` with keyword arguments and tuple outputs, ResNet's ``layerN`` Sequentials with
batch norm, blocks returning (x, aux)) check that any model works, not only ds_hydra's GPT.
"""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, compose, run_cli, TINY
from ds_hydra.activation_checkpointing import (
    SavedActivationCounter,
    checkpoint_activations,
    checkpointing_state,
    find_blocks,
    probe,
    remove_activation_checkpointing,
)
from ds_hydra.activation_checkpointing.config import CkptConfig, parse_budget, validate_ckpt
from ds_hydra.activation_checkpointing.policies import Region, best_segment_count, plan_for_budget, segment_regions
from ds_hydra.activation_checkpointing.selective import selective_available
from ds_hydra.errors import UserError
from ds_hydra.models.contract import CausalLMLoss
from ds_hydra.models.gpt import GPT

NO_SAC = f"torch {torch.__version__} has no selective-checkpoint API (torch >= 2.5)"
needs_selective = pytest.mark.skipif(not selective_available(), reason=NO_SAC)


@pytest.fixture(autouse=True)
def _selective_cases_need_the_api(request):
    """Cases parametrized with selective=True (or the ckpt=selective option) skip on a torch without it."""
    spec = getattr(request.node, "callspec", None)
    values = list(spec.params.values()) if spec else []
    if not selective_available() and any(v == "selective" or (isinstance(v, dict) and v.get("selective")) for v in values):
        pytest.skip(NO_SAC)


# -- models -----------------------------------------------------------------------------------------------
# The stand-ins are called as model(x, targets) -> (output, loss): checkpointing is tested on the whole
# step. LossGPT is the built-in GPT (its blocks, paths and state dict) plus the trainer's loss.
class LossGPT(GPT):
    def forward(self, idx, targets=None, **kwargs):
        logits = super().forward(idx, **kwargs)
        return logits, (CausalLMLoss()(logits, targets) if targets is not None else None)


def gpt(n_layer=4, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return LossGPT(65, n_layer=n_layer, n_head=2, n_embd=32, block_size=16, dropout=dropout)


GPT_BATCH = (torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(1)),
             torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(2)))


class HFBlock(nn.Module):
    """GPT-2-style block: keyword arguments (an additive attention mask, flags) and a tuple output."""

    def __init__(self, d=24, n_head=2, p=0.1):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))
        self.attn_dropout, self.resid_dropout = nn.Dropout(p), nn.Dropout(p)

    def forward(self, hidden_states, attention_mask=None, use_cache=False, output_attentions=False):
        B, T, C = hidden_states.shape
        q, k, v = self.c_attn(self.ln_1(hidden_states)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // self.n_head) + attention_mask
        probs = self.attn_dropout(scores.softmax(-1))
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
        hidden_states = hidden_states + self.resid_dropout(self.c_proj(y))
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (probs,)
        return outputs


class GPT2Style(nn.Module):
    def __init__(self, n_layer=4, d=24, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(16, d), drop=nn.Dropout(0.1),
            h=nn.ModuleList(HFBlock(d) for _ in range(n_layer)), ln_f=nn.LayerNorm(d),
        ))
        self.heads = nn.ModuleList([nn.Linear(d, vocab), nn.Linear(d, vocab)])  # a shorter decoy list

    def forward(self, idx, targets):
        T = idx.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        hidden = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T)))
        for block in self.transformer.h:
            outputs = block(hidden, attention_mask=mask, use_cache=False)
            hidden = outputs[0]
        logits = self.heads[0](self.transformer.ln_f(hidden))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x, targets):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        logits = self.fc(x.mean((2, 3)))
        return logits, F.cross_entropy(logits, targets)


class AuxBlock(nn.Module):
    """Returns (x, aux): the parent unpacks the tuple and sums the auxiliary losses."""

    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(torch.tanh(self.fc1(x)))
        return x + self.fc2(h), h.pow(2).mean()


class TupleModel(nn.Module):
    def __init__(self, n_layer=4, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(AuxBlock(d) for _ in range(n_layer))

    def forward(self, x, targets):
        x, aux_total = self.inp(x), 0.0
        for layer in self.layers:
            x, aux = layer(x)
            aux_total = aux_total + aux
        return x, F.mse_loss(x, targets) + 0.1 * aux_total


STAND_INS = {
    "gpt": (gpt, lambda: GPT_BATCH),
    "gpt2_style": (GPT2Style, lambda: (torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3)),
                                       torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4)))),
    "resnet_style": (ResNetStyle, lambda: (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)),
                                           torch.tensor([1, 7]))),
    "tuple_blocks": (TupleModel, lambda: (torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(6)),
                                          torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7)))),
}


def step(model, batch):
    """One forward + backward from a fixed RNG state: loss, gradients, bytes saved, the next random number."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    with SavedActivationCounter(model) as saved:
        loss = model(*batch)[1]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved.bytes, torch.rand(3)


def assert_identical(result, reference):
    loss, grads, _, rng = result
    assert torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys()
    for name in grads:
        assert torch.equal(grads[name], reference[1][name]), f"gradient of {name} differs"
    assert torch.equal(rng, reference[3]), "the RNG state after the step differs"


POLICIES = [
    dict(segments=1),
    dict(segments=2),
    dict(segments=2, checkpoint_last=True),
    dict(segments=3),
    dict(segments=4),
    dict(full=True),
    dict(every_n=2),
    dict(selective=True),
    dict(selective=True, segments=2, checkpoint_last=True),
    dict(memory_budget="45%"),
    dict(offload=True, full=True),
    dict(full=True, use_reentrant=True),
    dict(number_checkpoints=2, profile=True, synchronize_checkpoint_boundary=True),
]


# Hugging Face models as users bring them: default config (use_cache=True: a KV cache object is handed to
# every layer), dropout on, called as the trainer calls them.
def hf_model(kind: str, n_layer: int = 4, use_cache: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, attention_dropout=0.1,
        )
        base = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(vocab_size=65, n_embd=32, n_layer=n_layer, n_head=4, n_positions=16)  # dropout 0.1
        base = transformers.GPT2LMHeadModel
    config.use_cache = use_cache

    class WithLoss(base):
        def forward(self, idx, targets=None, **kwargs):
            output = super().forward(input_ids=idx, **kwargs)
            self.last_cache = getattr(output, "past_key_values", None)
            return output.logits, (CausalLMLoss()(output, targets) if targets is not None else None)

    return WithLoss(config).train()


HF_KINDS = ["llama", "gpt2"]


# -- gradients and bytes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_gpt_gradients_bit_identical_and_bytes_as_predicted(policy):
    reference = step(gpt(), GPT_BATCH)
    model = checkpoint_activations(gpt(), example_input=GPT_BATCH, **policy)
    result = step(model, GPT_BATCH)
    assert_identical(result, reference)
    state = checkpointing_state(model)
    assert state.regions, "the policy checkpointed nothing"
    # the probe's sum for the plan's regions is the exact count of what forward kept
    assert result[2] == state.activation_profile.kept_bytes(state.regions)
    assert result[2] < reference[2]


@pytest.mark.parametrize("name", ["gpt2_style", "resnet_style", "tuple_blocks"])
@pytest.mark.parametrize("policy", [dict(segments=2), dict(full=True), dict(every_n=2), dict(selective=True),
                                    dict(memory_budget="80%")], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_stand_in_models_gradients_bit_identical(name, policy):
    build, batch = STAND_INS[name]
    if name == "resnet_style" and "selective" in policy:
        policy = dict(policy, save_ops=["aten.convolution"])  # convolutions are what a ResNet would keep
    reference_model = build()
    reference = step(reference_model, batch())
    model = checkpoint_activations(build(), example_input=batch(), **policy)
    result = step(model, batch())
    assert_identical(result, reference)
    state = checkpointing_state(model)
    assert result[2] == state.activation_profile.kept_bytes(state.regions)
    # recompute must not update batch-norm running statistics a second time
    for (name_a, a), (name_b, b) in zip(reference_model.named_buffers(), model.named_buffers()):
        assert name_a == name_b and torch.equal(a, b), name_a


def policy_id(policy: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in policy.items())


# The default run takes a policy of each kind (per block, segments, selective, budget) on each model; every
# policy runs on ds_hydra's GPT above, and on both Hugging Face models with -m slow.
HF_DEFAULT_RUN = {("llama", "full=True"), ("llama", "segments=2,checkpoint_last=True"), ("llama", "selective=True"),
                  ("llama", "memory_budget=45%"), ("gpt2", "full=True"), ("gpt2", "selective=True,segments=2,checkpoint_last=True")}


def hf_cases(policies):
    """(kind, policy) for every Hugging Face model and policy; those outside HF_DEFAULT_RUN are slow."""
    return [
        pytest.param(kind, policy, id=f"{policy_id(policy)}-{kind}",
                     marks=() if (kind, policy_id(policy)) in HF_DEFAULT_RUN else pytest.mark.slow)
        for policy in policies
        for kind in HF_KINDS
    ]


@pytest.mark.parametrize("kind,policy", hf_cases(POLICIES))
def test_hf_models_gradients_bit_identical_under_every_policy(kind, policy):
    """transformers' LlamaForCausalLM and GPT2LMHeadModel with dropout, as the trainer runs them (no KV
    cache): every policy gives the un-checkpointed gradients bit for bit and the bytes the probe adds up for the plan."""
    reference = step(hf_model(kind, use_cache=False), GPT_BATCH)
    model = checkpoint_activations(hf_model(kind, use_cache=False), example_input=GPT_BATCH, **policy)
    result = step(model, GPT_BATCH)
    assert_identical(result, reference)
    state = checkpointing_state(model)
    assert state.path == {"llama": "model.layers", "gpt2": "transformer.h"}[kind]
    assert result[2] == state.activation_profile.kept_bytes(state.regions) < reference[2]


@pytest.mark.parametrize("kind,policy", hf_cases([dict(selective=True), dict(full=True), dict(segments=2, checkpoint_last=True),
                                                   dict(memory_budget="30%")]))
def test_hf_kv_cache_is_never_written_twice(kind, policy):
    """Called directly with the default use_cache=True, every layer gets a DynamicCache. Before, the recompute
    appended the layer's keys and values a second time: selective checkpointing failed at backward
    ("aten.slice.Tensor encountered during backward but not found in storage") and full checkpointing silently
    doubled the cache. Checkpointed layers now run without the cache while training, as transformers' own
    checkpointing does: the step runs, the cache holds no position twice, and the gradients are the
    un-checkpointed model's (bit for bit on Llama; GPT-2's cached attention path differs from its uncached
    one by rounding alone)."""
    reference = step(hf_model(kind), GPT_BATCH)
    model = checkpoint_activations(hf_model(kind), example_input=GPT_BATCH, **policy)
    result = step(model, GPT_BATCH)
    assert model.last_cache is not None and model.last_cache.get_seq_length() == 0  # no checkpointed layer wrote it
    assert torch.equal(result[0], reference[0])
    for name, grad in reference[1].items():
        if kind == "llama":
            assert torch.equal(result[1][name], grad), name
        else:
            torch.testing.assert_close(result[1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_memory_budget_plan_uses_its_budget(kind):
    """On a foreign model the planner fills its budget as on ours: >= 90% of it where a per-block plan
    that close exists."""
    model = hf_model(kind, n_layer=8)
    none = step(model, GPT_BATCH)[2]
    checked = 0
    for fraction in (0.9, 0.7, 0.5, 0.3):
        budget = int(fraction * none)
        model = checkpoint_activations(hf_model(kind, n_layer=8), example_input=GPT_BATCH, memory_budget=budget)
        state = checkpointing_state(model)
        measured = step(model, GPT_BATCH)[2]
        assert measured == state.activation_profile.kept_bytes(state.regions) <= budget
        profile = state.activation_profile
        per_block = [profile.kept_bytes([Region(i, i + 1) for i in range(k, 8)]) for k in range(8)]
        if any(0.9 * budget <= b <= budget for b in per_block):
            assert measured >= 0.9 * budget, (fraction, measured / budget)
            checked += 1
    assert checked >= 2


def test_bytes_ordered_none_segments2_segments4_full():
    measured = {}
    for label, policy in [("none", {}), ("segments=2", dict(segments=2)), ("segments=4", dict(segments=4)),
                          ("full", dict(full=True))]:
        measured[label] = step(checkpoint_activations(gpt(), **policy), GPT_BATCH)[2]
    assert measured["none"] > measured["segments=2"] > measured["segments=4"] > measured["full"]
    # one segment is recomputed whole: only its input (and what lies outside the blocks) is kept
    assert step(checkpoint_activations(gpt(), segments=1), GPT_BATCH)[2] < measured["full"]
    # the formulas, with H, b and A measured by the probe (all four blocks alike)
    model = gpt()
    p = probe(model, list(model.blocks), GPT_BATCH)
    H, b, A = p.H, int(p.b), int(p.A)
    assert measured["none"] == H + 4 * A
    assert measured["segments=2"] == H + 1 * b + 2 * A  # K-1 inputs + the un-recomputed last segment
    assert measured["segments=4"] == H + 3 * b + 1 * A
    assert measured["full"] == H + 4 * b
    assert 10 < A / b < 40  # a transformer block saves 18-30x its input


def test_counter_counts_storages_once_and_skips_parameters():
    w = nn.Parameter(torch.randn(100, 100))
    x = torch.randn(10, 100, requires_grad=True)
    module = nn.Linear(100, 100)
    with SavedActivationCounter(module) as saved:
        h = x.exp()  # saves its output h (4000 bytes)
        h.sin().sum()  # saves h again: same storage, not counted twice
        (x @ w).sum()  # saves w (a parameter: skipped) and x (a leaf that requires grad: skipped)
        module(h)  # saves h (again) and module.weight (excluded)
    assert saved.bytes == 10 * 100 * 4


# -- the memory budget's plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.95, 0.7, 0.45, 0.25, 0.1, 0.075])
def test_memory_budget_plans_fit_and_are_minimal(fraction):
    none = step(gpt(), GPT_BATCH)[2]
    budget = int(fraction * none)
    model = checkpoint_activations(gpt(), example_input=GPT_BATCH, memory_budget=budget)
    measured = step(model, GPT_BATCH)[2]
    state = checkpointing_state(model)
    profile, regions = state.activation_profile, state.regions
    assert profile.kept_bytes([]) == none
    assert measured == profile.kept_bytes(regions) <= budget
    if any(r.size > 1 for r in regions):  # every block recomputed did not fit: merged into segments
        assert profile.kept_bytes([Region(i, i + 1) for i in range(4)]) > budget
        return
    modes = {r.start: "selective" if r.selective else "full" for r in regions}
    for i, mode in modes.items():  # minimal: one full recompute fewer (rest selective), or one selective fewer, does not fit
        trial = dict(modes)
        if mode == "full" and not selective_available():  # no per-op option on this torch: full regions only
            del trial[i]
        elif mode == "full":
            trial = {j: ("full" if modes.get(j) == "full" and j != i else "selective") for j in range(4)}
        else:
            del trial[i]
        assert profile.kept_bytes([Region(j, j + 1, m == "selective") for j, m in trial.items()]) > budget


def test_memory_budget_too_small_says_by_how_much():
    with pytest.raises(UserError, match=r"ckpt.memory_budget=.*does not fit.*over"):
        checkpoint_activations(gpt(), example_input=GPT_BATCH, memory_budget="2%")
    with pytest.raises(UserError, match="example_input"):
        checkpoint_activations(gpt(), memory_budget="1GiB")


def test_budget_planner_prefers_fewest_full_recomputes():
    model = gpt(n_layer=6)
    p = probe(model, list(model.blocks), GPT_BATCH)
    none = p.kept_bytes([])
    assert plan_for_budget(p, none, selective=False) == []
    previous = 0
    for fraction in (0.8, 0.6, 0.4, 0.2):
        regions = plan_for_budget(p, int(fraction * none), selective=False)
        assert p.kept_bytes(regions) <= fraction * none
        assert len(regions) >= previous  # a tighter budget never recomputes fewer blocks
        previous = len(regions)


def test_parse_budget_and_best_k():
    assert parse_budget("8GiB") == ("bytes", 8 * 2**30)
    assert parse_budget("500MB") == ("bytes", 500 * 10**6)
    assert parse_budget(1234) == ("bytes", 1234)
    assert parse_budget("40%") == ("fraction", 0.4)
    for bad in ("lots", "-3GB", "0", "150%"):
        with pytest.raises(ValueError, match="ckpt.memory_budget"):
            parse_budget(bad)
    assert best_segment_count(12, block_saved=18.0, block_input=1.0) == 12  # sqrt(12*18) = 14.7 > L
    assert best_segment_count(100, block_saved=1.0, block_input=1.0) == 10  # sqrt(L) when A = b


def test_segment_advice_logged_when_far_from_optimum(caplog):
    with caplog.at_level(logging.INFO, logger="ds_hydra.activation_checkpointing"):
        checkpoint_activations(gpt(n_layer=12, dropout=0.0), example_input=GPT_BATCH, segments=2)
    assert "consider ckpt.segments=12 (per-block checkpointing)" in caplog.text
    assert "kept for backward" in caplog.text


# -- model surgery -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [dict(segments=2), dict(full=True), dict(selective=True), dict(offload=True)])
def test_names_and_state_dict_unchanged_and_removable(policy):
    plain = gpt()
    model = checkpoint_activations(gpt(), **policy)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # strict, both ways
    plain.load_state_dict(model.state_dict())
    assert all(isinstance(b, type(plain.blocks[0])) for b in model.blocks)
    remove_activation_checkpointing(model)
    assert all(type(b) is type(plain.blocks[0]) for b in model.blocks)
    assert checkpointing_state(model) is None and not model._forward_hooks and not model._forward_pre_hooks
    assert_identical(step(model, GPT_BATCH), step(plain, GPT_BATCH))


def test_everything_off_leaves_model_untouched():
    model = gpt()
    before = [type(m) for m in model.modules()]
    assert checkpoint_activations(model, **vars(CkptConfig())) is model
    assert [type(m) for m in model.modules()] == before and checkpointing_state(model) is None
    assert not model._forward_pre_hooks


def test_every_n_state_is_per_model():
    a = checkpoint_activations(gpt(n_layer=4), every_n=2)
    b = checkpoint_activations(gpt(n_layer=6), every_n=2)
    c = checkpoint_activations(gpt(n_layer=4), every_n=2)
    assert checkpointing_state(a).checkpointed_blocks == [1, 3]
    assert checkpointing_state(b).checkpointed_blocks == [1, 3, 5]
    assert checkpointing_state(c).checkpointed_blocks == [1, 3]
    checkpoint_activations(a, every_n=2)  # applying again replaces the plan, it does not shift it
    assert checkpointing_state(a).checkpointed_blocks == [1, 3]


def test_eval_and_generation_run_the_plain_forward():
    model = checkpoint_activations(gpt(dropout=0.0), segments=2)
    plain = gpt(dropout=0.0)
    with torch.no_grad():
        assert torch.equal(model(GPT_BATCH[0])[0], plain(GPT_BATCH[0])[0])
        from ds_hydra.models.gpt import KVCache

        cache_a, cache_b = KVCache(model, batch=3), KVCache(plain, batch=3)
        assert torch.equal(model(GPT_BATCH[0][:, :5], kv_cache=cache_a)[0], plain(GPT_BATCH[0][:, :5], kv_cache=cache_b)[0])


def test_blocks_found_automatically_or_by_path():
    assert find_blocks(GPT2Style())[0] == "transformer.h"  # the longest same-type list, not the decoy
    assert find_blocks(ResNetStyle())[0] == "layer2"
    assert find_blocks(ResNetStyle(), "layer1")[0] == "layer1"
    model = checkpoint_activations(ResNetStyle(), blocks="layer1", full=True)
    assert checkpointing_state(model).path == "layer1"


def test_missing_block_list_lists_candidates():
    mixed = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(UserError, match=r"no block list found.*ckpt.blocks=.*candidates: <root> \(Sequential of 3"):
        checkpoint_activations(mixed, full=True)
    with pytest.raises(UserError, match=r"ckpt.blocks=transformer.hh: .*no such submodule.*transformer.h \(ModuleList of 4"):
        checkpoint_activations(GPT2Style(), blocks="transformer.hh", full=True)


# -- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,message", [
    (dict(segments=5), r"ckpt.segments=5: must be 0..4 \(the model has 4 blocks\)"),
    (dict(segments=-1), r"ckpt.segments=-1: must be 0..4"),
    (dict(every_n=9), r"ckpt.every_n=9: must be 0..4"),
    (dict(segments=2, full=True), r"ckpt.segments, ckpt.full each choose the recomputed blocks"),
    (dict(checkpoint_last=True), r"ckpt.checkpoint_last=true: applies only with ckpt.segments"),
    (dict(segments=2, number_checkpoints=3), r"ckpt.number_checkpoints=3: is DeepSpeed's name for ckpt.segments"),
    (dict(selective=True, use_reentrant=True), r"ckpt.selective=true: needs the non-reentrant"),
    (dict(full=True, bogus=1), r"unknown argument\(s\) bogus; allowed: segments"),
])
def test_bad_policies_are_one_clear_line(policy, message):
    with pytest.raises(UserError, match=message):
        checkpoint_activations(gpt(), **policy)


@pytest.mark.parametrize("keys,note", [
    (dict(partition_activations=True), "ckpt.partition_activations=true: DeepSpeed splits each checkpoint's inputs"),
    (dict(contiguous_memory_optimization=True), "ckpt.contiguous_memory_optimization=true: DeepSpeed copies partitioned"),
    (dict(profile=True, full=False), "ckpt.profile=true: no block policy is set, so it applies to the model's own"),
    (dict(synchronize_checkpoint_boundary=True), "ckpt.synchronize_checkpoint_boundary=true: no block policy is set"),
])
def test_deepspeed_keys_without_effect_are_logged_not_refused(keys, note, caplog):
    """As DeepSpeed without tensor parallelism: accepted, and one log line says they change nothing here."""
    with caplog.at_level(logging.INFO, logger="ds_hydra.activation_checkpointing.apply"):
        checkpoint_activations(gpt(), **keys)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(note)] != []


def test_partition_activations_leaves_gradients_as_they_were():
    torch.manual_seed(0)
    plain, partitioned = gpt(), gpt()
    partitioned.load_state_dict(plain.state_dict())
    checkpoint_activations(plain, full=True)
    checkpoint_activations(partitioned, full=True, partition_activations=True, contiguous_memory_optimization=True)
    x = torch.randint(0, 65, (2, 16))
    for model in (plain, partitioned):
        torch.manual_seed(1)
        model(x, x)[1].backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), partitioned.parameters()))


def test_validate_ckpt_collects_every_problem():
    cfg = compose(["model=gpt_tiny", "ckpt.segments=9", "ckpt.every_n=2", "ckpt.memory_budget=lots"]).ckpt
    problems = validate_ckpt(cfg, n_blocks=4)
    assert any("ckpt.segments=9" in p for p in problems)
    assert any("ckpt.memory_budget=lots" in p for p in problems)


@needs_selective
def test_save_ops_names_are_checked():
    with pytest.raises(UserError, match=r"'aten.mmm' is not an operator \(did you mean aten.mm\?\)"):
        checkpoint_activations(gpt(), selective=True, save_ops=["aten.mmm"])
    # an operator the blocks never run: at once with an example input, else after the first forward
    with pytest.raises(UserError, match=r"ckpt.save_ops: aten.convolution matched no op run by the checkpointed blocks"):
        checkpoint_activations(gpt(), example_input=GPT_BATCH, selective=True, save_ops=["matmul", "aten.convolution"])
    model = checkpoint_activations(gpt(), selective=True, save_ops=["aten.convolution"])
    with pytest.raises(UserError, match="aten.convolution matched no op"):
        model(*GPT_BATCH)
    # with dropout on the CPU, attention runs as plain matmuls: naming it is an error, the default list is not
    with pytest.raises(UserError, match="attention matched no op"):
        checkpoint_activations(gpt(dropout=0.1), example_input=GPT_BATCH, selective=True, save_ops=["matmul", "attention"])
    checkpoint_activations(gpt(dropout=0.1), example_input=GPT_BATCH, selective=True)
    checkpoint_activations(gpt(dropout=0.0), example_input=GPT_BATCH, selective=True, save_ops=["attention", "aten.mm.default"])


@needs_selective
def test_selective_keeps_attention_output_without_dropout():
    """Without dropout the fused attention kernel runs and its output is kept, not recomputed."""
    with_attention = step(checkpoint_activations(gpt(dropout=0.0), selective=True), GPT_BATCH)[2]
    without = step(checkpoint_activations(gpt(dropout=0.0), selective=True, save_ops=["matmul"]), GPT_BATCH)[2]
    assert with_attention > without


def test_segments_of_a_non_sequential_parent_are_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x) * 0.5  # each block's input is not the previous block's output
            return x

    model = checkpoint_activations(Scaled(), segments=2)
    with pytest.raises(UserError, match="block 1 was not called with the previous block's output"):
        model(torch.randn(2, 8, requires_grad=True))
    model = checkpoint_activations(Scaled(), full=True)  # per-block works for any parent
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()


def test_segments_need_the_hidden_state_positionally():
    class KwOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = layer(input=x)
            return x

    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(UserError, match="block 0 got its input as a keyword argument"):
        checkpoint_activations(KwOnly(), segments=2)(x)
    torch.manual_seed(0)
    reference = KwOnly()
    reference(x).sum().backward()
    torch.manual_seed(0)
    model = checkpoint_activations(KwOnly(), full=True)
    model(x).sum().backward()
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_reentrant_refuses_keyword_tensors_that_need_grad():
    class KwBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, gate=None):
            return self.fc(x) * gate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(KwBlock() for _ in range(2))
            self.gate = nn.Parameter(torch.ones(4))

        def forward(self, x):
            for block in self.blocks:
                x = block(x, gate=self.gate)
            return x

    model = checkpoint_activations(Net(), full=True, use_reentrant=True)
    with pytest.raises(UserError, match="ckpt.use_reentrant=true: block 0 gets a keyword tensor"):
        model(torch.randn(2, 4))


# -- offload, profile, DeepSpeed keys --------------------------------------------------------------------------
def test_offload_on_cpu_is_a_logged_no_op(caplog):
    model = checkpoint_activations(gpt(), offload=True)
    with caplog.at_level(logging.INFO, logger="ds_hydra.activation_checkpointing"):
        step(model, GPT_BATCH)
        step(model, GPT_BATCH)
    assert caplog.text.count("offload does nothing") == 1
    assert checkpoint_activations(gpt(), cpu_checkpointing=True, full=True) is not None
    assert checkpointing_state(checkpoint_activations(gpt(), cpu_checkpointing=True)).offload is not None


@pytest.mark.parametrize("policy", [dict(offload=True), dict(offload=True, full=True), dict(offload=True, segments=2)])
def test_offload_hooks_copy_saved_activations_and_keep_gradients(policy):
    """The offload machinery, exercised on the CPU: every saved activation is copied out and back."""
    from ds_hydra.activation_checkpointing.offload import OffloadHooks

    reference = step(gpt(), GPT_BATCH)
    model = checkpoint_activations(gpt(), **policy)
    state = checkpointing_state(model)
    state.offload.remove()
    state.offload = OffloadHooks(model, _copy_on_cpu=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    with SavedActivationCounter(model) as saved:
        loss = model(*GPT_BATCH)[1]
    loss.backward()
    assert torch.equal(loss.detach(), reference[0])
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, reference[1][name]), name
    assert saved.offloaded_bytes == saved.bytes > 0  # everything but the parameters went to host copies
    if len(policy) == 1:
        assert saved.bytes == reference[2]


def test_profile_records_forward_and_recompute_times(caplog):
    model = checkpoint_activations(gpt(), number_checkpoints=2, checkpoint_last=True, profile=True)
    assert [(r.start, r.end) for r in checkpointing_state(model).regions] == [(0, 2), (2, 4)]
    with caplog.at_level(logging.INFO, logger="ds_hydra.activation_checkpointing"):
        step(model, GPT_BATCH)
    times = checkpointing_state(model).last_times
    assert set(times) == {0, 1} and all({"forward", "recompute"} <= set(t) for t in times.values())
    assert "ckpt.profile: blocks 0-1: forward" in caplog.text


# -- compile and the trainer -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("policy", [dict(segments=2), dict(full=True), dict(selective=True)])
def test_blocks_still_compile(policy):
    from ds_hydra.training.trainer import OLD_DYNAMO

    if OLD_DYNAMO and policy.get("segments", 1) > 1:
        pytest.skip(f"torch {torch.__version__} cannot recompute a segment whose later blocks are compiled (torch >= 2.5)")
    reference = step(gpt(dropout=0.0), GPT_BATCH)
    model = checkpoint_activations(gpt(dropout=0.0), **policy)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    result = step(model, GPT_BATCH)
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-5, atol=1e-6)


def test_train_reports_activation_bytes(tmp_path):
    from ds_hydra.training.trainer import train

    results = {}
    for option in ("none", "full"):
        overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.eval_batches"))]
        cfg = compose([*overrides, "trainer.max_steps=2", "trainer.eval_batches=1", f"ckpt={option}"])
        results[option] = train(cfg, run_dir=tmp_path / option)["activation_bytes"]
    assert 0 < results["full"] < results["none"]


@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO / "conf" / "ckpt").glob("*.yaml")))
def test_every_ckpt_option_applies_to_gpt_tiny(option):
    from ds_hydra.validation import config_problems

    from ds_hydra.training.memory_fit import fit_to_memory

    cfg = compose(["model=gpt_tiny", f"ckpt={option}", "trainer.memory_limit=64MiB"])
    assert config_problems(cfg) == []
    fit_to_memory(cfg)  # ckpt=auto: its budget fitted to the limit, as a run does before anything is built
    from omegaconf import OmegaConf

    model = checkpoint_activations(gpt(), example_input=GPT_BATCH, **OmegaConf.to_container(cfg.ckpt))
    assert_identical(step(model, GPT_BATCH), step(gpt(), GPT_BATCH))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [dict(offload=True), dict(offload=True, full=True), dict(cpu_checkpointing=True, segments=2)])
def test_offload_moves_saved_activations_to_host_on_cuda(policy):
    device = torch.device("cuda")
    batch = tuple(t.to(device) for t in GPT_BATCH)
    plain = gpt(dropout=0.0).to(device)
    model = checkpoint_activations(gpt(dropout=0.0).to(device), **policy)
    results = {}
    for name, m in (("plain", plain), ("offload", model)):
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with SavedActivationCounter(m) as saved:
            loss = m(*batch)[1]
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        results[name] = (held, saved, {n: p.grad.float().cpu() for n, p in m.named_parameters()})
    assert results["offload"][1].offloaded_bytes > 0
    assert results["offload"][0] < 0.5 * results["plain"][0]  # the device holds far less between forward and backward
    for name, grad in results["plain"][2].items():
        torch.testing.assert_close(results["offload"][2][name], grad, rtol=1e-4, atol=1e-5)
