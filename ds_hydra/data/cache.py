"""One corpus per data config per process: the memory preflight, ``task=validate`` and the trainer
all need the corpus (its vocabulary, its tokens), and building Tiny Shakespeare's token tensor
takes about half a second; it is built once and shared.

The key is the resolved ``data`` config, plus the size and modification time of a ``path`` it reads,
so an edited file is read again. At most ``MAX_CORPORA`` are kept (the most recently used).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Tuple

MAX_CORPORA = 4
_corpora: "OrderedDict[Tuple, Any]" = OrderedDict()


def cached_corpus(data_cfg) -> Any:
    """The corpus ``data_cfg`` describes (``instantiate(data_cfg)``), built once per process."""
    from ds_hydra.instantiate import instantiate

    key = _key(data_cfg)
    if key in _corpora:
        _corpora.move_to_end(key)
        return _corpora[key]
    corpus = instantiate(data_cfg)
    _corpora[key] = corpus
    while len(_corpora) > MAX_CORPORA:
        _corpora.popitem(last=False)
    return corpus


def vocab_size_of(cfg) -> Tuple[int, str]:
    """(the model's vocabulary size, where it comes from): ``model.vocab_size``, else the data's
    ``vocab_size`` setting, else the corpus's (built, and cached, to learn it)."""
    if cfg.model.get("vocab_size", None):
        return int(cfg.model.vocab_size), "model.vocab_size"
    if cfg.data.get("vocab_size", None):
        return int(cfg.data.vocab_size), "data.vocab_size"
    return int(cached_corpus(cfg.data).vocab_size), f"from {cfg.data._target_.rsplit('.', 1)[-1]}"


def _key(data_cfg) -> Tuple:
    from omegaconf import OmegaConf

    path = data_cfg.get("path", None) if hasattr(data_cfg, "get") else None
    try:
        stat = os.stat(os.path.expanduser(str(path))) if path else None
        version = (stat.st_size, stat.st_mtime_ns) if stat else None
    except OSError:
        version = None  # missing: building it raises the user's error
    return OmegaConf.to_yaml(data_cfg, resolve=True), version
