"""The training loop: an explicit loop over optimizer steps, no hook hierarchy.

``train(cfg)`` builds data, model, optimizer and scheduler from the config, applies the model
transforms in one place (``prepare_model``), trains for ``trainer.max_steps`` steps with gradient
accumulation and clipping, evaluates periodically, and writes into the run directory:
``metrics.jsonl``, ``loss_curve.png``, ``config_resolved.yaml`` and resumable checkpoints.
It returns the final metrics (what Hydra sweepers read).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ds_hydra.deepspeed import checkpointing as deepspeed_checkpointing
from ds_hydra.activation_checkpointing import SavedActivationCounter, checkpoint_activations, checkpointing_state
from ds_hydra.activation_checkpointing.blocks import model_blocks
from ds_hydra.data.base import TRAIN_EVAL_STREAM, TRAIN_STREAM, VAL_STREAM
from ds_hydra.data.tokenizer import save_run_tokenizer
from ds_hydra.devices import resolve_device, resolve_precision
from ds_hydra.engine import start_engine
from ds_hydra.engine.base import Engine
from ds_hydra.errors import UserError
from ds_hydra.models import adapters
from ds_hydra.models.adapter_config import adapter_on, quantize_of
from ds_hydra.models.build import build_model, num_params
from ds_hydra.loss.step import build_loss, label_tokens, loss_sum, token_mean_loss
from ds_hydra.optim.state_format import optimizer_param_names
from ds_hydra.training import adapter_base
from ds_hydra.training import resume as resume_io
from ds_hydra.common import run_lock
from ds_hydra.common import signals
from ds_hydra.common.checkpoint_files import remove_partial_checkpoints
from ds_hydra.common.terminal import log_lines_beside_bar, minutes_text
from ds_hydra.training import sharded_checkpoint
from ds_hydra.training import state as state_io
from ds_hydra.training.slices import optimization_of, run_data, tracked_run
from ds_hydra.training.seq_vocab import check_vocab, resolve_seq_len
from ds_hydra.training.memory_fit import fit_to_memory
from ds_hydra.training.memory_preflight import check_step_memory
from ds_hydra.training.metrics import MetricsLogger
from ds_hydra.training.nonfinite import NonFiniteLoss, NonFiniteWatch
from ds_hydra.training.profiling import StepProfiler
from ds_hydra.common.run_dir import resolve_run_dir, write_resolved_config
from ds_hydra.training.throughput import Throughput

log = logging.getLogger(__name__)


def prepare_model(
    model: nn.Module,
    cfg,
    engine: Engine,
    loss_fn: nn.Module,
    seq_len: int,
    autocast_dtype: Optional[torch.dtype] = None,
):
    """Every model transform, in the only order that composes; returns ``(wrapped, optimizer, scheduler)``,
    where ``wrapped`` is the module to call:

    1. activation checkpointing wraps blocks (compile must see the checkpoint boundaries); its plan is
       probed on a batch of the run's shape through the model and the loss, under the run's autocast;
    2. torch.compile each block and the parameter-free loss, in place (parameter names and the state
       dict stay unchanged);
    3. the engine wraps everything last and builds the optimizer and scheduler around it: DDP, FSDP2's
       ``fully_shard`` per block then the root (in place), or DeepSpeed's engine.

    The block list is found once (``ckpt.blocks``, or the longest list of same-class layers) and serves
    all three. A model whose config switches a KV cache on (``config.use_cache``, Hugging Face's default)
    trains with it off: training reads no cache, and building one costs memory and time.
    """
    model.to(engine.device)
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False
    path, blocks = model_blocks(model, cfg.ckpt.get("blocks"))
    shape = (cfg.trainer.batch_size, seq_len)
    example = lambda: (torch.zeros(shape, dtype=torch.long, device=engine.device),) * 2  # noqa: E731  (built only if needed)
    ckpt = {**OmegaConf.to_container(cfg.ckpt, resolve=True), "blocks": path or None}
    with torch.autocast(engine.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        checkpoint_activations(
            model, example_input=example, forward=lambda ids, labels: loss_sum(model, loss_fn, {"input_ids": ids, "labels": labels}), **ckpt
        )
    deepspeed_checkpointing.configure_for_run(cfg.ckpt)  # models calling ds_hydra.checkpointing obey ckpt too
    if _compile_enabled(cfg.trainer.compile, engine.device):
        _refuse_compiled_segments_on_old_torch(model)
        _room_for_block_graphs(len(blocks))
        for block in blocks or [model]:  # no block list: the whole model is one graph
            block.compile()
        loss_fn.compile()  # the cross-entropy kernel only: fuses the fp32 upcast over the vocabulary
    return engine.setup(model, blocks, autocast_dtype, optimization_of(cfg))


# torch < 2.5: dynamo does not inline module calls (each block is its own graph) and cannot run a
# compiled block inside another block's checkpoint
OLD_DYNAMO = torch.__version__ < (2, 5)


def _refuse_compiled_segments_on_old_torch(model: nn.Module) -> None:
    """A segment of several blocks runs its later (compiled) blocks inside the first one's checkpoint,
    which torch < 2.5 fails to recompute (a fake-tensor error at backward)."""
    state = checkpointing_state(model)
    if OLD_DYNAMO and state is not None and any(region.size > 1 for region in state.regions):
        raise UserError(
            f"ckpt.segments: segments of several blocks with trainer.compile=true need torch >= 2.5 (this is torch "
            f"{torch.__version__}); use per-block checkpointing (ckpt=full or ckpt.segments=<number of blocks>) "
            f"or trainer.compile=false"
        )


def _room_for_block_graphs(n_blocks: int) -> None:
    """Blocks of one class share one compiled graph on torch >= 2.5 (module calls are inlined); older
    torch compiles each block apart, and past its cache limit (8) would silently run blocks eagerly."""
    if OLD_DYNAMO:
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, 2 * n_blocks + 8)  # train and eval graphs


def _compile_enabled(option: Optional[bool], device: torch.device) -> bool:
    return device.type == "cuda" if option is None else option


class Trainer:
    """One training run's live state and its step, eval and save operations."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        tcfg = cfg.trainer
        self.engine = start_engine(cfg.engine, resolve_device(tcfg.device))  # this rank's engine, place and device
        self.device = self.engine.device
        self.autocast_dtype = resolve_precision(tcfg.precision.value, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        state_io.seed_everything(tcfg.seed)

        self.data = run_data(cfg)
        # With an adapter only the adapters train: checkpoints keep them alone, and the frozen base comes
        # from model.pretrained or, written once, from the run dir (ds_hydra.training.adapter_base).
        self.adapted = adapter_on(cfg.get("adapter"))
        self.base_to_save: Optional[Dict[str, torch.Tensor]] = None  # written by _train once the run has started
        # Nothing to load into the base (a model.pretrained run's base is its directory's): build_model may then
        # quantize a QLoRA base block by block as it reads it (ds_hydra.models.quantized_load); a random QLoRA
        # base is initialised (or, resumed, read back) and kept in the run dir the same way, block by block
        init_from = cfg.trainer.get("init_from")
        loads_base = bool(init_from) or (self.adapted and adapters.base_in_run_dir(cfg.model, init_from))
        kept = None
        if loads_base and not init_from and quantize_of(cfg.model) != "none":
            kept = adapter_base.kept_base(run_dir, writes=self.engine.is_main)
        model = build_model(cfg.model, self.data.vocab_size, cfg.get("adapter"),
                            load_base=self._load_base if loads_base else None, kept_base=kept)
        self.base_written = None  # the QLoRA base written block by block, renamed into place by _train
        if kept is not None and kept.write_to is not None:
            if kept.write_to.finished:
                self.base_written = kept.write_to
            else:  # built whole instead (not a transformers model): _load_base kept it for base_model.pt
                adapter_base.discard_staging(run_dir)
        check_vocab(self.data, model)
        self.seq_len = resolve_seq_len(self.data, model)
        if getattr(self.data, "pack", False):
            from ds_hydra.models.packing import check_packing

            check_packing(model)  # a model that would let packed examples attend to each other is refused
        if self.adapted:
            log.info("adapter: %s", adapters.adapter_summary(model))
        self.loss_fn = build_loss(cfg.get("loss"))
        # self.wrapped runs forward and backward (DDP, FSDP, DeepSpeed's engine, or the model itself);
        # self.model is the model underneath: its attributes, parameter names and state dict.
        self.model = model
        # model FLOPs from the model as written: before checkpointing (recompute is not model FLOPs), compile
        # or sharding wrap it
        self.throughput = Throughput.for_model(model, self.seq_len, self.device, self.autocast_dtype, tcfg.get("peak_tflops"))
        self.wrapped, self.optimizer, self.scheduler = prepare_model(
            model, cfg, self.engine, self.loss_fn, self.seq_len, self.autocast_dtype
        )
        # Each rank takes its share of every global batch (see RandomBlocks).
        self.train_batches = self.sampler("train", TRAIN_STREAM)
        self.step = 0
        self.activation_bytes: Optional[int] = None  # saved for backward by the first micro-batch
        self.tokens_per_step = tcfg.batch_size * self.seq_len * tcfg.grad_accum_steps
        # The summed loss of the steps since the last log line: saved, so a resumed run logs the same means.
        self.loss_sum: Optional[torch.Tensor] = None
        self.loss_steps = 0
        self.nonfinite = NonFiniteWatch(self.device)  # first NaN/inf step, kept on the device (no sync)
        self.skipped_nonfinite = 0
        self.last_saved: Optional[Path] = None  # the newest complete checkpoint this run wrote or resumed from
        self.checkpoint_format = resolve_checkpoint_format(tcfg, self.engine.name)
        # An adapter run's checkpoints hold its trainable parameters (and their optimizer state) alone.
        self.trainable = frozenset(adapters.trainable_names(self.model)) if self.adapted else None
        self.async_checkpoint = bool(tcfg.get("async_checkpoint"))
        self.pending_save: Optional[sharded_checkpoint.PendingSave] = None  # at most one background write
        # Background writes coordinate over a gloo group of their own (collective: every rank creates it).
        self.checkpoint_group = sharded_checkpoint.checkpoint_process_group(self.engine.world_size) if self.async_checkpoint else None
        # The CPU copy background writes read, allocated at the first save and refilled by every later one.
        self.staging = sharded_checkpoint.StagingBuffers() if self.async_checkpoint else None
        self._config_yaml: Optional[str] = None  # the resolved config every checkpoint holds (it never changes)

    def _load_base(self, model: nn.Module) -> None:
        """The base weights, before quantization and adapters: an adapter run's saved base when it resumes,
        else ``trainer.init_from``'s (the optimizer, schedule and data start afresh)."""
        keeps_base = self.adapted and adapters.base_in_run_dir(self.cfg.model, self.cfg.trainer.get("init_from"))
        if keeps_base and adapter_base.has_base(self.run_dir) is not None:  # base_model/ or base_model.pt
            adapter_base.load_base(model, self.run_dir)
            return
        if self.cfg.trainer.get("init_from"):
            from ds_hydra.training.init_from import load_initial_weights

            load_initial_weights(model, self.cfg.trainer.init_from)
        if keeps_base and self.engine.is_main:
            self.base_to_save = model.state_dict()  # references: no copy (quantization then replaces the weights)

    def sampler(self, split: str, stream: int):
        tcfg = self.cfg.trainer
        return self.data.sampler(
            split, self.seq_len, tcfg.batch_size, tcfg.seed, stream=stream,
            rank=self.engine.rank, world_size=self.engine.world_size,
        )

    # -- one step -------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns its loss (on device): the mean over every label token of the step.

        The step's micro-batches are drawn first and their label tokens counted (one integer all-reduced
        over ranks), so each micro-batch's backward takes its summed loss over that count: the gradients
        add up to the gradient of the step's token mean, whatever ``batch_size x grad_accum_steps x
        ranks`` divides the step (the engine undoes its own averaging over ranks and micro-batches).
        Clipping then acts on those gradients. The returned loss is the same on every rank.
        """
        if not self.wrapped.training:  # train() walks every module: only when evaluation left eval mode
            self.wrapped.train()
        accum = self.cfg.trainer.grad_accum_steps
        batches = [self.train_batches.next_batch(self.device) for _ in range(accum)]
        tokens = self.engine.sum_(sum(label_tokens(batch["labels"]) for batch in batches))  # the step's label tokens
        tokens = tokens.clamp(min=1).float()  # stays on the device: no host sync
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            counting = self.activation_bytes is None and i == 0  # count once: hooks cost nothing, but once is enough
            with self.engine.micro_batch(last=i == accum - 1):
                with self.autocast(), SavedActivationCounter(self.model) if counting else contextlib.nullcontext() as saved:
                    share = loss_sum(self.wrapped, self.loss_fn, batch) / tokens  # its part of the step's mean
                if counting:
                    self.activation_bytes = saved.bytes
                    log.info("activation memory: %.1f MiB saved for backward per micro-batch", saved.bytes / 2**20)
                self.engine.backward(share, accum)
            total += share.detach().double()
        total = self.engine.sum_(total).float()  # the step's token mean (a one-number all-reduce)
        if self.cfg.trainer.skip_nonfinite and not torch.isfinite(total).item():  # a host sync, only in this mode
            return self._skip_update(total)
        self.engine.step(self.cfg.trainer.grad_clip)
        self.step += 1
        self.nonfinite.observe(total, self.step)
        self.loss_sum = total if self.loss_sum is None else self.loss_sum + total
        self.loss_steps += 1
        return total

    def _skip_update(self, loss: torch.Tensor) -> torch.Tensor:
        """``trainer.skip_nonfinite``: drop this step's gradients and update; data and schedule move on."""
        self.engine.skip_step()
        self.step += 1
        self.skipped_nonfinite += 1
        limit = self.cfg.trainer.skip_nonfinite
        if self.skipped_nonfinite > limit:
            raise NonFiniteLoss(loss.item(), self.step, self.last_saved, self.run_dir, skipped=limit)
        log.warning("step %d: loss is %s; skipped its update (%d of trainer.skip_nonfinite=%d)", self.step, loss.item(), self.skipped_nonfinite, limit)
        return loss

    def pop_mean_loss(self) -> Optional[float]:
        """Mean loss of the steps since the last call (one host sync); None if every one was skipped."""
        if not self.loss_steps:
            return None
        mean = (self.loss_sum / self.loss_steps).item()
        self.loss_sum, self.loss_steps = None, 0
        return mean

    def check_finite(self) -> None:
        """Stop with ``NonFiniteLoss`` if any loss so far was NaN or inf (one host sync)."""
        self.nonfinite.check(self.last_saved, self.run_dir, self.skipped_nonfinite)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Token-weighted mean loss of each split: over every label token of the batches evaluated.

        ``train_loss`` (and ``val_loss`` of token streams) take ``eval_batches`` random batches, the same at
        every evaluation (a fresh sampler per call), so the curve shows the model changing, not the sample;
        data that evaluate their whole split (SFT) give ``val_loss`` over every validation example once.
        Evaluation never disturbs training's RNG.
        """
        self.wrapped.eval()
        result = {}
        # Ranks split the batches and make the same number of forwards each (FSDP's gathers need that):
        # ceil(eval_batches / world) random batches each, or their share of the whole split.
        world = self.engine.world_size
        per_rank = -(-self.cfg.trainer.eval_batches // world)
        for name, split, stream in (("train_loss", "train", TRAIN_EVAL_STREAM), ("val_loss", "val", VAL_STREAM)):
            if split == "val" and self.data.eval_whole_split:
                whole = self.data.whole_split(split, self.seq_len, self.cfg.trainer.batch_size, self.engine.rank, world)
                batches = whole.batches(self.device)
            else:
                sampler = self.sampler(split, stream)
                batches = (sampler.next_batch(self.device) for _ in range(per_rank))
            result[name] = token_mean_loss(self.wrapped, self.loss_fn, batches, self.device, self.autocast, self.engine.sum_)
        self.wrapped.train()
        return result

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The ``full`` format: the whole state in one process's format, whatever the engine (FSDP,
        DeepSpeed: gathered to rank 0)."""
        return {
            "format": state_io.TRAIN_STATE_FORMAT,
            # with an adapter only what trains (the frozen base is model.pretrained's or kept in the run dir)
            "model": self.model_state(),
            "optimizer": self.engine.optimizer_state_dict(self.step),
            "param_names": optimizer_param_names(self.model, self.optimizer),  # what the numbers stand for
            "rng": state_io.rng_state(),
            **self.trainer_state(),
        }

    def trainer_state(self) -> Dict[str, Any]:
        """Everything but model, optimizer and generators: the same on every rank."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.engine.scaler.state_dict() if self.engine.scaler is not None else None,
            "data": self.train_batches.state_dict(),  # global batches taken: the same at any world size
            "loss_window": {"sum": self.loss_sum, "steps": self.loss_steps},
            "skipped_nonfinite": self.skipped_nonfinite,
            "config": self.config_yaml(),
        }

    def config_yaml(self) -> str:
        if self._config_yaml is None:
            self._config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
        return self._config_yaml

    def model_state(self) -> Dict[str, Any]:
        state = self.engine.model_state_dict(trainable_only=self.adapted)
        return adapters.trainable_state(self.model, state) if self.adapted else state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.adapted:
            adapters.check_trainable_state(self.model, state["model"], "the checkpoint")
            self.engine.load_model_state_dict(state["model"], strict=False)
        else:
            self.engine.load_model_state_dict(state["model"])
        self.engine.load_optimizer_state_dict(state["optimizer"], self.run_dir)
        self.load_trainer_state(state)

    def load_trainer_state(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.engine.scaler is not None and state.get("scaler"):
            self.engine.scaler.load_state_dict(state["scaler"])
        self.train_batches.load_state_dict(state["data"])
        if state.get("rng") is not None:
            state_io.set_rng_state(state["rng"])
        self.step = state["step"]
        window = state.get("loss_window") or {}
        self.loss_sum = window["sum"].to(self.device) if window.get("sum") is not None else None
        self.loss_steps = window.get("steps", 0)
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)

    def load(self, path: Path, strict: bool = False, checked: bool = False) -> None:
        """Continue from ``path`` (weights-only load); refuses a checkpoint of another model.

        ``strict`` (sweep jobs) also refuses one saved under any other config; ``checked``: the CLI
        compared the configs already, before the run started.
        """
        path = Path(path)
        sharded = path.is_dir()
        state = sharded_checkpoint.load_resume_state(path)
        if not checked:
            resume_io.check_compatible(state["config"], self.cfg, path, strict=strict)
        saved_adapter = resume_io.flat_config(state["config"]).get("adapter.name") or "none"
        if not self.adapted and str(saved_adapter) != "none":  # it holds the adapter alone, not the model
            raise UserError(f"{path}: an adapter run's checkpoint (adapter={saved_adapter}) holds the adapter's weights "
                            f"alone; resume it with adapter={saved_adapter}, or export it with task=export_hf")
        try:
            if sharded:  # each rank reads the parts of the shards it holds now (any world size)
                if self.adapted:
                    adapters.check_trainable_state(self.model, sharded_checkpoint.saved_model_shapes(path), str(path))
                self.load_trainer_state(sharded_checkpoint.load_sharded(self.engine, path, self.trainable))
            else:
                self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if not line.startswith("Error(s) in loading")), type(exc).__name__)
            raise UserError(f"{path}: does not fit this model or optimizer ({detail[:300]}); resume with the run's own settings") from None
        self.last_saved = Path(path)

    def save(self, wait: bool = False) -> Path:
        """Write a checkpoint of this step (never of a diverged state), then prune old ones.

        ``trainer.async_checkpoint``: returns once the state is copied to CPU memory (first waiting for the
        previous background write: at most one in flight); ``wait`` also waits for this one."""
        self.check_finite()
        dcp = self.checkpoint_format == "dcp"
        path = (state_io.sharded_checkpoint_path if dcp else state_io.checkpoint_path)(self.run_dir, self.step)
        pending = self.pending_save.final if self.pending_save is not None else None
        if path in (self.last_saved, pending):  # already saved at this step (or resumed from it)
            if wait:
                self.finish_pending_save()
            return path
        self.finish_pending_save()
        try:
            if dcp:  # every rank writes its own shards; no gather
                on_complete = self._prune
                if self.adapted:  # <run dir>/adapter as well, once the checkpoint is complete
                    on_complete = self._adapter_dir_writer(self._adapter_snapshot())
                self.pending_save = sharded_checkpoint.save_sharded(
                    self.engine, self.trainer_state(), state_io.rng_state(), path,
                    asynchronous=self.async_checkpoint, process_group=self.checkpoint_group, on_complete=on_complete,
                    staging=self.staging, trainable=self.trainable,
                )
            else:
                self.engine.save_engine_checkpoint(self.run_dir, self.step)  # DeepSpeed: every rank's shards
                state = self.state_dict()  # FSDP, DeepSpeed: every rank takes part in gathering it
                if self.engine.is_main:  # one writer
                    self._write_state(state, path)
                    if self.adapted:  # <run dir>/adapter: the newest adapter in PEFT's format
                        adapters.save_adapter_dir(self.model, state["model"], self.run_dir)
                    self._prune(path)
        except (OSError, UserError) as exc:
            raise self._save_failed(path, exc) from None
        if self.pending_save is None:
            self.last_saved = path
            self.engine.barrier()  # the checkpoint exists for every rank once save returns
        elif wait:
            self.finish_pending_save()
        return path

    def _write_state(self, state: Dict[str, Any], path: Path) -> None:
        """Write the checkpoint; on a full disk, first delete the old checkpoints ``trainer.keep_last``
        would delete after it (so lowering keep_last and resuming frees the space the write needs),
        then write it once more."""
        try:
            state_io.atomic_torch_save(state, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            gone = state_io.prune_before_writing(self.run_dir, self.cfg.trainer.keep_last)
            if not gone:
                raise
            log.warning("%s: the disk is full; deleted %s first (trainer.keep_last=%d would delete them once this "
                        "checkpoint is written) and writing it again", path, ", ".join(p.name for p in gone),
                        self.cfg.trainer.keep_last)
            state_io.atomic_torch_save(state, path)

    def finish_pending_save(self) -> None:
        """Wait for the background write in flight (if any); rank 0 then gives it its final name."""
        if self.pending_save is None:
            return
        pending, self.pending_save = self.pending_save, None
        try:
            self.last_saved = pending.finish()
        except UserError as exc:
            raise self._save_failed(pending.final, exc) from None

    def poll_pending_save(self) -> None:
        """Publish a finished background write without waiting (no collective: each rank on its own)."""
        if self.pending_save is not None and self.pending_save.done():
            self.finish_pending_save()

    def _adapter_snapshot(self) -> Dict[str, torch.Tensor]:
        """The adapter's weights now, whole, on rank 0 (FSDP gathers the adapter alone: every rank calls
        this), copied: an async save writes them after training has moved on."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model_state().items()}

    def _adapter_dir_writer(self, trainable: Dict[str, torch.Tensor]) -> Callable[[Path], None]:
        def complete(newest: Path) -> None:
            adapters.save_adapter_dir(self.model, trainable, self.run_dir)
            self._prune(newest)

        return complete

    def _prune(self, newest: Path) -> None:
        """Rank 0, once ``newest`` is complete: keep the newest ``keep_last`` checkpoints."""
        state_io.prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last)
        self.engine.prune_engine_checkpoints(self.run_dir)

    def _save_failed(self, path: Path, exc: Exception) -> UserError:
        kept = f"{self.last_saved} is intact" if self.last_saved is not None else "no earlier checkpoint exists"
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc).split(": ", 1)[-1]
        if isinstance(exc, UserError) and "trainer.checkpoint_format" in str(exc):
            return exc  # a refused format, not a failed write
        return UserError(
            f"{path}: cannot write the checkpoint ({reason}); {kept}. Free space (or lower "
            f"trainer.keep_last), then continue with resume={self.run_dir}"
        )


