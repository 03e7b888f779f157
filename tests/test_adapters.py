"""Adapters (adapter=lora|dora) and a quantized base (model.quantize): checked against peft's own output.

A small Llama saved with ``save_pretrained`` is trained through ``model.pretrained=``: peft's
``get_peft_model`` is the reference for the trainable parameters, ``PeftModel.from_pretrained`` for
what the run's ``adapter/`` holds, and ``merge_and_unload`` for the merged export.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ENGINE_RUN, compose

pytest.importorskip("transformers", reason="Hugging Face models are an optional extra (hf)")
pytest.importorskip("peft", reason="adapters are an optional extra (peft)")

VOCAB = 65  # the embedded Tiny Shakespeare characters
LLAMA_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
RUN = [o for o in ENGINE_RUN if not o.startswith("model=")] + ["data.seq_len=32", "optimizer.lr=0.01", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A small random Llama written with ``save_pretrained`` (config.json + model.safetensors)."""
    import transformers

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama_base")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG)).save_pretrained(folder)
    return folder


def load_base(base_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True).eval()


def llama_run(base_dir: Path, *extra: str):
    return [*RUN, "model=hf_causal_lm", f"model.pretrained={base_dir}", "adapter=lora", *extra]


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory) -> Path:
    from ds_hydra.training.trainer import train

    run_dir = tmp_path_factory.mktemp("lora_run")
    train(compose(llama_run(base_dir)), run_dir=run_dir)
    return run_dir


def tokens(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def test_trainable_parameters_are_peft_s_and_step_0_logits_are_the_base_s(base_dir):
    import peft

    from ds_hydra.models.build import build_model

    cfg = compose(llama_run(base_dir))
    model = build_model(cfg.model, VOCAB, cfg.adapter).eval()
    reference = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    trainable, _ = reference.get_nb_trainable_parameters()
    ours = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # 2 layers x r x (in + out) of q_proj (32 -> 32) and v_proj (32 -> 2 key/value heads x 8)
    assert sum(ours.values()) == trainable == 2 * 8 * ((32 + 32) + (32 + 16))
    assert all(".lora_A." in n or ".lora_B." in n for n in ours)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_base(base_dir)(x).logits)  # B starts at zero: the base's output


def test_run_keeps_only_the_adapter_and_peft_loads_it(lora_run, base_dir):
    import peft
    from safetensors.torch import load_file

    import ds_hydra
    from ds_hydra.training.state import latest_checkpoint, safe_torch_load

    state = safe_torch_load(latest_checkpoint(lora_run))
    assert state["model"] and all("lora_" in name for name in state["model"])  # not the frozen base
    assert len(state["optimizer"]["state"]) == len(state["model"])  # the optimizer holds only the adapters
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    saved = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    reference = peft.PeftModel.from_pretrained(load_base(base_dir), str(lora_run / "adapter")).eval()
    ours = ds_hydra.load_model(str(lora_run))
    x = tokens()
    with torch.no_grad():
        want, got = reference(x).logits, ours(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (got - load_base(base_dir)(x).logits).abs().max() > 1e-3  # and the adapter changed the model


def test_a_run_without_the_adapter_refuses_an_adapter_checkpoint(lora_run, base_dir):
    """The adapter's weights alone, resumed with adapter=none: one line naming the adapter, nothing loaded."""
    from ds_hydra.errors import UserError
    from ds_hydra.training.state import latest_checkpoint
    from ds_hydra.training.trainer import Trainer

    trainer = Trainer(compose([*llama_run(base_dir), "adapter=none"]), lora_run.parent / "no_adapter")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(UserError, match=r"adapter's weights alone; resume it with adapter=lora") as refused:
        trainer.load(latest_checkpoint(lora_run))
    assert "\n" not in str(refused.value)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_export_hf_writes_the_base_plus_the_adapter_merged(lora_run, base_dir, tmp_path):
    import peft
    import transformers

    from ds_hydra.inference.export_hf import export_hf

    out = export_hf(lora_run, run_dir=tmp_path / "export")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out["export_dir"], local_files_only=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = peft.PeftModel.from_pretrained(load_base(base_dir), str(lora_run / "adapter")).merge_and_unload()
    base = load_base(base_dir).state_dict()
    got = merged.state_dict()
    for name, want in reference.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    # W + (alpha / r) B A on the adapted layers, the base elsewhere
    adapter = peft.PeftModel.from_pretrained(load_base(base_dir), str(lora_run / "adapter"))
    layer = adapter.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (16 / 8)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], base[name] + delta, rtol=0, atol=1e-6)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.slow
