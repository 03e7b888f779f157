"""What one training step needs in memory, estimated without allocating it.

``estimate_step_memory(spec)`` takes any ``nn.Module`` (built by a function), how the trainer turns a
batch into a loss, a batch of the real shape, the activation-checkpointing policy, the optimizer,
the precision and how the engine shards state, and returns the bytes by part:

* the forward-backward peak: the model and the batch are built under ``FakeTensorMode`` on the run's
  device type (shapes and dtypes only: nothing is allocated, and kernels are chosen as on the real
  device, e.g. fused attention on the CPU saves no (T, T) weights), the policy is applied with
  ``checkpoint_activations`` itself, and forward, loss and backward run under the run's autocast
  while ``LiveBytes`` follows every storage the step creates until it is freed: the peak of what is
  alive at once (saved activations, logits, recomputed segments, backward's temporaries and the
  gradients), exactly as the allocator would see it, for any model and any policy, plus the fp32
  result a bf16 matmul computes first on a CPU without bf16 arithmetic (``emulates_bf16_matmul``). With gradient
  accumulation two micro-batches run (the second adds to the first one's gradients);
* the bytes kept for backward and the part of them saved outside the blocks (the logits and the
  loss), from the activation-checkpointing probe (``plan_checkpointing``);
* parameters (quantized ones by the bytes their storage holds), gradients (one per trainable
  parameter, in its dtype; frozen parameters have none) and the optimizer state of the trainable
  parameters, asked of the real optimizer class at their real shapes and dtypes
  (``ds_hydra.optim.state_size``: 8-bit and 4-bit states, Adafactor's factored ones, any other);
* with the optimizer stepping inside backward (``optimizer_in_backward``), each gradient is freed as
  soon as its parameter has stepped: the forward-backward run frees it too, so the peak holds only
  the gradients alive at once, plus one parameter's step temporaries;
* the optimizer step's temporaries: a parameter-sized copy for multi-tensor (foreach) kernels, two
  of the largest parameter for the per-tensor loop (the CPU's default), none for fused kernels.

The step needs ``parameters + optimizer state + batch + max(forward-backward peak, gradients +
optimizer-step temporaries)``. ``bench/memory.py`` compares this with the measured peak of real steps.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ds_hydra.activation_checkpointing.apply import ckpt_config, plan_checkpointing
from ds_hydra.activation_checkpointing.config import format_bytes


@dataclass
class Sharding:
    """How the engine splits per-device state over ``world`` processes (1: none), and what it offloads."""

    world: int = 1
    parameters: bool = False
    gradients: bool = False
    optimizer_state: bool = False
    optimizer_on_host: bool = False
    """The optimizer state lives in host memory (ZeRO-Offload, FSDP's CPU offload)."""


@dataclass
class Knobs:
    """The config keys a refusal names, in the words of the config that built the spec."""

    batch_size: str = "trainer.batch_size"
    seq_len: str = "seq_len"
    head_chunk: Optional[str] = None
    """The key that computes the head and loss in chunks (never holding the logits), if the model has one."""
    ckpt: str = "ckpt"


@dataclass
class StepSpec:
    """One training step, described without building it."""

    build_model: Callable[[], nn.Module]
    """Builds the model (called under FakeTensorMode with the device as default: no memory is used)."""
    example_batch: Callable[[torch.device], Any]
    """A batch of the real shape on ``device`` (tensors of any nesting)."""
    loss: Callable[[nn.Module, Any], torch.Tensor]
    """The scalar loss of the model on a batch, as the trainer computes it."""
    device: torch.device
    ckpt: Dict[str, Any] = field(default_factory=dict)
    """The activation-checkpointing policy (the fields of CkptConfig)."""
    make_optimizer: Optional[Callable[[List[torch.Tensor]], torch.optim.Optimizer]] = None
    """Builds the optimizer over a list of parameters; asked on the CPU for its state at the trainable
    parameters' shapes (``ds_hydra.optim.state_size``)."""
    optimizer_in_backward: bool = False
    """Each parameter steps as soon as its gradient is ready, and the gradient is freed then."""
    optimizer_step: Optional[str] = None
    """The step's kernel on the device: fused, foreach or loop; None: as ``make_optimizer`` builds it."""
    autocast_dtype: Optional[torch.dtype] = None
    grad_accum_steps: int = 1
    stored_bytes: Optional[Callable[[nn.Module], Dict[str, int]]] = None
    """Bytes some parameters are stored in, by name, where the model built for the estimate holds them in
    another form (a base quantized by a library whose tensors cannot be faked: built plain, counted packed)."""
    sharding: Sharding = field(default_factory=Sharding)
    knobs: Knobs = field(default_factory=Knobs)
    stored_as_loaded: bool = True
    """With ``stored_bytes``: the base is stored that way block by block as it loads (a QLoRA base read from
    ``model.pretrained``), so loading holds the stored base plus one block at its dtype; False: it is built
    whole at its dtype first and then stored (the plain and the stored base are both held at the end)."""


@dataclass
class StepMemory:
    """Bytes of one training step on its device, by part (``total`` is what the step needs)."""

    parameters: int
    gradients: int
    optimizer_state: int
    batch: int
    forward_backward_peak: int
    """Peak of forward + loss + backward above the parameters: saved activations, logits, the
    gradients as they are allocated and backward's temporaries."""
    kept: int
    """Bytes held between forward and backward (saved for backward) under the policy."""
    saved_outside: int
    """The part of ``kept`` saved outside the blocks: the head's logits and the loss."""
    largest_outside: int
    """The largest storage saved outside the blocks; the loss's backward makes gradients of its size."""
    optimizer_step: int
    """Temporaries of the optimizer step."""
    tokens: int = 0
    knobs: Knobs = field(default_factory=Knobs)
    frozen_parameters: int = 0
    """The part of ``parameters`` that does not train (no gradient, no optimizer state): a frozen base."""
    gradients_in_backward: bool = False
    """Each gradient is freed once its parameter steps inside backward (``optimizer_in_backward``)."""
    alternatives: Dict[str, int] = field(default_factory=dict)
    """What the step would need under each alternative asked for (``estimate_step_memory(alternatives=)``)."""
    loading: int = 0
    """Peak of building the model where it can pass the step's: a base stored quantized is first held at its
    dtype (one block of it, or all of it; ``StepSpec.stored_as_loaded``). 0 where the base is built as stored."""

    @property
    def step_total(self) -> int:
        step = max(self.forward_backward_peak, self.gradients + self.optimizer_step)
        return self.parameters + self.optimizer_state + self.batch + step

    @property
    def total(self) -> int:
        """What the run needs: the step's peak, or loading's where that is higher."""
        return max(self.step_total, self.loading)

    @property
    def logits(self) -> int:
        """What the logits cost at the peak: saved outside the blocks, plus the loss's gradients (two
        of the largest saved tensor's size) as far as the peak has room for them."""
        return self.saved_outside + min(self._temporaries, 2 * self.largest_outside)

    @property
    def activations(self) -> int:
        """What the blocks cost at the peak: their saved tensors, recomputed segments, backward's temporaries."""
        return self.kept - self.saved_outside + self._temporaries - min(self._temporaries, 2 * self.largest_outside)

    @property
    def _temporaries(self) -> int:
        return max(0, self.forward_backward_peak - self.kept - self.gradients)

    def parts(self) -> Dict[str, int]:
        return {
            "activations": self.activations,
            "logits": self.logits,
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer state": self.optimizer_state,
        }

    def breakdown(self) -> str:
        """One line per part, as ``task=validate`` prints it: what it holds and its bytes."""
        trained = self.parameters - self.frozen_parameters
        rows = [
            ("weights", self.parameters, f"{format_bytes(trained)} trained, {format_bytes(self.frozen_parameters)} frozen"
             if self.frozen_parameters else "all trained"),
            ("gradients", self.gradients, "each freed once its parameter steps in backward (the live ones are in activations)"
             if self.gradients_in_backward else "one per trained weight, held until the optimizer steps"),
            ("optimizer state", self.optimizer_state, "as the optimizer class keeps it for the trained weights"),
            ("activations", self.activations, f"saved for backward under the ckpt policy, recompute and backward's temporaries"),
            ("logits", self.logits, "the head's output and the loss's gradient of it"),
            ("batch", self.batch, f"{self.tokens} tokens"),
            ("optimizer step", self.optimizer_step, "the step's temporaries"),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"  {name:<{width}}  {format_bytes(n):>10}  {what}" for name, n, what in rows]
        lines.append(f"  {'step peak':<{width}}  {format_bytes(self.step_total):>10}  weights + optimizer state + batch + "
                     f"max(forward-backward peak, gradients + optimizer step)")
        if self.loading:
            lines.append(f"  {'loading':<{width}}  {format_bytes(self.loading):>10}  the quantized base while it is built "
                         f"(part of it still at its dtype){'; the peak' if self.loading > self.step_total else ''}")
        return "\n".join(lines)

    def dominant(self) -> str:
        return max(self.parts().items(), key=lambda kv: kv[1])[0]

    def describe(self) -> str:
        """``1.2 GiB (activations 900 MiB, logits 120 MiB, parameters ...)``, largest part first."""
        parts = sorted(self.parts().items(), key=lambda kv: -kv[1])
        return f"{format_bytes(self.total)} ({', '.join(f'{name} {format_bytes(n)}' for name, n in parts)})"

    def advice(self) -> str:
        """The knobs that shrink the dominant part."""
        k, part = self.knobs, self.dominant()
        if part == "activations":
            return f"lower {k.batch_size} or {k.seq_len}, or recompute activations ({k.ckpt}=full)"
        if part == "logits":
            chunk = f"set {k.head_chunk} (the logits are never held whole), or " if k.head_chunk else ""
            return f"{chunk}lower {k.batch_size} or {k.seq_len}"
        return "a smaller model, or shard the state over several devices (engine=fsdp, or engine=deepspeed engine.zero_stage=3)"


# -- the estimate ----------------------------------------------------------------------------------------
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


def emulates_bf16_matmul(device: torch.device) -> bool:
    """Whether a bf16 matmul on ``device`` first computes its result in fp32, in a buffer of its own: on a
    CPU without bf16 arithmetic (neither AVX512_BF16 nor AMX) torch's bf16 matmuls do (the resident peak
    of a bf16 mm grows by 6 bytes per output element, 2 of them the output's; an fp32 mm's by 4, its
    output's). CUDA's and native-bf16 CPUs' kernels write bf16 directly."""
    if device.type != "cpu":
        return False
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return not any(check() for check in native if check is not None)  # torch < 2.3 cannot tell: counted


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, and their peak.

    Each storage is counted once when an op first returns a tensor on it (views share it) and
    uncounted when it is freed (a finalizer on the storage: torch keeps a storage's Python object for
    as long as the storage lives); storages of ``existing`` tensors are not counted. Used on fake
    tensors: the peak of a step without its memory."""

    def __init__(self, existing=(), bf16_matmul_scratch: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.bf16_matmul_scratch = bf16_matmul_scratch
        # storages that exist already (parameters, the batch): views of them allocate nothing
        self._sizes: Dict[int, int] = {t.untyped_storage()._cdata: 0 for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        if self.bf16_matmul_scratch and func in _MATMULS and out.dtype == torch.bfloat16:
            self.peak = max(self.peak, self.live + 4 * out.numel())  # the fp32 result, freed as the op returns
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _bytes(tensors) -> int:
    from ds_hydra.optim.state_size import tensor_bytes

    return sum(tensor_bytes(t) for t in tensors)


def _autocast(spec: StepSpec):
    if spec.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(spec.device.type, dtype=spec.autocast_dtype)


def _forward_backward_peak(spec: StepSpec, model: nn.Module, batch: Any, ckpt: Dict[str, Any]) -> int:
    """Peak bytes above the parameters of forward + loss + backward on fake tensors under ``ckpt``."""
    from ds_hydra.activation_checkpointing import checkpoint_activations, remove_activation_checkpointing

    ckpt = {**ckpt, "offload": False, "cpu_checkpointing": False}  # offload moves bytes to the host: see below
    with _autocast(spec):
        checkpoint_activations(model, example_input=lambda: (spec.example_batch(spec.device),),
                               forward=lambda batch: spec.loss(model, batch), **ckpt)
    existing = [*model.parameters(), *model.buffers(), *(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor))]
    tracker = LiveBytes(existing, bf16_matmul_scratch=emulates_bf16_matmul(spec.device))
    hooks = []
    if spec.optimizer_in_backward:  # the gradient lives until its parameter has stepped, inside backward
        def free_grad(param):
            param.grad = None
        hooks = [p.register_post_accumulate_grad_hook(free_grad) for p in model.parameters() if p.requires_grad]
    try:
        with tracker:
            for _ in range(min(spec.grad_accum_steps, 2)):  # a second micro-batch adds to the first's gradients
                with _autocast(spec):
                    loss = spec.loss(model, batch)
                loss.backward()
                del loss
    finally:
        for hook in hooks:
            hook.remove()
        remove_activation_checkpointing(model)
        for p in model.parameters():
            p.grad = None
    return tracker.peak


def estimate_step_memory(spec: StepSpec, alternatives: Optional[Callable[[StepMemory], Dict[str, StepSpec]]] = None) -> StepMemory:
    """Bytes of one training step of ``spec`` (see the module docstring); allocates no real tensors
    beyond the optimizer's probes (at most ``state_size.PROBE_ELEMENTS`` elements each).

    ``alternatives(estimate)``: specs of the same model under other settings (activation checkpointing,
    a chunked head) worth estimating given this estimate (e.g. only when it does not fit); each is
    replayed in the same estimate, sharing the parameter, gradient and optimizer numbers, and its total
    goes into ``StepMemory.alternatives``.
    """
    ckpt = dict(spec.ckpt)
    quiet = logging.getLogger("ds_hydra.activation_checkpointing")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the plan is logged when the trainer applies it, not here
    try:
        with warnings.catch_warnings(), FakeTensorMode(), torch.device(spec.device):
            # torch's own deprecation notices (torch 2.4's checkpoint calls torch.cpu.amp.autocast) belong to
            # the run, if anywhere; a refusal is one line
            warnings.simplefilter("ignore", FutureWarning)
            model = spec.build_model()
            model.train()
            batch = spec.example_batch(spec.device)
            with _autocast(spec):
                plan = plan_checkpointing(model, ckpt_config(ckpt), (batch,), forward=lambda b: spec.loss(model, b), measure=True)
            peak = _forward_backward_peak(spec, model, batch, ckpt)
            params = list(model.parameters())
            trainable = [p for p in params if p.requires_grad]
            largest = max((p.numel() * p.element_size() for p in trainable), default=0)
            largest_numel = max((p.numel() for p in trainable), default=0)
            trainable_shapes = [(tuple(p.shape), p.dtype) for p in trainable]
            stored = spec.stored_bytes(model) if spec.stored_bytes is not None else {}
            named = dict(model.named_parameters())
            stored_ids = {id(named[name]): n for name, n in stored.items() if name in named}
            frozen_bytes = sum(stored_ids.get(id(p), _bytes([p])) for p in params if not p.requires_grad)
            loading = _loading_peak(model, stored_ids, spec.stored_as_loaded) if stored_ids else 0
            tensors = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
            batch_bytes, tokens = _bytes(tensors), (tensors[0].numel() if tensors else 0)
    finally:
        quiet.setLevel(level)
    profile = plan.profile
    parameter_bytes = sum(stored_ids.get(id(p), _bytes([p])) for p in params)
    gradient_bytes = _bytes(trainable)
    if plan.policy.offload is not None and spec.device.type == "cuda":  # saved activations wait in host memory
        block_kept = profile.kept_bytes(plan.regions) - profile.H
        peak -= max(0, block_kept - max(b.saved_bytes for b in profile.blocks))
    state_bytes, step_kind = _optimizer_state(spec.make_optimizer, trainable_shapes, spec.optimizer_in_backward)
    step_kind = spec.optimizer_step or step_kind
    sharding = spec.sharding
    share = (lambda n, split: n // sharding.world if split else n)  # noqa: E731
    optimizer_state = 0 if sharding.optimizer_on_host else share(state_bytes, sharding.optimizer_state)
    step_temporaries = {"fused": 0, "foreach": gradient_bytes, "loop": 2 * largest}[step_kind]
    if spec.make_optimizer is not None:  # what a library's own kernel allocates for the largest tensor's step
        from ds_hydra.optim.state_size import kernel_temporaries_per_element

        step_temporaries = max(step_temporaries, kernel_temporaries_per_element(spec.make_optimizer, spec.device.type) * largest_numel)
    unsharded_gradients = gradient_bytes - share(gradient_bytes, sharding.gradients)  # reduced and freed per block
    held_gradients = share(gradient_bytes, sharding.gradients)
    if spec.optimizer_in_backward:  # stepped and freed inside backward: the fake run's peak holds what is alive
        held_gradients, unsharded_gradients = 0, 0
        peak += step_temporaries if step_kind == "loop" else {"fused": 0, "foreach": largest}[step_kind]  # one parameter's step at a time
        step_temporaries = 0
    estimate = StepMemory(
        parameters=share(parameter_bytes, sharding.parameters),
        gradients=held_gradients,
        optimizer_state=optimizer_state,
        batch=batch_bytes,
        forward_backward_peak=peak - unsharded_gradients,
        kept=profile.kept_bytes(plan.regions),
        saved_outside=profile.H,
        largest_outside=profile.outside_largest_bytes,
        optimizer_step=0 if sharding.optimizer_on_host else share(step_temporaries, sharding.optimizer_state),
        tokens=tokens,
        knobs=spec.knobs,
        frozen_parameters=share(frozen_bytes, sharding.parameters),
        gradients_in_backward=spec.optimizer_in_backward,
        loading=share(loading, sharding.parameters),
    )
    for name, other in (alternatives(estimate) if alternatives is not None else {}).items():
        peak = _replayed_peak(other)
        estimate.alternatives[name] = replace(estimate, forward_backward_peak=peak - unsharded_gradients).total
    return estimate


def _loading_peak(model: nn.Module, stored: Dict[int, int], as_loaded: bool) -> int:
    """Bytes held while a base stored in another form (``stored``: bytes by parameter id) is built: every
    parameter as stored plus, block by block, the largest block's stored parameters at their own dtype
    (``as_loaded``), or the whole base at its dtype beside the stored weights."""
    params = list(model.parameters())
    stored_total = sum(stored.get(id(p), _bytes([p])) for p in params)
    if not as_loaded:
        return stored_total + sum(_bytes([p]) for p in params if id(p) in stored)
    blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    largest = max((sum(_bytes([p]) for p in block.parameters() if id(p) in stored) for block in blocks), default=0)
    return stored_total + largest


def _replayed_peak(spec: StepSpec) -> int:
    """The forward-backward peak of ``spec`` alone (its model rebuilt on fake tensors, replayed once)."""
    quiet = logging.getLogger("ds_hydra.activation_checkpointing")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), FakeTensorMode(), torch.device(spec.device):
            warnings.simplefilter("ignore", FutureWarning)
            model = spec.build_model()
            model.train()
            return _forward_backward_peak(spec, model, spec.example_batch(spec.device), dict(spec.ckpt))
    finally:
        quiet.setLevel(level)


def _optimizer_state(make_optimizer, trainable_shapes, per_parameter: bool) -> Tuple[int, str]:
    """(bytes of the optimizer's state for these trainable (shape, dtype)s, the step's kernel: fused,
    foreach or loop), asked of the optimizer on the CPU (``ds_hydra.optim.state_size``)."""
    if make_optimizer is None:
        return 0, "fused"
    from ds_hydra.optim.state_size import optimizer_state_bytes

    return optimizer_state_bytes(make_optimizer, trainable_shapes, per_parameter)


# -- the device's free memory -------------------------------------------------------------------------
def free_memory(device: torch.device, processes_on_host: int = 1) -> Tuple[Optional[int], str]:
    """(bytes this process may use on ``device``, where the number comes from); None when unknown.

    CUDA: ``torch.cuda.mem_get_info``'s free bytes. CPU: the host's MemAvailable (/proc/meminfo),
    lowered to the cgroup's limit (containers, Slurm) when that is tighter, else psutil's available
    memory; shared by the ``processes_on_host`` ranks of a launch on this host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    found = [(v, src) for v, src in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not found:
        try:
            import psutil

            found = [(int(psutil.virtual_memory().available), "available host memory")]
        except ImportError:
            return None, "unknown (no /proc/meminfo, no psutil)"
    value, source = min(found)
    if processes_on_host > 1:
        return value // processes_on_host, f"{source}, shared by {processes_on_host} ranks on this host"
    return value, source


def _meminfo_available() -> Tuple[Optional[int], str]:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available host memory"
    except (OSError, ValueError, IndexError):
        pass
    return None, ""


def _cgroup_available() -> Tuple[Optional[int], str]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file, encoding="ascii").read().strip()
            usage = int(open(usage_file, encoding="ascii").read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage), "the cgroup's memory limit"
    return None, ""