def resolve_checkpoint_format(tcfg, engine_name: str) -> str:
    """``trainer.checkpoint_format`` for this engine: auto is dcp for ddp and fsdp (and with
    ``async_checkpoint``), full in one process and with DeepSpeed (beside its own checkpoint)."""
    fmt = getattr(tcfg.get("checkpoint_format", "auto"), "value", tcfg.get("checkpoint_format", "auto"))
    wants_dcp = fmt == "dcp" or tcfg.get("async_checkpoint")
    key = "trainer.checkpoint_format=dcp" if fmt == "dcp" else "trainer.async_checkpoint=true"
    if engine_name == "deepspeed":
        if wants_dcp:
            from ds_hydra.engine.deepspeed_engine import DCP_REFUSED

            raise UserError(DCP_REFUSED.replace("trainer.checkpoint_format=dcp", key, 1))
        return "full"
    if fmt == "auto":
        return "dcp" if engine_name in ("ddp", "fsdp") or tcfg.get("async_checkpoint") else "full"
    return fmt


# After training, on rank 0: ``hook(cfg, run_dir, final step, log_metrics)`` returns metrics to add to the final ones.
AfterTraining = Callable[[Any, Path, int, Callable[..., None]], Dict[str, Any]]


def train(cfg, run_dir: Optional[Path] = None, after_training: Sequence[AfterTraining] = (),
          plan: Optional[resume_io.StartPlan] = None) -> Dict[str, Any]:
    """Train from a composed config; returns the final metrics dict. ``ds_hydra.train`` (the task) adds
    what the config asks to run after training (``lm_eval.after_training``) as ``after_training``.

    ``plan``: the start the CLI settled before Hydra wrote into the run dir (memory checked, checkpoint
    found and checked); without one (a library call, a sweep job) ``train`` settles it here, the same way.
    """
    started = time.perf_counter()
    run_dir = resolve_run_dir(run_dir if run_dir is not None else resume_io.resume_target(cfg)[0])
    held = plan.lock if plan is not None else None  # the CLI's (its StartUp releases it)
    with run_lock.holding(run_dir, cfg, held=held):  # one writer per run dir
        return _train(cfg, run_dir, started, after_training, plan)