def test_adapter_run_resumes_exactly(base_dir, tmp_path):
    from ds_hydra.training.state import checkpoint_path, latest_checkpoint, safe_torch_load
    from ds_hydra.training.trainer import train

    run = llama_run(base_dir, "adapter.dropout=0.1")  # dropout: the RNG state matters too
    train(compose(run), run_dir=tmp_path / "whole")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    train(compose([*run, f"resume={checkpoint_path(resumed, 2)}"]))
    got, want = (safe_torch_load(latest_checkpoint(d)) for d in (resumed, tmp_path / "whole"))
    assert got["step"] == want["step"] == 4
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


@pytest.mark.slow
def test_gpt_adapter_run_keeps_its_random_base_and_loads_back(tmp_path):
    """The built-in GPT from a random initialisation: the base is written once into the run dir."""
    import peft

    import ds_hydra
    from ds_hydra.training.state import safe_torch_load
    from ds_hydra.training.trainer import train

    run_dir = tmp_path / "gpt"
    train(compose([*RUN, "model=gpt_tiny", "adapter=lora"]), run_dir=run_dir)
    base = safe_torch_load(run_dir / "base_model.pt")["model"]
    assert "blocks.0.attn.qkv.weight" in base and not any("lora" in k for k in base)
    ours = ds_hydra.load_model(str(run_dir))
    assert {n.split(".lora_")[0] for n, _ in ours.named_parameters() if "lora_" in n} == {f"blocks.{i}.attn.qkv" for i in range(len(ours.blocks))}
    cfg = compose([*RUN, "model=gpt_tiny"])
    from ds_hydra.models.build import build_model

    plain = build_model(cfg.model, VOCAB)
    plain.load_state_dict(base)
    reference = peft.PeftModel.from_pretrained(plain, str(run_dir / "adapter")).eval()
    x = tokens(t=8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


def test_no_matching_module_is_refused_in_one_line_naming_the_modules(base_dir):
    from ds_hydra.errors import UserError
    from ds_hydra.models.build import build_model

    cfg = compose(llama_run(base_dir, "adapter.target_modules=[qkv]"))
    with pytest.raises(UserError) as caught:
        build_model(cfg.model, VOCAB, cfg.adapter)
    message = str(caught.value)
    assert "\n" not in message and "qkv matches no module of LlamaForCausalLM" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message


def test_quantizing_weights_that_train_is_refused_in_one_line():
    from ds_hydra.errors import ConfigError
    from ds_hydra.validation import validate_config

    with pytest.raises(ConfigError) as caught:
        validate_config(compose(["model=gpt_tiny", "model.quantize=nf4"]))
    assert "\n" not in str(caught.value) and "model.quantize=nf4: would quantize weights that train" in str(caught.value)
    validate_config(compose(["model=gpt_tiny", "model.quantize=nf4", "adapter=lora"]))  # QLoRA: the base is frozen


# -- activation checkpointing with adapters ------------------------------------------------------------
def with_lora(model, name: str = "lora", **extra):
    """``model`` with adapters on every linear layer but the head, adapter dropout on, and B drawn at random
    (zero B would leave A's gradient zero and the check empty)."""
    from omegaconf import OmegaConf

    from ds_hydra.models.adapters import adapt_model

    adapt_model(model, None, OmegaConf.create({"name": name, "r": 4, "alpha": 8, "dropout": 0.1,
                                                "target_modules": "all-linear", "use_rslora": False, **extra}))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "lora_B" in param_name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def ac_cases():
    """A policy of each kind on the built-in GPT and per-block on the Llama by default; every policy on both
    with -m slow."""
    from test_activation_checkpointing import POLICIES, policy_id

    fast_gpt = {"full=True,use_reentrant=True", "segments=2,checkpoint_last=True", "selective=True", "memory_budget=45%"}
    fast_llama = {"full=True"}
    cases = [pytest.param("gpt", p, id=f"gpt-{policy_id(p)}", marks=() if policy_id(p) in fast_gpt else pytest.mark.slow)
             for p in POLICIES]
    cases += [pytest.param("llama", p, id=f"llama-{policy_id(p)}", marks=() if policy_id(p) in fast_llama else pytest.mark.slow)
              for p in POLICIES]
    return cases


@pytest.mark.parametrize("kind,policy", ac_cases())
def test_every_checkpointing_policy_keeps_adapter_gradients_bit_identical(kind, policy):
    from test_activation_checkpointing import GPT_BATCH, assert_identical, gpt, hf_model, step

    from ds_hydra.activation_checkpointing import checkpoint_activations

    build = (lambda: with_lora(gpt())) if kind == "gpt" else (lambda: with_lora(hf_model("llama", use_cache=False)))
    reference_model = build()
    reference = step(reference_model, GPT_BATCH)
    assert reference[1] and all("lora_" in name for name in reference[1])  # only the adapters get gradients
    assert all(g.abs().sum() > 0 for g in reference[1].values())
    model = checkpoint_activations(build(), example_input=GPT_BATCH, **policy)
    assert_identical(step(model, GPT_BATCH), reference)


# -- DoRA ----------------------------------------------------------------------------------------------------
def test_dora_trains_peft_s_parameters_and_starts_at_the_base(base_dir):
    import peft

    from ds_hydra.models.build import build_model

    cfg = compose([*llama_run(base_dir), "adapter=dora"])
    model = build_model(cfg.model, VOCAB, cfg.adapter).eval()
    reference = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, task_type="CAUSAL_LM"))
    trainable, _ = reference.get_nb_trainable_parameters()
    ours = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(ours.values()) == trainable == 2 * 8 * ((32 + 32) + (32 + 16)) + 2 * (32 + 16)  # + a magnitude per output
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, load_base(base_dir)(x).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_dora_run_loads_in_peft(base_dir, tmp_path):
    import peft

    import ds_hydra
    from ds_hydra.training.trainer import train

    train(compose([*llama_run(base_dir), "adapter=dora"]), run_dir=tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    reference = peft.PeftModel.from_pretrained(load_base(base_dir), str(tmp_path / "dora" / "adapter")).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ds_hydra.load_model(str(tmp_path / "dora"))(x).logits, reference(x).logits, rtol=0, atol=1e-5)


