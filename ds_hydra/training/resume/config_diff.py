"""How a saved run's config differs from the config continuing it (volatile keys aside). Torch-free."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence

# Keys whose values may differ between the saved run and its continuation without any effect on it.
VOLATILE_KEYS = ("resume", "trainer.progress", "trainer.checkpoint_format", "trainer.async_checkpoint", "objective", "name", "run", "logger")


class Difference(NamedTuple):
    key: str
    saved: Any
    now: Any


def flat_config(cfg_or_saved: Any) -> Dict[str, Any]:
    """``{dotted key: value}`` of a config, a saved YAML text or a saved dict, resolved, without ``hydra``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg_or_saved, DictConfig):
        node = OmegaConf.masked_copy(cfg_or_saved, [k for k in cfg_or_saved.keys() if k != "hydra"])
        text = OmegaConf.to_yaml(node, resolve=True)
        data = OmegaConf.to_container(OmegaConf.create(text))
    elif isinstance(cfg_or_saved, str):
        data = OmegaConf.to_container(OmegaConf.create(cfg_or_saved))
    else:
        data = cfg_or_saved
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and (node or not prefix):
            for key, value in node.items():
                if prefix == "" and key == "hydra":
                    continue
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(data or {}, "")
    return flat


def config_differences(saved: Any, cfg: Any) -> List[Difference]:
    """Keys whose values differ between a saved config and ``cfg`` (volatile keys ignored)."""
    old, new = flat_config(saved), flat_config(cfg)
    keys = sorted(set(old) | set(new))
    volatile = lambda k: any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS)  # noqa: E731
    return [Difference(k, old.get(k), new.get(k)) for k in keys if not volatile(k) and old.get(k) != new.get(k)]


def describe_differences(diffs: Sequence[Difference], limit: int = 4) -> str:
    shown = [f"{d.key}={d.saved} there, {d.now} here" for d in diffs[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more