def _train(cfg, run_dir: Path, started: float, after_training: Sequence[AfterTraining] = (),
           plan: Optional[resume_io.StartPlan] = None) -> Dict[str, Any]:
    if plan is None:  # a library call or a sweep job; the CLI's preflight settled all of this already
        for line in fit_to_memory(cfg):  # batch_size=auto, ckpt=auto become numbers in cfg
            log.info(line)
        memory = check_step_memory(cfg)  # refuses a step far over the free memory
        plan = resume_io.plan_start(cfg, run_dir)  # refuses to start a new run over an old one
        plan.memory = memory
    if plan.completed is not None:
        log.info("%s finished earlier (%s): returning its final metrics", run_dir, resume_io.COMPLETED_FILE)
        return plan.completed
    trainer = Trainer(cfg, run_dir)
    is_main = trainer.engine.is_main  # with several processes, only rank 0 writes run files
    if is_main:
        remove_partial_checkpoints(run_dir)  # sharded writes a crash interrupted: never complete, never loaded
    earlier_records = []
    if plan.checkpoint is not None:
        trainer.load(plan.checkpoint, strict=resume_io.in_multirun(), checked=plan.checkpoint_checked)
        if is_main:
            earlier_records = resume_io.continue_from(run_dir, trainer.step, plan.checkpoint)
        log.info("resumed from %s at step %d", plan.checkpoint, trainer.step)
    stop = signals.stop_requested()  # (a collective when distributed: after Trainer set the ranks up)
    if stop:  # asked to stop before this run began (e.g. the previous job of a sweep was pre-empted)
        trainer.engine.close()
        raise signals.Stopped(stop, trainer.step, trainer.last_saved, run_dir)
    if cfg.get("resume") and is_main:
        resume_io.record_continuation(run_dir, cfg)
    if is_main:
        write_resolved_config(cfg, run_dir)  # only now: a run that failed to start leaves the directory as it was
        save_run_tokenizer(trainer.data, run_dir)  # <run dir>/tokenizer/: inference decodes as training encoded
        if trainer.base_to_save is not None:  # an adapter run's frozen base, when no model.pretrained holds it
            adapter_base.save_base(trainer.base_to_save, run_dir)
        if trainer.base_written is not None:  # the same, written block by block as it was quantized
            adapter_base.publish_base(trainer.base_written, run_dir)
    trainer.base_to_save = trainer.base_written = None
    data = trainer.data
    log.info(
        "model: %s, %.2fM parameters on %s (%s); data: %s, vocab %d, %d train / %d val tokens, sequences of %d",
        type(trainer.model).__name__, num_params(trainer.model) / 1e6, trainer.device, trainer.autocast_dtype or torch.float32,
        data.source, data.vocab_size, data.num_tokens("train"), data.num_tokens("val"), trainer.seq_len,
    )
    log.info("run dir: %s", run_dir)
    tcfg, world = cfg.trainer, trainer.engine.world_size
    log.info(
        "engine %s; effective batch %d sequences = batch_size %d x grad_accum_steps %d x world size %d",
        trainer.engine.describe(), tcfg.batch_size * tcfg.grad_accum_steps * world,
        tcfg.batch_size, tcfg.grad_accum_steps, world,
    )
    if trainer.throughput.flops_per_token:
        peak = trainer.throughput.peak_flops
        log.info(
            "%.4g FLOPs per token; device peak %s",
            trainer.throughput.flops_per_token, f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown: no MFU",
        )
    # metrics.jsonl and the trackers chosen in `logger` (rank 0 only)
    metrics = MetricsLogger(run_dir, tracked_run(cfg), enabled=is_main, earlier_records=earlier_records, start_step=trainer.step)
    try:
        # SIGTERM/SIGUSR1/Ctrl-C: finish the step, save, raise Stopped; trainer.profile: traces of a few
        # steps; log lines print above the progress bar
        profiler = StepProfiler(tcfg.get("profile"), run_dir, trainer.engine.rank, trainer.device, trainer.step)
        with signals.stop_on_signals(), profiler, log_lines_beside_bar(_shows_bar(tcfg)):
            final = _fit(trainer, metrics, profiler)
        for hook in after_training if is_main else ():  # e.g. harness tasks on the final checkpoint
            final.update(hook(cfg, run_dir, final["step"], metrics.log))
    except BaseException as exc:
        metrics.close(error=exc)  # the trackers mark the run failed (or stopped)
        raise
    finally:
        _finish_background_save(trainer)
        trainer.engine.close()  # a process group this run created (not a launcher's)
    final["wall_s"] = time.perf_counter() - started
    final["run_dir"] = str(run_dir)
    final["activation_bytes"] = trainer.activation_bytes
    metrics.finish(final)  # loss_curve.png, then the final metrics and files to the trackers
    log.info(
        "done: step %d, train loss %.4f, val loss %.4f, %s tokens/s, %.1f s",
        final["step"], final["train_loss"], final["val_loss"], tokens_per_s_text(final["tokens_per_s"]), final["wall_s"],
    )
    if is_main:
        resume_io.write_completion_marker(run_dir, cfg, final)  # last: a sweep re-run skips this job
    return final


