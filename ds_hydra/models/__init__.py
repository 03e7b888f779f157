"""Models. ``GPT`` is imported lazily so that reading configs does not import torch."""


def __getattr__(name):
    if name in ("GPT", "KVCache"):
        from ds_hydra.models import gpt

        return getattr(gpt, name)
    raise AttributeError(name)


__all__ = ["GPT", "KVCache"]
