"""The one place where config nodes with ``_target_`` become Python objects."""
from __future__ import annotations

from typing import Any


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with containers converted to plain lists and dicts.

    Plain containers matter: optimizer hyper-parameters end up in ``state_dict()``, and a saved
    ``ListConfig`` could not be loaded back with ``torch.load(weights_only=True)``.
    """
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(node, *args, _convert_="all", **kwargs)