def _finish_background_save(trainer: Trainer) -> None:
    """A failed run still completes the background write of its last good checkpoint."""
    if trainer.pending_save is None:
        return
    try:
        trainer.finish_pending_save()
    except UserError as exc:
        log.error("%s", exc)


def _fit(trainer: Trainer, metrics: MetricsLogger, profiler: StepProfiler) -> Dict[str, Any]:
    tcfg = trainer.cfg.trainer
    progress = _progress_bar(tcfg, start=trainer.step)
    window_start, window_steps = time.perf_counter(), 0
    fit_start, first_step = window_start, trainer.step
    tokens_per_s = 0.0
    evals: Dict[str, float] = {}
    while trainer.step < tcfg.max_steps:
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.train_step()
        profiler.step()
        trainer.poll_pending_save()  # a background write that finished gets its name now
        window_steps += 1
        step = trainer.step
        if step % tcfg.log_interval == 0 or step == tcfg.max_steps:
            trainer.check_finite()  # NaN/inf since the last check: stop, naming the first bad step
            mean_loss = trainer.pop_mean_loss()  # the only host syncs of the window
            elapsed = time.perf_counter() - window_start
            tokens_per_s = trainer.tokens_per_step * window_steps / elapsed
            perf = trainer.throughput.metrics(tokens_per_s)  # tokens_per_s, mfu, peak_memory_gib
            if mean_loss is not None:  # None: every step of the window was skipped (trainer.skip_nonfinite)
                metrics.log(step, loss=mean_loss, lr=lr, **perf)
                # ETA from the whole run so far, so evaluation and checkpoint time are included
                eta_s = (time.perf_counter() - fit_start) / (step - first_step) * (tcfg.max_steps - step)
                _report_progress(progress, step, tcfg.max_steps, mean_loss, perf, eta_s)
            window_start, window_steps = time.perf_counter(), 0
        if (tcfg.eval_interval and step % tcfg.eval_interval == 0) or step == tcfg.max_steps:
            trainer.check_finite()
            evals = trainer.evaluate()
            metrics.log(step, **evals)
            log.info("step %d: train loss %.4f, val loss %.4f", step, evals["train_loss"], evals["val_loss"])
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.max_steps:
            trainer.save()
        # One process: a Python flag, read every step. Several: an all-reduce and a host sync, so only
        # where the loop syncs anyway (log steps); a pre-emption notice gives minutes, not milliseconds.
        check_stop = trainer.engine.world_size == 1 or step % tcfg.log_interval == 0
        stop = signals.stop_requested() if check_stop and step < tcfg.max_steps else None  # ranks agree
        if stop:
            raise signals.Stopped(stop, step, trainer.save(wait=True), trainer.run_dir)  # writes done, then exit
    if progress is not None:
        progress.close()
    if not evals:  # resumed at the end: still report the model's losses
        evals = trainer.evaluate()
    path = trainer.save(wait=True)
    log.info("saved %s", path)
    perf = trainer.throughput.metrics(tokens_per_s)
    if trainer.throughput.flops_per_token:
        perf["flops_per_token"] = trainer.throughput.flops_per_token
    return {"step": trainer.step, **evals, **perf, "checkpoint": str(path)}


