"""ds_hydra's config groups for any Hydra app: ``defaults: [{ds_hydra/optimizer@optimizer: adamw}]``.

Installing ds_hydra installs this plugin (Hydra finds it in the ``hydra_plugins`` namespace). It
appends one entry to every app's config search path, ``ds_hydra://ds_hydra.conf``: the package
``ds_hydra.conf`` seen through ``DSHydraConfigSource``, which puts each component group under the
``ds_hydra/`` prefix (``ds_hydra/model``, ``ds_hydra/optimizer``, ``ds_hydra/scheduler``,
``ds_hydra/ckpt``, ...), so they never mix with an app's own ``model`` or ``optimizer`` groups. The
root config, ``experiment``, ``hparams_search`` and ``hydra`` presets stay private to ds_hydra's CLI.

The option YAMLs extend ds_hydra's schemas (``/schema/<group>/<name>``), so the plugin registers them
in the ConfigStore (torch-free) along with the ``${ds_hydra.fraction:...}`` resolver: a typo such as
``model.n_layr=1`` fails at composition, naming the key, as in ds_hydra itself. An optimizer's keys
beyond lr and weight decay are its class's arguments: ``ds_hydra.instantiate.signature_problems``
checks them against the class, as ds_hydra's CLI does before it builds anything.

Discovery imports this module in every Hydra app, so it imports nothing but Hydra at import time.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

PREFIX = "ds_hydra"
PROVIDER = "ds_hydra"
SEARCH_PATH = "ds_hydra://ds_hydra.conf"
# Groups that only make sense inside ds_hydra's own root config.
PRIVATE_GROUPS = ("experiment", "hparams_search", "hydra")


class DSHydraSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if _is_ds_hydra_app(search_path):  # ds_hydra's own CLI already has the groups, unprefixed
            return
        from ds_hydra.config_store import register_configs  # schemas and resolver; imports no torch

        register_configs()
        search_path.append(provider=PROVIDER, path=SEARCH_PATH)


class DSHydraConfigSource(ConfigSource):
    """The ``pkg://`` source of ``ds_hydra.conf`` with its component groups under ``ds_hydra/``."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        # imported here: a concrete ConfigSource in this module's namespace would be registered twice
        from hydra._internal.core_plugins.file_config_source import FileConfigSource
        from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource

        if _find_spec(self.path) is not None:
            self._package: ConfigSource = ImportlibResourcesConfigSource(provider=provider, path=f"pkg://{self.path}")
        else:  # a source checkout on sys.path: conf/ is not yet the package ds_hydra.conf
            self._package = FileConfigSource(provider=provider, path=f"file://{_checkout_conf()}")

    @staticmethod
    def scheme() -> str:
        return "ds_hydra"

    def _inner(self, config_path: str) -> Optional[str]:
        """``ds_hydra/optimizer/adamw`` -> ``optimizer/adamw``; None outside the public groups."""
        parts = [p for p in config_path.split("/") if p]
        if len(parts) < 2 or parts[0] != PREFIX or parts[1] in PRIVATE_GROUPS:
            return None
        return "/".join(parts[1:])

    def available(self) -> bool:
        return self._package.available()

    def is_group(self, config_path: str) -> bool:
        path = config_path.strip("/")
        if path in ("", PREFIX):
            return True
        inner = self._inner(path)
        return inner is not None and self._package.is_group(inner)

    def is_config(self, config_path: str) -> bool:
        inner = self._inner(config_path)
        return inner is not None and "/" in inner and self._package.is_config(inner)

    def load_config(self, config_path: str) -> ConfigResult:
        from hydra.plugins.config_source import ConfigLoadError

        inner = self._inner(config_path)
        if inner is None or "/" not in inner:
            raise ConfigLoadError(f"Config not found : {config_path}")
        result = self._package.load_config(inner)
        config = result.config
        schema = _schema_of(inner.split("/")[0])
        if schema is not None and "defaults" not in config:
            # Groups typed by ds_hydra's root schema (model, trainer, ckpt, ...) need no defaults line
            # there; elsewhere the node gets its schema from here, so typos still fail at composition.
            from omegaconf import OmegaConf

            config = OmegaConf.merge({"defaults": [f"/schema/{schema}@_here_", "_self_"]}, config)
        return ConfigResult(config=config, path=self.full_path(), provider=self.provider, header=result.header)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        groups_wanted = results_filter in (None, ObjectType.GROUP)
        if path == "":
            return [PREFIX] if groups_wanted else []
        if path == PREFIX:
            groups = self._package.list("", ObjectType.GROUP) if groups_wanted else []
            return sorted(g for g in groups if g not in PRIVATE_GROUPS)
        inner = self._inner(path)
        return [] if inner is None else self._package.list(inner, results_filter)


def _schema_of(group: str) -> Optional[str]:
    """``<group>/<name>`` of the group's schema when the group has exactly one, else None."""
    from ds_hydra.config_store import SCHEMAS

    names = [name for schema_group, name, _ in SCHEMAS if schema_group == group]
    return f"{group}/{names[0]}" if len(names) == 1 else None


def _find_spec(module: str):
    from importlib.util import find_spec

    try:
        return find_spec(module)
    except ModuleNotFoundError:
        return None


def _checkout_conf() -> str:
    import ds_hydra  # light: the package exports its names lazily

    return (Path(ds_hydra.__file__).resolve().parent.parent / "conf").as_posix()


def _is_ds_hydra_app(search_path: ConfigSearchPath) -> bool:
    checkout_conf = _checkout_conf()
    for element in search_path.get_path():
        path = element.path or ""
        if path == "pkg://ds_hydra.conf":
            return True
        if path.startswith("file://"):
            path = path[len("file://"):]
        if "://" not in path and path and Path(path).resolve().as_posix() == checkout_conf:
            return True
    return False
