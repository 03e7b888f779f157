"""Data: what the trainer asks of a data set (``base``), the built-in corpora and the batch samplers.

Imported lazily: everything here needs torch, and reading configs must not import it.
"""
from ds_hydra.lazy import lazy_attributes

_EXPORTS = {
    "TokenData": "base",
    "build_data": "base",
    "CharCorpus": "corpus",
    "SyntheticTokens": "corpus",
    "embedded_corpus_text": "text",
    "TextData": "text",
    "TokenFiles": "tokens",
    "SFTData": "sft",
    "RandomBlocks": "batches",
    "SequentialWindows": "samplers",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
