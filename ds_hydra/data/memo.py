"""One data set per data config per process: the memory preflight, ``task=validate`` and the trainer
all need the data (its vocabulary, its tokens), and building Tiny Shakespeare's tokens, or reading a
token directory's metadata, is done once and shared.

The key is the resolved ``data`` config with what building it reads besides: the ``tokenizer`` group,
``model.pretrained``, and the size and modification time of the files it names (``data.path``, or
``data.dir``'s token files and meta.json), so an edited file is read again. At most ``MAX_CACHED``
are kept (the most recently used), in the process's one ``DATA_MEMO``. This memo lives in memory and
dies with the process; the on-disk cache of tokenized text (``data.cache_dir``) is ``ds_hydra.data.text``'s.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Hashable, Tuple

MAX_CACHED = 4
_DIR_FILES = ("meta.json", "meta.pkl", "train.bin", "val.bin", "tokenizer.json")


class DataMemo:
    """The data sets built in this process, the most recently used last, at most ``max_cached``.

    A memo, not a channel: its key is everything the value is built from (``data_key``), a built
    ``TokenData`` is read-only (batches and positions live in the samplers each run makes), so a
    second run in the process with the same data gets what it would have built, and one with other
    data (or an edited file) builds its own. ``clear()`` forgets them all."""

    def __init__(self, max_cached: int = MAX_CACHED) -> None:
        self.max_cached = max_cached
        self._built: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, or what it returned for ``key`` before in this process."""
        if key in self._built:
            self._built.move_to_end(key)
            return self._built[key]
        value = build()
        self._built[key] = value
        while len(self._built) > self.max_cached:
            self._built.popitem(last=False)
        return value

    def clear(self) -> None:
        self._built.clear()


# One per process, on purpose: the Hydra callback (memory preflight), task=validate and the trainer each
# need the data, possibly in one process for several runs, and none of them hands it to the other.
# Sound because the memo is keyed by content and holds read-only values (see DataMemo); bounded.
DATA_MEMO = DataMemo()


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned for ``key`` before in this process (``DATA_MEMO``)."""
    return DATA_MEMO.get(key, build)


def data_key(data, tokenizer=None, pretrained=None) -> Tuple:
    """What the data of the ``data`` config depends on, with the ``tokenizer`` config and
    ``model.pretrained`` (see the module docstring)."""
    from omegaconf import OmegaConf

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
