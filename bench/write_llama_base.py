"""Write a random Llama of a ``bench/memory_scale.py`` shape as a model directory, one block at a time.

    python bench/write_llama_base.py --shape 6.7B --dtype bf16 /tmp/llama-6.7B

``save_pretrained`` needs the whole model in memory first (a 6.7B Llama: 25 GiB in fp32); this writes
``config.json`` and one safetensors shard per decoder block plus ``model.safetensors.index.json``
(transformers' sharded layout), holding one block at a time, so that a QLoRA run can read a base larger
than this machine's memory through ``model.pretrained``. Values: normal(0, 0.02), norms 1 (not a
trained model: memory and time are what is measured).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--shape", default="6.7B")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    import torch
    import transformers
    from safetensors.torch import save_file

    from memory_scale import SHAPES

    hidden, layers, inter, heads, kv, vocab, tied = SHAPES[args.shape]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                                      max_position_embeddings=2048)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config.dtype = args.dtype.replace("bf16", "bfloat16").replace("fp32", "float32")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    groups = {}  # shard file -> names
    for name, param in model.state_dict().items():
        parts = name.split(".")
        shard = f"layer-{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "outside"
        if tied and name == "lm_head.weight":
            continue
        groups.setdefault(shard, []).append((name, param.shape))
    torch.manual_seed(0)
    weight_map = {}
    for shard, entries in groups.items():
        tensors = {}
        for name, shape in entries:
            tensor = torch.empty(shape, dtype=dtype)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02)
            tensors[name] = tensor
        file = f"{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        print(shard, flush=True)
    total = sum(p.numel() * torch.empty((), dtype=dtype).element_size() for p in model.state_dict().values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


if __name__ == "__main__":
    main()