# -- a quantized base (QLoRA) --------------------------------------------------------------------------------
def test_nf4_base_is_bitsandbytes_storage_and_computes_with_its_rounded_weights(base_dir):
    """Every linear layer but the head is stored as bitsandbytes' nf4 (two 4-bit codes per byte, a scale per 64
    weights, the scales quantized again: QLoRA's double quantization), frozen; at step 0 the model computes what the base computes with each of those weights
    rounded to nf4 and back by bitsandbytes' own functions."""
    bnb = pytest.importorskip("bitsandbytes")

    from ds_hydra.models.build import build_model, num_params

    cfg = compose([*llama_run(base_dir), "model.quantize=nf4"])
    model = build_model(cfg.model, VOCAB, cfg.adapter).eval()
    base = load_base(base_dir)
    linear = [name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert len(linear) == 2 * 7
    for name in linear:
        layer = model.get_submodule(name)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8 and not weight.requires_grad
        assert weight.numel() == base.get_submodule(name).weight.numel() // 2
    assert type(model.lm_head) is torch.nn.Linear  # the head keeps its precision
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert num_params(model) == sum(p.numel() for p in base.parameters()) + adapter  # the size logged: unpacked
    # the reference: the base with its weights rounded through bitsandbytes' quantize/dequantize
    rounded = load_base(base_dir)
    with torch.no_grad():
        for name in linear:
            module = rounded.get_submodule(name)
            packed, state = bnb.functional.quantize_4bit(module.weight.data, quant_type="nf4", compress_statistics=True)
            module.weight.copy_(bnb.functional.dequantize_4bit(packed, state))
    x = tokens()
    with torch.no_grad():
        got, want = model(x).logits, rounded(x).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - base(x).logits).abs().max() > 1e-4  # the weights really are rounded


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_run_trains_resumes_and_exports_into_the_full_precision_base(base_dir, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    import peft
    import transformers

    import ds_hydra
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.training.state import checkpoint_path, latest_checkpoint, safe_torch_load
    from ds_hydra.training.trainer import train

    run = [*llama_run(base_dir), f"model.quantize={mode}"]
    train(compose(run), run_dir=tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    train(compose([*run, f"resume={checkpoint_path(tmp_path / 'resumed', 2)}"]))
    got, want = (safe_torch_load(latest_checkpoint(tmp_path / d)) for d in ("resumed", "whole"))
    assert got["model"].keys() == want["model"].keys() and all("lora_" in k for k in want["model"])
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    loaded = ds_hydra.load_model(str(tmp_path / "whole"))
    assert any(getattr(p, "quant_state", None) is not None or p.dtype == torch.int8 for p in loaded.parameters())
    out = export_hf(tmp_path / "whole", run_dir=tmp_path / "export")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out["export_dir"], local_files_only=True)
    reference = peft.PeftModel.from_pretrained(load_base(base_dir), str(tmp_path / "whole" / "adapter")).merge_and_unload()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


# -- several processes -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_train_the_adapter_one_process_does(base_dir, tmp_path, engine):
    """torchrun, gloo: two ranks of 4 sequences train the adapter that one process does with two micro-batches
    of 4; the checkpoint and adapter/ hold only the adapter."""
    from test_distributed import final_checkpoint, only_run_dir, torchrun

    from ds_hydra.engine.fsdp import fsdp_unsupported
    from ds_hydra.training.trainer import train

    if engine == "fsdp" and fsdp_unsupported(torch.device("cpu")):
        pytest.skip(fsdp_unsupported(torch.device("cpu")))
    train(compose([*llama_run(base_dir), "trainer.grad_accum_steps=2"]), run_dir=tmp_path / "one")
    (tmp_path / "two").mkdir()
    proc = torchrun([*llama_run(base_dir), f"engine={engine}"], cwd=tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "two")
    assert f"{engine}: rank 0 of 2" in (run_dir / "rank0.log").read_text()
    got, want = (final_checkpoint(d)["model"] for d in (run_dir, tmp_path / "one"))
    assert got.keys() == want.keys() and all("lora_" in k for k in want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_ranks_train_a_random_qlora_base_one_process_does(tmp_path):
    """DDP, two gloo ranks, a QLoRA base from model.config: every rank initialises the same base block by block,
    rank 0 alone keeps it; the adapter trains as one process's two micro-batches do."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from test_distributed import final_checkpoint, only_run_dir, torchrun

    from ds_hydra.training.trainer import train

    run = random_llama_run("model.quantize=nf4")
    train(compose([*run, "trainer.grad_accum_steps=2"]), run_dir=tmp_path / "one")
    (tmp_path / "two").mkdir()
    proc = torchrun([*run, "engine=ddp"], cwd=tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "two")
    got, want = (final_checkpoint(d)["model"] for d in (run_dir, tmp_path / "one"))
    assert got.keys() == want.keys() and all("lora_" in k for k in want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for file in (tmp_path / "one" / "base_model").glob("*.safetensors"):
        kept, reference = load_file(str(run_dir / "base_model" / file.name)), load_file(str(file))
        assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)
    assert not (run_dir / "base_model.partial").exists()


def _saved_entries(checkpoint: Path):
    """The model and optimizer entries a sharded checkpoint's index lists (nothing else read)."""
    from ds_hydra.training.sharded_checkpoint import read_metadata

    metadata = read_metadata(checkpoint)
    paths = [metadata.planner_data[key] for key in metadata.state_dict_metadata]
    model = {p[1] for p in paths if p[0] == "model"}
    moments = {p[2] for p in paths if p[:2] == ("optimizer", "state")}
    return model, moments


def test_one_process_sharded_adapter_checkpoint_holds_the_adapter_and_resumes_exactly(base_dir, tmp_path):
    """checkpoint_format=dcp with an adapter: the adapter's parameters and their optimizer state alone (no base
    weight or buffer), <run dir>/adapter written beside; resumed, the next losses and the final state are the
    uninterrupted run's."""
    from test_distributed import final_checkpoint
    from test_sharded_checkpoints import _losses, assert_same_state

    import ds_hydra
    from ds_hydra.errors import UserError
    from ds_hydra.models.adapters import trainable_names
    from ds_hydra.models.build import build_model
    from ds_hydra.training.checkpoint_convert import convert_checkpoint
    from ds_hydra.training.sharded_checkpoint import load_checkpoint_state
    from ds_hydra.training.trainer import train

    run = [*llama_run(base_dir), "trainer.checkpoint_format=dcp"]
    train(compose(run), run_dir=tmp_path / "whole")
    step2 = tmp_path / "whole" / "checkpoints" / "step_0000002"
    cfg = compose(run)
    lora = set(trainable_names(build_model(cfg.model, VOCAB, cfg.adapter)))
    assert len(lora) == 2 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in 2 layers
    assert _saved_entries(step2) == (lora, lora)
    assert (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").is_file()
    final = final_checkpoint(tmp_path / "whole")
    loaded = dict(ds_hydra.load_model(str(tmp_path / "whole")).named_parameters())  # the base with the adapter in place
    assert all(torch.equal(loaded[name], tensor) for name, tensor in final["model"].items())
    converted = convert_checkpoint(step2, tmp_path / "step_0000002.pt")
    assert_same_state(load_checkpoint_state(converted), load_checkpoint_state(step2))
    with pytest.raises(UserError, match=r"adapter's weights alone; resume it with adapter=lora") as refused:
        train(compose([*run, "adapter=none", f"resume={step2}"]))  # not DCP's traceback of a missing key
    assert "\n" not in str(refused.value)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000004")
    train(compose([*run, f"resume={tmp_path / 'resumed' / 'checkpoints' / 'step_0000002'}"]))
    got, want = _losses(tmp_path / "resumed"), _losses(tmp_path / "whole")
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]
    assert_same_state(final_checkpoint(tmp_path / "resumed"), final)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_shard_the_adapter_alone_and_resume_it_exactly(base_dir, tmp_path, engine):
    """torchrun, gloo, 2 ranks: the default (dcp) checkpoint of an adapter run holds the adapter's parameters and
    their optimizer state alone, in each rank's shards; resumed on 2 ranks from step 2, the next losses and the
    final state are the uninterrupted run's."""
    from test_distributed import final_checkpoint, torchrun
    from test_sharded_checkpoints import _losses, assert_same_state

    from ds_hydra.engine.fsdp import fsdp_unsupported

    if engine == "fsdp" and fsdp_unsupported(torch.device("cpu")):
        pytest.skip(fsdp_unsupported(torch.device("cpu")))
    whole = tmp_path / "whole"
    proc = torchrun([*llama_run(base_dir), f"engine={engine}", f"hydra.run.dir={whole}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = whole / "checkpoints" / "step_0000002"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in step2.iterdir()}
    model, moments = _saved_entries(step2)
    assert model and model == moments and all("lora_" in name for name in model)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    proc = torchrun([f"resume={resumed / 'checkpoints' / 'step_0000002'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _losses(resumed), _losses(whole)
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=1e-6)
    assert_same_state(final_checkpoint(resumed), final_checkpoint(whole), exact=engine == "ddp")


# -- a model of the user's own (model=custom) ----------------------------------------------------------------
def test_custom_module_takes_adapters_by_module_name_and_needs_names(monkeypatch):
    """README's own TinyLM (tests/byo): no architecture default, so target_modules must name modules; named,
    only those layers' adapters train and the model starts as the base."""
    from ds_hydra.errors import UserError
    from ds_hydra.models.build import build_model

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "byo"))
    custom = ["model=custom", "model._target_=my_models.build_model", "allowed_targets=[my_models]", "adapter=lora"]
    cfg = compose(custom)
    with pytest.raises(UserError) as caught:
        build_model(cfg.model, VOCAB, cfg.adapter)
    assert "\n" not in str(caught.value) and "TinyLM has no default targets" in str(caught.value)
    assert "its linear layers: out_proj, linear1, linear2, head" in str(caught.value)
    cfg = compose([*custom, "adapter.target_modules=[linear1,linear2]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, cfg.adapter).eval()
    trainable = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{name}" for i in range(2) for name in ("linear1", "linear2")}
    from my_models import build_model as build_tiny

    torch.manual_seed(0)
    base = build_tiny(VOCAB).eval()
    x = tokens(t=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


def test_memory_preflight_counts_frozen_quantized_and_trained_bytes_apart():
    """The preflight builds the model as it trains (fake tensors): gradients and optimizer state for the adapters
    alone, and a quantized base at bitsandbytes' storage (its packed weights and the quantization state kept
    beside them: scales, code tables)."""
    pytest.importorskip("bitsandbytes")
    from ds_hydra.models.build import build_model
    from ds_hydra.training.memory_estimate import estimate_step_memory
    from ds_hydra.training.memory_preflight import step_spec

    llama = ["model=hf_llama", "model.config.hidden_size=128", "model.config.intermediate_size=384", "trainer.device=cpu",
             "data.seq_len=32", "adapter=lora"]
    for quantize in ("none", "nf4"):
        cfg = compose([*llama, f"model.quantize={quantize}"])
        estimate = estimate_step_memory(step_spec(cfg))
        model = build_model(cfg.model, VOCAB, cfg.adapter)  # the real one
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert estimate.gradients == trained and estimate.optimizer_state == 2 * trained  # AdamW: two moments
        stored = sum(p.numel() * p.element_size() for p in model.parameters())  # nf4: two codes per byte
        assert estimate.parameters == stored + _quant_state_bytes(model)


def test_memory_preflight_counts_loading_a_quantized_base(base_dir):
    """Loading a QLoRA base holds the stored base plus one block's quantized linear weights at their dtype (a
    transformers model, read from model.pretrained or initialised from model.config, block by block), or, for a
    base built whole (another builder), all of them."""
    pytest.importorskip("bitsandbytes")
    from ds_hydra.training.memory_estimate import estimate_step_memory
    from ds_hydra.training.memory_preflight import step_spec

    block_linear = 4 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64)  # q, o: 32x32; k, v: 16x32 (2 kv heads); gate, up, down: 32x64 (fp32)
    pretrained = estimate_step_memory(step_spec(compose([*llama_run(base_dir), "model.quantize=nf4", "trainer.device=cpu"])))
    assert pretrained.loading == pretrained.parameters + block_linear
    fields = [f"+model.config.{k}={v}" for k, v in LLAMA_CONFIG.items()]
    random = estimate_step_memory(step_spec(compose([*RUN, "model=hf_causal_lm", "+model.config.model_type=llama", *fields,
                                                     "adapter=lora", "model.quantize=nf4", "trainer.device=cpu"])))
    assert random.loading == random.parameters + block_linear  # initialised and kept block by block
    gpt_cfg = compose([*RUN, "model=gpt_tiny", "adapter=lora", "model.quantize=nf4", "trainer.device=cpu"])
    gpt = estimate_step_memory(step_spec(gpt_cfg))
    from ds_hydra.models.adapters import output_layer_names
    from ds_hydra.models.build import build_base_model

    plain = build_base_model(gpt_cfg.model, VOCAB)
    heads = output_layer_names(plain)
    quantized = sum(4 * m.weight.numel() for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n not in heads)
    assert gpt.loading == gpt.parameters + quantized  # not a transformers model: built whole, then quantized
    assert random.total == max(random.step_total, random.loading) and "loading" in random.breakdown()


def random_llama_run(*extra: str, tied: bool = True):
    """A Llama initialised from ``model.config`` (no directory holds its base) with LoRA."""
    fields = [f"+model.config.{k}={v}" for k, v in {**LLAMA_CONFIG, "tie_word_embeddings": tied}.items()]
    return [*RUN, "model=hf_causal_lm", "+model.config.model_type=llama", *fields, "adapter=lora", *extra]


@pytest.fixture(scope="module")
def random_qlora_run(tmp_path_factory) -> Path:
    pytest.importorskip("bitsandbytes")
    from ds_hydra.training.trainer import train

    run_dir = tmp_path_factory.mktemp("random_qlora") / "run"
    train(compose(random_llama_run("model.quantize=nf4")), run_dir=run_dir)
    return run_dir


def test_random_qlora_base_is_kept_block_by_block_as_the_full_build_keeps_it(random_qlora_run, tmp_path):
    """A QLoRA run from a random base writes that base as a model directory, one safetensors file per block
    as the block is initialised (before it is quantized), not base_model.pt from the whole model: the same
    tensors, bit for bit, as a LoRA run of the same seed keeps from its whole build; transformers reads it."""
    import transformers
    from safetensors.torch import load_file

    from ds_hydra.training.state import safe_torch_load
    from ds_hydra.training.trainer import train

    folder = random_qlora_run / "base_model"
    assert not (random_qlora_run / "base_model.pt").exists() and not (random_qlora_run / "base_model.partial").exists()
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"block-{i:05d}.safetensors" for i in range(LLAMA_CONFIG["num_hidden_layers"])] + ["rest.safetensors"]
    assert set(load_file(str(folder / "block-00001.safetensors"))) == {
        k for k in transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG)).state_dict() if k.startswith("model.layers.1.")}
    kept = {}
    for file in files:
        kept.update(load_file(str(folder / file)))
    train(compose(random_llama_run()), run_dir=tmp_path / "lora")  # built whole, kept in base_model.pt
    whole = safe_torch_load(tmp_path / "lora" / "base_model.pt")["model"]
    assert set(whole) - set(kept) == {"lm_head.weight"}  # tied to the embedding: kept once, as transformers does
    for name, tensor in kept.items():
        assert torch.equal(tensor, whole[name]), name
    read = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert torch.equal(read.lm_head.weight, whole["model.embed_tokens.weight"])


def test_a_kept_base_naming_a_file_outside_its_folder_is_refused(random_qlora_run, tmp_path):
    """The run's base folder is data: an index pointing outside it is refused in one line, nothing read there."""
    import ds_hydra
    from ds_hydra.errors import UserError

    run = tmp_path / "copied"
    shutil.copytree(random_qlora_run, run)
    index_file = run / "base_model" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(run / "base_model" / "rest.safetensors", outside)
    index["weight_map"] = {k: ("../../elsewhere.safetensors" if v == "rest.safetensors" else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside its own directory"):
        ds_hydra.load_model(str(run))


def test_reading_a_base_block_by_block_logs_its_progress(base_dir, caplog, monkeypatch):
    """A large base takes minutes to read: lines say how many blocks are done and how long is left."""
    pytest.importorskip("bitsandbytes")
    import logging

    from ds_hydra.models import quantized_load
    from ds_hydra.models.build import build_model

    monkeypatch.setattr(quantized_load, "PROGRESS_EVERY_S", 0.0)
    cfg = compose([*llama_run(base_dir), "model.quantize=nf4"])
    with caplog.at_level(logging.INFO, logger="ds_hydra.models.quantized_load"):
        build_model(cfg.model, VOCAB, cfg.adapter)
    lines = [r.getMessage() for r in caplog.records if r.name == "ds_hydra.models.quantized_load"]
    assert lines[0].startswith("model.quantize=nf4: blocks read and quantized: 1/2, 0m00s (about 0m00s left)")
    assert "2/2" not in " ".join(lines) and "quantized as the base was read" in lines[-1]  # the last block: the summary


def test_a_kept_base_holds_layers_outside_blocks_unquantized_and_a_block_s_inner_lists_within_it(tmp_path):
    """OPT's project_in/out sit outside its blocks: they are kept at their dtype, as the whole build's base
    has them, and the run loads back; the blocks are the outermost list's children (a list inside a block,
    such as its experts, is part of that block)."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    import ds_hydra
    from ds_hydra.models.quantized_load import _outermost_blocks
    from ds_hydra.training.state import safe_torch_load
    from ds_hydra.training.trainer import train

    opt = dict(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
    run = [*RUN, "model=hf_causal_lm", "+model.config.model_type=opt", *[f"+model.config.{k}={v}" for k, v in opt.items()],
           "adapter=lora"]
    train(compose([*run, "model.quantize=nf4"]), run_dir=tmp_path / "q")
    train(compose(run), run_dir=tmp_path / "lora")
    rest = load_file(str(tmp_path / "q" / "base_model" / "rest.safetensors"))
    whole = safe_torch_load(tmp_path / "lora" / "base_model.pt")["model"]
    assert not any("absmax" in k or "quant" in k for k in rest)
    for name in ("model.decoder.project_in.weight", "model.decoder.project_out.weight"):
        assert torch.equal(rest[name], whole[name]), name
    ds_hydra.load_model(str(tmp_path / "q"))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    assert _outermost_blocks(Model()) == {"layers.0", "layers.1", "heads.0"}


@pytest.mark.parametrize("damage", ["missing", "truncated", "index"])
def test_a_damaged_kept_base_is_one_line_naming_the_file(random_qlora_run, tmp_path, damage):
    from ds_hydra.errors import UserError
    from ds_hydra.training.state import checkpoint_path
    from ds_hydra.training.trainer import train

    run = tmp_path / "copied"
    shutil.copytree(random_qlora_run, run)
    (run / "completed.json").unlink()
    shard = run / "base_model" / "block-00001.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard = run / "base_model" / "model.safetensors.index.json"
        shard.write_text("{not json")
    with pytest.raises(UserError, match=shard.name):
        train(compose([*random_llama_run("model.quantize=nf4"), f"resume={checkpoint_path(run, 2)}"]))


def test_random_qlora_run_resumes_from_its_kept_base_and_exports_it_merged(random_qlora_run, tmp_path, monkeypatch):
    """Resumed from the kept folder (read block by block) == uninterrupted; the loaded run reads that folder;
    the merged export is that base plus the adapter (peft's merge as the reference)."""
    import peft
    import transformers

    import ds_hydra
    from ds_hydra.inference.export_hf import export_hf
    from ds_hydra.models import quantized_load
    from ds_hydra.training.state import checkpoint_path, latest_checkpoint, safe_torch_load
    from ds_hydra.training.trainer import train

    resumed = tmp_path / "resumed"
    shutil.copytree(random_qlora_run, resumed)
    checkpoint_path(resumed, 4).unlink()
    (resumed / "completed.json").unlink()
    read_from = []
    materialize = quantized_load.materialize_quantized
    monkeypatch.setattr(quantized_load, "materialize_quantized",
                        lambda model, mode, pretrained, **kw: read_from.append(pretrained) or materialize(model, mode, pretrained, **kw))
    train(compose([*random_llama_run("model.quantize=nf4"), f"resume={checkpoint_path(resumed, 2)}"]))
    assert read_from == [str(resumed / "base_model")]  # read back, not initialised again
    got, want = (safe_torch_load(latest_checkpoint(d)) for d in (resumed, random_qlora_run))
    assert got["step"] == want["step"] == 4 and got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    loaded = ds_hydra.load_model(str(random_qlora_run))
    assert any(getattr(p, "quant_state", None) is not None for p in loaded.parameters())
    assert read_from[-1] == str(random_qlora_run / "base_model")
    out = export_hf(random_qlora_run, run_dir=tmp_path / "export")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out["export_dir"], local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(random_qlora_run / "base_model"), local_files_only=True)
    reference = peft.PeftModel.from_pretrained(base, str(random_qlora_run / "adapter")).merge_and_unload()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def _quant_state_bytes(model) -> int:
    """Bytes bitsandbytes keeps beside each nf4 weight: its scales, code table and, nested, the scales'
    own scales, code table and offset."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code]
        if getattr(state, "nested", False):
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total




def _full_load_then_quantize(cfg):
    """Today's reference: the whole base built at model.dtype, then quantized by adapt_model."""
    from ds_hydra.models.adapters import adapt_model
    from ds_hydra.models.build import build_base_model

    return adapt_model(build_base_model(cfg.model, VOCAB), cfg.model, cfg.adapter)


@pytest.mark.parametrize("source,mode", [("pretrained", "nf4"), ("pretrained", "int8"), ("random", "nf4"),
                                         ("random", "int8"), ("random-tied", "nf4")])
def test_quantizing_as_the_base_is_materialised_gives_the_full_load_s_weights_bit_for_bit(base_dir, mode, source):
    """build_model quantizes each block as it is read from the safetensors file (model.pretrained) or initialised
    (model.config, same seed): every tensor, the packed weights and each quantization state, equals what
    quantizing after a full load gives, exactly, and so do the logits."""
    pytest.importorskip("bitsandbytes")
    from ds_hydra.models.build import build_model

    if source == "pretrained":
        cfg = compose([*llama_run(base_dir), f"model.quantize={mode}"])
    else:
        fields = [f"+model.config.{k}={v}" for k, v in {**LLAMA_CONFIG, "tie_word_embeddings": source == "random-tied"}.items()]
        cfg = compose([*RUN, "model=hf_causal_lm", "+model.config.model_type=llama", *fields, "adapter=lora",
                       f"model.quantize={mode}"])
    torch.manual_seed(3)
    got = build_model(cfg.model, VOCAB, cfg.adapter).eval()
    generator_after = torch.random.get_rng_state()
    torch.manual_seed(3)
    want = _full_load_then_quantize(cfg).eval()
    assert torch.equal(generator_after, torch.random.get_rng_state())  # what draws next (the adapters) draws the same
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    assert sum(".absmax" in k or ".SCB" in k or "quant_map" in k for k in want_state) >= 14  # the quantization state is compared too
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    if source == "random-tied":
        assert got.lm_head.weight is got.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(got(tokens()).logits, want(tokens()).logits)