def _shows_bar(tcfg) -> bool:
    return bool(tcfg.progress) and sys.stderr.isatty()


def _progress_bar(tcfg, start: int):
    if not _shows_bar(tcfg):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=tcfg.max_steps, initial=start, unit="step", dynamic_ncols=True)


def tokens_per_s_text(rate: float) -> str:
    """A throughput as people read it: whole tokens from 100 up (``1,234``), three digits below (``0.421``: a
    large model on a CPU), so that a slow run never reads as 0."""
    return f"{rate:,.0f}" if rate >= 100 or rate == 0 else f"{rate:.3g}"


def _report_progress(progress, step: int, max_steps: int, loss: float, perf: Dict[str, float], eta_s: float) -> None:
    shown = {"loss": f"{loss:.4f}", "tok_s": tokens_per_s_text(perf["tokens_per_s"])}
    if "mfu" in perf:
        shown["mfu"] = f"{perf['mfu']:.1%}"
    if "peak_memory_gib" in perf:
        shown["mem"] = f"{perf['peak_memory_gib']:.1f}GiB"
    if progress is not None:
        progress.n = step
        progress.set_postfix(**shown)
        return
    shown["eta"] = minutes_text(eta_s)  # tqdm shows its own ETA
    log.info("step %d/%d: %s", step, max_steps, ", ".join(f"{k} {v}" for k, v in shown.items()))
