"""The top-level config schema and its registration in Hydra's ConfigStore (torch-free).

The YAML files in conf/ pick options and override values; the dataclasses registered here own the
types, so a misspelt key or a value of the wrong type fails at composition, naming the full key.
Group options extend their schema through their defaults list (``- /schema/<group>/<name>@_here_``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ds_hydra.activation_checkpointing.config import CkptConfig
from ds_hydra.data.config import SFTConfig, SyntheticConfig, TextConfig, TokensConfig
from ds_hydra.data.prepare_config import PrepareConfig
from ds_hydra.data.tokenizer_config import BPETokenizerConfig, BytesTokenizerConfig, CharTokenizerConfig, HFTokenizerConfig
from ds_hydra.engine.config import AutoEngineConfig, DDPEngineConfig, DeepSpeedEngineConfig, FSDPEngineConfig
from ds_hydra.harness.config import LMEvalConfig
from ds_hydra.inference.config import InferenceConfig
from ds_hydra.loss.config import ChunkedCrossEntropyConfig, CrossEntropyConfig
from ds_hydra.models.adapter_config import AdapterConfig
from ds_hydra.models.config import GPTConfig, HFCausalLMConfig
from ds_hydra.optim.config import (
    ConstantSchedulerConfig,
    CosineSchedulerConfig,
    LRRangeTestConfig,
    OneCycleConfig,
    OptimizerConfig,
    ParamGroupsConfig,
    WarmupCosineLRConfig,
    WarmupDecayLRConfig,
    WarmupLRConfig,
    WSDSchedulerConfig,
)
from ds_hydra.tracking.config import LoggerConfig
from ds_hydra.training.config import RunConfig, TrainerConfig


class Task(Enum):
    train = "train"
    infer = "infer"  # sample from a trained run (inference.checkpoint); inference.mode=eval evaluates instead
    eval = "eval"  # validation loss and perplexity of a trained run's checkpoint
    resume = "resume"  # continue the run named by resume=<run dir> (the same as train with resume set)
    validate = "validate"  # check the config, print param groups, LR curve and checkpoint plan; build nothing heavy
    export_deepspeed = "export_deepspeed"  # write the DeepSpeed JSON of engine=deepspeed without training
    prepare = "prepare"  # tokenize prepare.input into train.bin/val.bin in prepare.output (tokenizer group)
    import_deepspeed = "import_deepspeed"  # write deepspeed_config=<file> as an experiment preset; train nothing
    export_hf = "export_hf"  # a trained run (inference.checkpoint) as a transformers model directory
    lm_eval = "lm_eval"  # lm-evaluation-harness tasks (lm_eval.tasks) on inference.checkpoint or model.pretrained


@dataclass
class DSHydraConfig:
    """The whole run: one field per config group, plus what to do with it."""

    task: Task = Task.train
    """What to do with the composed config."""
    model: Any = MISSING
    """Any model node with a _target_ (conf/model: the built-in GPT, Hugging Face causal LMs, custom)."""
    data: Any = MISSING
    """Where batches come from (conf/data: the embedded Tiny Shakespeare, synthetic tokens, ...)."""
    tokenizer: Any = MISSING
    """char, bytes, bpe or hf (conf/tokenizer): how task=prepare, data=text and data=sft tokenize text."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """What task=prepare reads and writes."""
    optimizer: Any = MISSING
    """An optimizer class and its arguments (conf/optimizer), a callable over param groups."""
    scheduler: Any = MISSING
    """The lr schedule (conf/scheduler), a callable over the optimizer."""
    param_groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    """How parameters are split into optimizer param groups (weight decay, lr multipliers)."""
    loss: Any = MISSING
    """The training loss (conf/loss): cross_entropy, or chunked_cross_entropy that never holds the whole logits."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Parameter-efficient fine-tuning (conf/adapter: none, lora, dora): only the adapters train."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Activation checkpointing: which blocks recompute in backward (conf/ckpt)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The training loop: steps, batch, evaluation, device, precision, checkpoints."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Where metrics go besides metrics.jsonl (conf/logger: several at once)."""
    run: RunConfig = field(default_factory=RunConfig)
    """How a run owns its directory: the lock's staleness and take-over."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Generation and evaluation from a trained run (task=infer, task=eval)."""
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    """lm-evaluation-harness tasks: task=lm_eval runs them, lm_eval.after_training=true runs them when training ends."""
    engine: Any = MISSING
    """auto, ddp, fsdp or deepspeed (conf/engine)."""
    allowed_targets: List[str] = field(default_factory=list)
    """Extra module prefixes whose callables configs may instantiate via _target_."""
    name: Optional[str] = None
    """Optional label of the run (shown in logs and sweep reports)."""
    resume: Optional[str] = None
    """A run directory (or one of its checkpoints/step_*.pt) to continue: ``python -m ds_hydra resume=<run dir>``
    re-runs that run's saved overrides in its own directory from its newest checkpoint."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config (ds_config.json) whose settings apply as overrides, before the command line's own:
    ``python -m ds_hydra deepspeed_config=ds_config.json`` (ds_hydra.deepspeed.json_import says what maps)."""
    objective: Optional[str] = None
    """A metric name (e.g. val_loss): the task then returns that number alone, as optimizing sweepers need."""


