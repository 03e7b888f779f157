"""One data set per data config per process: the memory preflight, ``task=validate`` and the trainer
all need the data (its vocabulary, its tokens), and building Tiny Shakespeare's tokens, or reading a
token directory's metadata, is done once and shared.

The key is the resolved ``data`` config with what building it reads besides: the ``tokenizer`` group,
``model.pretrained``, and the size and modification time of the files it names (``data.path``, or
``data.dir``'s token files and meta.json), so an edited file is read again. At most ``MAX_CACHED``
are kept (the most recently used).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Hashable, Tuple

MAX_CACHED = 4
_cache: "OrderedDict[Hashable, Any]" = OrderedDict()
_DIR_FILES = ("meta.json", "meta.pkl", "train.bin", "val.bin", "tokenizer.json")


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned for ``key`` before in this process."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = build()
    _cache[key] = value
    while len(_cache) > MAX_CACHED:
        _cache.popitem(last=False)
    return value


def data_key(cfg) -> Tuple:
    """What the data of ``cfg`` depends on (see the module docstring)."""
    from omegaconf import OmegaConf

    data = cfg.data
    tokenizer = cfg.get("tokenizer", None)
    pretrained = (cfg.get("model", None) or {}).get("pretrained", None)
    files = []
    if data.get("path", None):
        files.append(data.path)
    if data.get("dir", None):
        files += [os.path.join(str(data.dir), name) for name in _DIR_FILES]
    return (
        OmegaConf.to_yaml(data, resolve=True),
        OmegaConf.to_yaml(tokenizer, resolve=True) if tokenizer is not None else None,
        pretrained,
        tuple(_version(path) for path in files),
    )


def _version(path) -> Tuple:
    try:
        stat = os.stat(os.path.expanduser(str(path)))
    except OSError:
        return (str(path), None)  # missing: building it raises the user's error (or it is optional)
    return (str(path), stat.st_size, stat.st_mtime_ns)
