"""A transformers model with its base quantized as it is materialised (``model.quantize=nf4|int8``).

Quantizing after a full load (``adapters.quantize_linear_layers`` on a built model) makes the load the
peak of a QLoRA run: the whole base sits at ``model.dtype`` first (fp32: 4 bytes per parameter), while
the step needs about 0.6. Here the model is built on the meta device, then each decoder block is
materialised, filled and its linear layers quantized before the next block is touched, so the load
peaks at about the quantized base plus one block, as transformers' ``from_pretrained`` with a
``BitsAndBytesConfig`` does.

* ``model.pretrained=<dir>``: each tensor is read from the directory's safetensors file(s) and cast to
  ``model.dtype``, as ``from_pretrained`` does; non-persistent buffers (rotary frequencies) are computed
  by the model's ``_init_weights``, tied weights stay tied. Quantizing the same tensors gives the same
  packed weights and scales as quantizing after a full load.
* ``model.config`` (random init): the modules are initialised by the model's own ``_initialize_weights``
  in the order ``initialize_weights`` visits them (children first), under transformers' init guards, so
  the generator is drawn from in the same order: the same seed gives the same weights as a full build.
  A ``BaseShards`` writer keeps that base (an adapter run needs it again on resume and export): each
  block's tensors are written to their own safetensors file before they are quantized, so the base is
  never whole in memory; what it writes is a model directory this module reads back the same way.

``materialize_quantized`` returns False (and changes nothing) where it cannot promise that: a file whose
names do not match the model's (an older layout transformers renames while loading), a model that is not
a transformers ``PreTrainedModel``. The caller then builds the model in full and quantizes afterwards.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Set

import torch
import torch.nn as nn

from ds_hydra.common.terminal import minutes_text
from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["BaseShards", "construction_draws_only", "materialize_quantized", "safetensors_names", "to_meta"]


class BaseShards:
    """A model's tensors written as a model directory while it is materialised: one safetensors file per
    decoder block (written as the block completes, before it is quantized), one for the rest, transformers'
    ``model.safetensors.index.json`` and ``config.json``, so ``from_pretrained`` and ``materialize_quantized``
    read it. The folder is created at the first write; ``finished`` once the index is written."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.weight_map: Dict[str, str] = {}
        self.total_size = 0
        self.blocks = 0
        self.finished = False

    def write(self, file: str, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
        path = self.folder / file
        save_file(tensors, str(path), metadata={"format": "pt"})
        _durable(path)
        self.weight_map.update({name: file for name in tensors})
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def block(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.write(f"block-{self.blocks:05d}.safetensors", tensors)
        self.blocks += 1

    def finish(self, model: nn.Module, rest: Dict[str, torch.Tensor]) -> None:
        self.write("rest.safetensors", rest)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_file"):
            config.to_json_file(str(self.folder / "config.json"))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / self.INDEX).write_text(json.dumps(index, indent=1))
        for name in ("config.json", self.INDEX):
            if (self.folder / name).is_file():
                _durable(self.folder / name)
        self.finished = True


def _durable(path: Path) -> None:
    """``path`` on disk (fsync'd) with the mode any new file of the run gets (safetensors writes 0600)."""
    import os

    from ds_hydra.common.files import new_file_mode

    os.chmod(path, new_file_mode())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class construction_draws_only:
    """Build a model on the CPU with its parameters left unwritten: each in-place fill of a parameter while
    the modules are constructed (``reset_parameters``' ``uniform_``/``normal_``, a bias' ``zero_``) runs on a
    scratch tensor of the same shape and dtype instead, so the random generator is drawn from exactly as
    in a full build, while the parameters' pages are never touched (not resident) and are freed by
    ``to_meta``. transformers' ``initialize_weights`` calls (one per ``post_init``: the inner model's, then
    the head's) draw into scratch as well; the generator state each starts from is kept in
    ``generator_states``, so ``materialize_quantized`` replays them block by block from the same states."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        scratch: Dict[tuple, torch.Tensor] = {}

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                target = args[0] if args else kwargs.get("tensor")  # Tensor.normal_(t, ...) or nn.init.normal_(tensor=t)
                name = getattr(func, "__name__", "")
                if isinstance(target, nn.Parameter) and name.endswith("_") and not name.startswith("__") and target.is_contiguous():
                    key = (tuple(target.shape), target.dtype)
                    if key not in scratch:
                        scratch.clear()  # one scratch tensor at a time: the peak is the largest parameter
                        scratch[key] = torch.empty(target.shape, dtype=target.dtype)
                    if args:
                        func(scratch[key], *args[1:], **kwargs)
                    else:
                        func(**{**kwargs, "tensor": scratch[key]})
                    return target
                return func(*args, **kwargs)

        self.mode = _Mode()
        self.scratch = scratch
        self.generator_states: Dict[int, torch.Tensor] = {}  # id of a module -> the generator state its init call started at

    def __enter__(self):
        from unittest import mock

        from transformers import PreTrainedModel

        initialize_weights = PreTrainedModel.initialize_weights
        starts = self.generator_states

        def recorded(model: nn.Module) -> None:  # where each call starts drawing, so the replay starts there too
            first = next((m for m in _post_order(model) if not getattr(m, "_is_hf_initialized", False)), None)
            if first is not None:
                starts[id(first)] = torch.random.get_rng_state()
            initialize_weights(model)

        self.record_init = mock.patch.object(PreTrainedModel, "initialize_weights", recorded)
        self.record_init.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.scratch.clear()
        self.mode.__exit__(*exc)
        return self.record_init.__exit__(*exc)


def _post_order(module: nn.Module):
    """Modules in the order transformers' ``initialize_weights`` visits them: children first."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def to_meta(model: nn.Module) -> nn.Module:
    """``model``'s parameters and buffers replaced, in place, by meta tensors of their shapes and dtypes (their
    storage freed); a tensor shared by two modules (a tied weight) stays one tensor."""
    seen: Dict[int, torch.Tensor] = {}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in seen:
                    seen[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
                module._parameters[key] = seen[id(param)]
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                if id(buffer) not in seen:
                    seen[id(buffer)] = torch.empty_like(buffer, device="meta")
                module._buffers[key] = seen[id(buffer)]
    return model


def safetensors_names(folder: Path) -> Dict[str, Path]:
    """Each tensor name of the model directory's safetensors weights, with the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(file) for file in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index}: not a safetensors index (a JSON object whose 'weight_map' names each tensor's "
                            f"file): {type(exc).__name__} {exc}") from None
        for file in files:
            # a model directory reads its own files only, by name: an absolute path or a '..' step leaves it (a
            # file there may itself be a link, as in the Hugging Face cache, whose snapshots link to its blobs)
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise UserError(f"{index}: names the weights file {file!r}, outside its own directory; a model "
                                f"directory's index names files inside it")
        missing = sorted(file for file in files if not (folder / file).is_file())
        if missing:
            raise UserError(f"{index}: names {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, missing from "
                            f"{folder}; restore the directory's files (or point at a complete copy)")
        return {name: folder / file for name, file in weight_map.items()}
    path = folder / "model.safetensors"
    with _opened(path) as handle:
        return {name: path for name in handle.keys()}


def _opened(path: Path):
    """``safe_open`` on ``path``; a file that is missing or not safetensors is one line naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a model directory holds its weights as safetensors") from None
    except Exception as exc:  # safetensors' own error for a truncated or foreign file
        raise UserError(f"{path}: not a readable safetensors file ({str(exc).strip() or type(exc).__name__})") from None


def materialize_quantized(
    model: nn.Module, mode: str, pretrained: Optional[str], device: str = "cpu",
    generator_states: Optional[Dict[int, torch.Tensor]] = None, keep_base: Optional[BaseShards] = None,
) -> bool:
    """Materialise ``model`` (built on the meta device) on ``device``, block by block, quantizing each
    block's linear layers (all but the output head) in ``mode`` as soon as the block holds its weights.
    ``keep_base``: each block's tensors are written there first, as they are before quantization.
    False, with ``model`` untouched, where this cannot give what a full build would (see the module doc)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    from ds_hydra.models.adapters import _quantized, import_bitsandbytes, output_layer_names

    bnb = import_bitsandbytes(mode)
    heads = output_layer_names(model)
    names = {id(m): n for n, m in model.named_modules()}
    source = _Source(Path(pretrained).expanduser(), model) if pretrained else None
    if source is not None and not source.matches:
        return False
    starts = generator_states or {}
    # a tensor held by two modules (a tied weight) -> (the meta tensor, kept alive so that its id stays its
    # own, and its real tensor); only those: every other real tensor must be freeable once it is quantized
    shared = _shared_ids(model)
    materialised: Dict[int, tuple] = {}
    pending: Dict[str, nn.Linear] = {}  # linear layers filled, not yet quantized

    def quantize_pending(prefix: Optional[str] = None) -> None:
        """Quantize the filled linear layers under ``prefix`` (a block), or all that wait (the whole model)."""
        for name in [n for n in pending if prefix is None or n.startswith(prefix)]:
            _set_submodule(model, name, _quantized(bnb, pending.pop(name), mode))

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # written once, under the name they tie to
    kept_prefixes = []  # blocks whose tensors keep_base has written
    blocks = _outermost_blocks(model)
    progress = _BlockProgress(len(blocks), f"model.quantize={mode}: blocks {'read' if source is not None else 'initialised'} and quantized")

    def visit(module: nn.Module, parent: Optional[nn.Module]) -> None:
        for child in module.children():  # children first, as transformers' smart_apply
            visit(child, module)
        # random init: a tied weight gets a tensor per module while it is initialised, as in the full build
        # (the head's own init draws into its own tensor), and tie_weights below makes them one again
        _materialise_own(module, device, materialised if source is not None else {}, shared)
        if source is None:
            if id(module) in starts:  # an initialize_weights call of the full build started here
                torch.random.set_rng_state(starts[id(module)])
            module._is_hf_initialized = False  # set by the construction's (scratch) pass
            model._initialize_weights(module, False)
        else:
            source.fill(module, names[id(module)])
        name = names[id(module)]
        if type(module) is nn.Linear and name not in heads:
            pending[name] = module
        if name in blocks:  # a block is complete: kept as it is, then its own linear layers quantized
            if keep_base is not None:
                keep_base.block({k: v for k, v in module.state_dict(prefix=f"{name}.").items() if k not in tied})
                kept_prefixes.append(f"{name}.")
            quantize_pending(f"{name}.")
            progress.block_done()
        elif parent is None:  # the whole model
            if keep_base is not None:  # what no block holds (embeddings, final norm, head), before any of it is quantized
                keep_base.finish(model, {k: v for k, v in model.state_dict().items()
                                         if k not in tied and not k.startswith(tuple(kept_prefixes))})
            quantize_pending()

    from transformers import initialization as init

    with torch.no_grad(), init.guard_torch_init_functions():
        visit(model, None)
    model.tie_weights()
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise RuntimeError("materialize_quantized: a tensor was left on the meta device")  # a bug, not a user error
    log.info(
        "model.quantize=%s: %d linear layers quantized as the base was %s (peak: the quantized base plus one block)",
        mode, sum(1 for _ in _quantized_layers(model)), "read" if source is not None else "initialised",
    )
    return True


PROGRESS_EVERY_S = 15.0  # a large base takes minutes to read (13B: 10 min here): a line at most this often


class _BlockProgress:
    """Log lines while a base is materialised block by block: blocks done, time so far, time left."""

    def __init__(self, total: int, what: str):
        import time

        self.total, self.what, self.done = total, what, 0
        self.clock = time.monotonic
        self.started = self.last = self.clock()

    def block_done(self) -> None:
        self.done += 1
        now = self.clock()
        if self.done >= self.total or now - self.last < PROGRESS_EVERY_S:
            return  # the last block is told by the summary line that follows
        self.last = now
        spent = now - self.started
        left = spent / self.done * (self.total - self.done)
        log.info("%s: %d/%d, %s (about %s left)", self.what, self.done, self.total, minutes_text(spent), minutes_text(left))


def _outermost_blocks(model: nn.Module) -> Set[str]:
    """Names of the blocks: the children of each ``ModuleList`` that no other ``ModuleList`` holds (a list
    inside a block, such as a block's experts, is part of that block)."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]
    outer = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
    return {f"{name}.{key}" for name in outer for key in model.get_submodule(name)._modules}


def _quantized_layers(model: nn.Module):
    return (m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def _shared_ids(model: nn.Module) -> Set[int]:
    from collections import Counter

    counts = Counter(id(t) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
    return {i for i, n in counts.items() if n > 1}


def _materialise_own(module: nn.Module, device: str, materialised: Dict[int, tuple], shared: Set[int]) -> None:
    """Give ``module``'s own meta parameters and buffers real (uninitialised) storage; a shared tensor met
    before (a tied weight) is given the storage it already has."""
    for table in (module._parameters, module._buffers):
        for key, tensor in list(table.items()):
            if tensor is None or not tensor.is_meta:
                continue
            if id(tensor) in materialised:
                table[key] = materialised[id(tensor)][1]
                continue
            real = torch.empty_like(tensor, device=device)
            if isinstance(tensor, nn.Parameter):
                real = nn.Parameter(real, requires_grad=tensor.requires_grad)
            if id(tensor) in shared:
                materialised[id(tensor)] = (tensor, real)
            table[key] = real


class _Source:
    """The tensors of a model directory's safetensors file(s), read one at a time."""

    def __init__(self, folder: Path, model: nn.Module):
        self.model = model
        self.files = safetensors_names(folder)
        persistent = set(model.state_dict().keys())
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        needed = persistent - tied
        self.matches = needed <= set(self.files) and set(self.files) <= persistent
        if not self.matches:
            log.info(
                "model.pretrained=%s: its tensor names differ from %s's (%d missing, %d extra); loading it in full "
                "before quantizing", folder, type(model).__name__, len(needed - set(self.files)),
                len(set(self.files) - persistent),
            )

    def fill(self, module: nn.Module, prefix: str) -> None:
        """Copy ``module``'s own tensors from the file (cast to their dtype); compute what the file lacks
        (non-persistent buffers) with the model's ``_init_weights``, as ``from_pretrained`` does."""
        missing = False
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or getattr(tensor, "_is_hf_initialized", False):  # read already (a tied weight)
                continue
            name = f"{prefix}.{key}" if prefix else key
            if name in self.files:
                # opened per tensor: safetensors maps the file, and pages it read stay resident (and counted)
                # for as long as the map is open
                with _opened(self.files[name]) as handle:
                    stored = handle.get_tensor(name)
                    if stored.shape != tensor.shape:
                        raise UserError(f"{self.files[name]}: {name} has shape {tuple(stored.shape)} where this model's "
                                        f"is {tuple(tensor.shape)}; the directory holds another model than the config builds")
                    tensor.copy_(stored.to(tensor.dtype))
                tensor._is_hf_initialized = True
            else:
                missing = True
        if missing:  # a non-persistent buffer the model computes (rotary frequencies), or a tied weight's twin
            self.model._init_weights(module)  # skips what was read: init functions leave _is_hf_initialized tensors


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
