"""Data: what the trainer asks of a data set (``base``), the built-in corpora and the batch samplers.

Imported lazily: everything here needs torch, and reading configs must not import it.
"""
from importlib import import_module

_EXPORTS = {
    "TokenData": "base",
    "build_data": "base",
    "CharCorpus": "corpus",
    "SyntheticTokens": "corpus",
    "embedded_corpus_text": "text",
    "TextData": "text",
    "TokenFiles": "token_files",
    "SFTData": "sft",
    "RandomBlocks": "batches",
    "SequentialWindows": "samplers",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
