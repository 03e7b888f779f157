"""A run's tokenizer as a transformers tokenizer, for an exported model directory (``task=export_hf``).

Every kind maps onto a Hugging Face ``tokenizers`` pipeline that gives the ids ds_hydra gives:

* ``bpe`` and ``hf``: the tokenizer itself (it is one already);
* ``char``: a word-level vocabulary of the run's characters (ids in ds_hydra's order), every character
  split off on its own, the pieces joined back by the decoder;
* ``bytes``: byte-level, as GPT-2 spells bytes, with a vocabulary of the 256 bytes at their own ids
  and no merges;

the end-of-text token, where the run has one, at its own id and as the tokenizer's ``eos_token``. The
directory gets transformers' ``tokenizer.json`` and ``tokenizer_config.json`` (read by
``AutoTokenizer.from_pretrained`` and the harness's hf model), and ds_hydra's ``tokenizer_meta.json``, so
``model.pretrained=<that dir>`` still finds the tokenizer the data was encoded with.

Two differences stay, both in transformers' defaults: ``tokenizer(text)`` adds what the tokenizer's
post-processor adds (a Llama tokenizer's BOS; ``add_special_tokens=False`` gives ds_hydra's ids, as
the harness asks), and it reads the end-of-text token's string inside a text as that token, where
ds_hydra encodes it as plain text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from ds_hydra.data.tokenizer import (
    EMBEDDED_SPEC_KEY,
    META_FORMAT,
    TOKENIZER_META_FILE,
    BytesTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    require_tokenizers,
)
from ds_hydra.errors import UserError

TRANSFORMERS_CONFIG_FILE = "tokenizer_config.json"
# The class transformers 4 and 5 both know for a tokenizer.json (transformers 5 writes its own new name).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def tokenizers_pipeline(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes text to ``tokenizer``'s ids and decodes them back."""
    tk = require_tokenizers()
    if isinstance(tokenizer, HFTokenizer):
        return tk.Tokenizer.from_str(tokenizer.tokenizer.to_str())  # a copy: the run's own stays as it is
    if isinstance(tokenizer, CharTokenizer):
        pipeline = tk.Tokenizer(tk.models.WordLevel(vocab={c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
        pipeline.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")  # every character
        pipeline.decoder = tk.decoders.Fuse()  # joined without spaces
    elif isinstance(tokenizer, BytesTokenizer):
        alphabet = gpt2_byte_alphabet()
        pipeline = tk.Tokenizer(tk.models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        pipeline.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pipeline.decoder = tk.decoders.ByteLevel()
    else:
        raise UserError(f"task=export_hf: the run's {tokenizer} has no transformers equivalent")
    if tokenizer.eos_token is not None:
        pipeline.add_special_tokens([tk.AddedToken(tokenizer.eos_token, special=True, normalized=False)])
        if pipeline.token_to_id(tokenizer.eos_token) != tokenizer.eos_id:
            raise UserError(f"task=export_hf: the run's {tokenizer}: its end-of-text token would not keep id {tokenizer.eos_id}")
    return pipeline


def save_for_transformers(tokenizer: Tokenizer, directory, model_max_length: Optional[int] = None) -> None:
    """Write ``tokenizer`` into ``directory`` as transformers reads it (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    from ds_hydra.common.files import atomic_write_text

    directory = Path(directory)
    settings: Dict[str, object] = {"clean_up_tokenization_spaces": False}  # decode gives back the text, spaces and all
    if tokenizer.eos_token is not None:
        settings["eos_token"] = tokenizer.eos_token
    if model_max_length:
        settings["model_max_length"] = int(model_max_length)
    PreTrainedTokenizerFast(tokenizer_object=tokenizers_pipeline(tokenizer), **settings).save_pretrained(str(directory))
    config_file = directory / TRANSFORMERS_CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    atomic_write_text(config_file, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    meta = {"format": META_FORMAT, **tokenizer.describe()}
    if isinstance(tokenizer, (CharTokenizer, BytesTokenizer)):  # tokenizer.json is transformers' now
        meta[EMBEDDED_SPEC_KEY] = tokenizer.spec()
    atomic_write_text(directory / TOKENIZER_META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def gpt2_byte_alphabet() -> Dict[int, str]:
    """Byte -> the character GPT-2's byte-level tokenizers spell it with: printable bytes as themselves,
    the others shifted past 255 in order (what ``tokenizers``' ByteLevel pre-tokenizer maps them to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in alphabet)
    for n, b in enumerate(shifted):
        alphabet[b] = chr(256 + n)
    return alphabet
