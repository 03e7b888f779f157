"""Models. Imported lazily so that reading configs does not import torch."""
from ds_hydra.lazy import lazy_attributes

_EXPORTS = {"GPT": "gpt", "KVCache": "gpt"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS)