# (group, name, schema): the option YAMLs name these in their defaults lists.
SCHEMAS = [
    ("model", "gpt", GPTConfig),
    ("model", "hf_causal_lm", HFCausalLMConfig),
    ("data", "synthetic", SyntheticConfig),
    ("data", "tokens", TokensConfig),
    ("data", "text", TextConfig),
    ("data", "sft", SFTConfig),
    ("tokenizer", "char", CharTokenizerConfig),
    ("tokenizer", "bytes", BytesTokenizerConfig),
    ("tokenizer", "bpe", BPETokenizerConfig),
    ("tokenizer", "hf", HFTokenizerConfig),
    ("prepare", "prepare", PrepareConfig),
    ("optimizer", "optimizer", OptimizerConfig),  # open: other keys bind to _target_'s signature
    ("scheduler", "constant", ConstantSchedulerConfig),
    ("scheduler", "cosine", CosineSchedulerConfig),
    ("scheduler", "wsd", WSDSchedulerConfig),
    ("scheduler", "warmup_lr", WarmupLRConfig),
    ("scheduler", "warmup_decay_lr", WarmupDecayLRConfig),
    ("scheduler", "warmup_cosine_lr", WarmupCosineLRConfig),
    ("scheduler", "one_cycle", OneCycleConfig),
    ("scheduler", "lr_range_test", LRRangeTestConfig),
    ("loss", "cross_entropy", CrossEntropyConfig),
    ("loss", "chunked_cross_entropy", ChunkedCrossEntropyConfig),
    ("adapter", "adapter", AdapterConfig),
    ("ckpt", "ckpt", CkptConfig),
    ("trainer", "trainer", TrainerConfig),
    ("logger", "logger", LoggerConfig),
    ("inference", "inference", InferenceConfig),
    ("engine", "auto", AutoEngineConfig),
    ("engine", "ddp", DDPEngineConfig),
    ("engine", "fsdp", FSDPEngineConfig),
    ("engine", "deepspeed", DeepSpeedEngineConfig),
]


def fraction_of(fraction: float, total: int, minimum: int = 0) -> int:
    """``${ds_hydra.fraction:0.05,${trainer.max_steps}}``: a step count that scales with the run
    (``${ds_hydra.fraction:0.05,${trainer.max_steps},1}``: and is at least 1)."""
    return max(int(minimum), int(round(float(fraction) * int(total))))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ds_hydra.fraction"):
        OmegaConf.register_new_resolver("ds_hydra.fraction", fraction_of)
    if not OmegaConf.has_resolver("ds_hydra.config_groups"):  # the --help page's list of groups
        from ds_hydra.help import config_groups, tasks

        OmegaConf.register_new_resolver("ds_hydra.config_groups", config_groups)
        OmegaConf.register_new_resolver("ds_hydra.tasks", tasks)


def register_configs() -> None:
    """Store the top-level schema and every group schema; cheap, imports no torch."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="ds_hydra_schema", node=DSHydraConfig)
    for group, name, schema in SCHEMAS:
        cs.store(group=f"schema/{group}", name=name, node=_open(schema) if schema in OPEN_SCHEMAS else schema)


# Schemas whose nodes take keys beyond their fields, as each says in its OPEN_KEYS (the optimizer: ds_hydra.validation
# binds those keys to its _target_'s signature). Every other schema is closed, to '+key' additions too.
OPEN_SCHEMAS = tuple(schema for _, _, schema in SCHEMAS if getattr(schema, "OPEN_KEYS", None))


def _open(schema):
    """The schema as a node that types its fields and accepts other keys (``optimizer.momentum=0.9``)."""
    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, False)
    return node
