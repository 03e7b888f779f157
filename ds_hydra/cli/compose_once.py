"""A single run's config composed once, not twice.

Hydra's ``main`` composes the whole config twice for a single run: ``Hydra.get_mode`` composes it (as
a multirun, sweep overrides unchecked) only to read ``hydra.mode``, then ``Hydra.run`` composes it again
as a run, with ``hydra.mode=RUN`` added to the overrides when the config leaves the mode unset. Each
composition of ds_hydra's config costs about 0.2 s, a sixth of what a one-step run adds to torch's own
start (``bench/train.py --only startup_run``).

``composing_once()`` (held by ``cli_main`` while Hydra runs) lets ``get_mode`` compose the config as the
run will (run mode, sweep overrides refused) and keeps it; the run's composition that follows at once,
on the same loader with the same arguments (plus Hydra's own ``hydra.mode=RUN``), takes that config and
applies the added override to it as Hydra would have. The config the run gets is the one Hydra composes
itself (tests/test_startup.py compares them). Anything else goes Hydra's own way: a composition that fails
as a run (a sweep override, a group left ``???``) falls back to Hydra's ``get_mode`` and the error is
raised by Hydra's composition as before; a multirun (``-m``) composes as Hydra does; the kept config is dropped by the
next composition whatever it is. Where Hydra is not laid out so, nothing is changed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional

# What ``_run_app`` adds to the overrides when the composed config leaves ``hydra.mode`` unset.
RUN_MODE_OVERRIDE = "hydra.mode=RUN"


@contextlib.contextmanager
def composing_once(args: List[str]) -> Iterator[None]:
    """While Hydra runs the command line ``args`` (a multirun's, ``-m``, are left to Hydra)."""
    if asks_multirun(args):
        yield
        return
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.hydra import Hydra
        from hydra.types import RunMode

        get_mode, load_configuration = Hydra.get_mode, ConfigLoaderImpl.load_configuration
    except (ImportError, AttributeError):  # another Hydra: it composes twice
        yield
        return
    kept: List[Any] = []  # [(loader, config_name, overrides, config)]: get_mode's composition, for the next one

    def composing_mode(self, config_name: Optional[str], overrides: List[str]) -> Any:
        kept.clear()
        try:
            cfg = self.config_loader.load_configuration(config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN)
        except Exception:  # not a run's config (a sweep override, a missing group): Hydra decides, as before
            kept.clear()
            return get_mode(self, config_name, overrides)
        kept[:] = [(self.config_loader, config_name, list(overrides), cfg)]
        return cfg.hydra.mode

    def loading(self, config_name: Optional[str], overrides: List[str], run_mode: Any, from_shell: bool = True,
                validate_sweep_overrides: bool = True) -> Any:
        cfg = _take(kept, self, config_name, overrides, run_mode == RunMode.RUN and from_shell and validate_sweep_overrides)
        kept.clear()
        if cfg is None:
            return load_configuration(self, config_name=config_name, overrides=overrides, run_mode=run_mode,
                                      from_shell=from_shell, validate_sweep_overrides=validate_sweep_overrides)
        return cfg

    Hydra.get_mode, ConfigLoaderImpl.load_configuration = composing_mode, loading
    try:
        yield
    finally:
        Hydra.get_mode, ConfigLoaderImpl.load_configuration = get_mode, load_configuration


def asks_multirun(args: List[str]) -> bool:
    """Whether Hydra reads ``args`` as a multirun (``--multirun``, ``-m``, as its own parser reads them); True
    where it cannot tell."""
    import io

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False  # a bad flag raises here instead of printing; Hydra's own parser says what is wrong
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed, _ = parser.parse_known_args(args)
    except (SystemExit, Exception):
        return True
    return bool(getattr(parsed, "multirun", True))


def _take(kept: List[Any], loader: Any, config_name: Optional[str], overrides: List[str], as_run: bool) -> Any:
    """The kept config when this composition asks for the same one as a run, with Hydra's ``hydra.mode=RUN``
    applied where the run added it; None otherwise."""
    if not kept or not as_run:
        return None
    by, name, composed_with, cfg = kept[0]
    added = list(overrides[len(composed_with):])
    if by is not loader or name != config_name or list(overrides[:len(composed_with)]) != composed_with \
            or added not in ([], [RUN_MODE_OVERRIDE]):
        return None
    if added:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides=added)
        ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)  # as the composition applies a value override
        for override in parsed:
            cfg.hydra.overrides.hydra.append(override.input_line)  # and records it, last, as it came last
    return cfg
