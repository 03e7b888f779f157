"""DeepSpeed's config keys and names (DeepSpeed 0.19.8) and what each becomes in ds_hydra: the tables
``json_import`` maps a ``ds_config.json`` with. Torch-free."""
from __future__ import annotations

from typing import Any, Dict

AUTO = "auto"

# -- DeepSpeed's names ----------------------------------------------------------------------------
# optimizer.type (lower-cased) -> ds_hydra optimizer option. DeepSpeed's own names are
# case-insensitive; other names are torch.optim classes, which DeepSpeed looks up as written.
OPTIMIZER_TYPES = {
    "adam": "adam",  # AdamW unless params.adam_w_mode is false (DeepSpeed's default is true)
    "adamw": "adamw",
    "adagrad": "adagrad",
    "sgd": "sgd",
    "rmsprop": "rmsprop",
    "adamax": "adamax",
    "nadam": "nadam",
    "radam": "radam",
}
OPTIMIZER_SPELLING = {"adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad", "sgd": "SGD", "rmsprop": "RMSprop",
                      "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam"}
NO_TORCH_EQUIVALENT = ("Lamb", "OneBitAdam", "ZeroOneAdam", "OneBitLamb", "Lion", "Muon", "MuAdam", "MuAdamW", "MuSGD")

# What DeepSpeed builds when optimizer.params leaves a key out: FusedAdam's (and CPU Adam's) defaults
# for Adam/AdamW, torch's for the torch.optim types.
_ADAM_BETAS = [0.9, 0.999]
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    "adamw": {"lr": 1e-3, "betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    "adagrad": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
    "adamax": {"lr": 2e-3, "betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0},
    "nadam": {"lr": 2e-3, "betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0, "momentum_decay": 4e-3,
              "decoupled_weight_decay": False},
    "radam": {"lr": 1e-3, "betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0, "decoupled_weight_decay": False},
}
# Adam/AdamW params of DeepSpeed that are not torch arguments.
ADAM_ONLY_PARAMS = ("adam_w_mode", "torch_adam", "bias_correction", "set_grad_none", "fp32_optimizer_states")

# scheduler.type -> ds_hydra scheduler option, and DeepSpeed's defaults for the params left out
# (required arguments have none: ds_hydra's option fills them, from the run, and says so).
SCHEDULER_TYPES = {
    "WarmupLR": "warmup_lr",
    "WarmupDecayLR": "warmup_decay_lr",
    "WarmupCosineLR": "warmup_cosine_lr",
    "OneCycle": "one_cycle",
    "LRRangeTest": "lr_range_test",
}
SCHEDULER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupCosineLR": {"warmup_min_ratio": 0.0, "warmup_num_steps": 1000, "cos_min_ratio": 0.0001, "warmup_type": "log"},
    "OneCycle": {"decay_lr_rate": 0.0, "cycle_first_step_size": 2000, "cycle_second_step_size": None,
                 "cycle_first_stair_count": 0, "cycle_second_stair_count": None, "decay_step_size": 0,
                 "cycle_momentum": True, "cycle_min_mom": 0.8, "cycle_max_mom": 0.9, "decay_mom_rate": 0.0},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 2000, "lr_range_test_step_rate": 1.0,
                    "lr_range_test_staircase": False},
}
SCHEDULER_REQUIRED = {
    "WarmupDecayLR": {"total_num_steps": "trainer.max_steps"},
    "WarmupCosineLR": {"total_num_steps": "trainer.max_steps"},
    "OneCycle": {"cycle_min_lr": "1e-4", "cycle_max_lr": "optimizer.lr"},
}

ACTIVATION_CHECKPOINTING_KEYS = ("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                                 "number_checkpoints", "synchronize_checkpoint_boundary", "profile")
FP16_LOSS_SCALE_KEYS = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                        "consecutive_hysteresis", "min_loss_scale")
ZERO_ENGINE_KEYS = ("overlap_comm", "contiguous_gradients", "reduce_bucket_size")
NATIVE_ENGINE = {0: "auto", 1: "ddp", 2: "ddp", 3: "fsdp"}

# Top-level keys only DeepSpeed's engine reads: passed to it in engine.extra when it runs.
ENGINE_ONLY_KEYS = (
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "wall_clock_breakdown", "memory_breakdown",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "flops_profiler", "comms_logger", "checkpoint",
    "aio", "data_types", "dump_state", "timers", "disable_allgather", "disable_python_gc", "log_level",
    "managed_gradient_accumulation", "use_data_before_expert_parallelism", "gradient_accumulation_dtype",
)
# Top-level DeepSpeed keys with no meaning in ds_hydra, and why.
IGNORED_KEYS = {
    "tensorboard": "DeepSpeed's metric writer; ds_hydra writes metrics.jsonl itself, and TensorBoard events with logger=tensorboard",
    "wandb": "DeepSpeed's metric writer; ds_hydra writes metrics.jsonl itself",
    "csv_monitor": "DeepSpeed's metric writer; ds_hydra writes metrics.jsonl itself",
    "comet": "DeepSpeed's metric writer; ds_hydra writes metrics.jsonl itself",
    "pipeline": "pipeline parallelism; ds_hydra trains data-parallel (DDP, FSDP, ZeRO)",
    "tensor_parallel": "tensor parallelism; ds_hydra has none",
    "expert_parallel": "expert parallelism; ds_hydra has none",
    "hybrid_engine": "DeepSpeed-Chat's RLHF engine",
    "weight_quantization": "DeepSpeed's quantized training/inference of weights",
    "autotuning": "for DeepSpeed's launcher's autotuner, not for a run",
    "data_efficiency": "DeepSpeed's data sampling/routing; needs DeepSpeed's data loader in the training code",
    "dataloader_drop_last": "ds_hydra samples windows of its corpus: there is no last partial batch",
    "compile": "DeepSpeed's engine.compile(); set trainer.compile instead",
    "vocabulary_size": "the model's vocabulary comes from model.vocab_size (or the data)",
}
# Top-level keys DeepSpeed 0.19.8 removed (it refuses them); ignored here, with DeepSpeed's advice.
REMOVED_KEYS = {
    "amp": "Apex AMP, removed from DeepSpeed; set trainer.precision",
    "elasticity": "elastic batch sizes, removed from DeepSpeed; the batch triple fixes the batch",
    "curriculum_learning": "removed from DeepSpeed (now data_efficiency's)",
    "sparse_attention": "removed from DeepSpeed",
    "sparse_gradients": "removed from DeepSpeed",
    "compression_training": "removed from DeepSpeed",
    "quantize_training": "removed from DeepSpeed",
    "nebula": "removed from DeepSpeed",
    "eigenvalue": "removed from DeepSpeed",
    "graph_harvesting": "removed from DeepSpeed",
    "progressive_layer_drop": "removed from DeepSpeed",
}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
PRECISION_KEYS = ("fp16", "bf16", "bfloat16", "torch_autocast")
MAPPED_KEYS = BATCH_KEYS + PRECISION_KEYS + ("optimizer", "scheduler", "gradient_clipping", "zero_optimization",
                                             "activation_checkpointing", "steps_per_print")
KNOWN_KEYS = MAPPED_KEYS + ENGINE_ONLY_KEYS + tuple(IGNORED_KEYS) + tuple(REMOVED_KEYS)
