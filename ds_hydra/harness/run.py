"""``task=lm_eval`` and ``lm_eval.after_training``: harness tasks on a run's model, reported like a run's metrics.

The model comes from ``inference.checkpoint=<run dir>`` (``ds_hydra.inference.loading.load_run``, the
one loader every inference task uses: built-in, custom and Hugging Face models alike, with the run's
own tokenizer) or from ``model.pretrained=<transformers dir>`` (built by ``build_model`` as training
builds it, with that directory's tokenizer or ``tokenizer=hf tokenizer.path=...``). The harness runs
its tasks through ``DSHydraLM``; the results go to ``<run dir>/lm_eval.json``, a table in the log,
the metrics (``<task>/<metric>``, e.g. ``arc_easy/acc``) to the trackers, and back to the caller.

While tasks load, the Hugging Face Hub and ``datasets`` are offline unless ``lm_eval.allow_download``:
a task whose data is not on this machine stops with one line naming its dataset.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from ds_hydra.errors import UserError

log = logging.getLogger(__name__)

REPORT_FILE = "lm_eval.json"
EXTRA = "pip install 'ds-hydra[eval]'"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def import_harness():
    """``lm_eval``, or one line naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401  (the interface DSHydraLM implements)
    except ImportError:
        raise UserError(f"task=lm_eval: the lm-evaluation-harness is not installed: {EXTRA}") from None
    return lm_eval


@dataclass
class HarnessModel:
    """A loaded model with what the harness needs to tokenize for it."""

    model: Any  # nn.Module in eval mode on ``device``
    encode: Callable[[str], List[int]]
    decode: Callable[[Sequence[int]], str]
    eot_token_id: Optional[int]
    prefix_token_id: int
    device: Any
    max_length: int
    source: str  # what was evaluated: a checkpoint file or a model directory
    step: Optional[int] = None


# -- loading -----------------------------------------------------------------------------------------


def load_for_harness(cfg, checkpoint: Optional[str] = None) -> HarnessModel:
    """The model of ``checkpoint`` or ``inference.checkpoint`` (a run), else of ``model.pretrained`` (a
    transformers directory)."""
    icfg = cfg.inference
    allowed = list(cfg.get("allowed_targets") or [])
    checkpoint = checkpoint or icfg.checkpoint
    if checkpoint:
        from ds_hydra.inference.loading import load_run

        # an adapter run is evaluated merged (what export_hf writes): KV-cached decoding reads plain weights
        run = load_run(checkpoint, icfg.device, icfg.dtype.value, allowed, merge_adapter=True)
        tokenizer = getattr(run.data, "tokenizer", None)
        eos = getattr(tokenizer, "eos_id", None)
        return _harness_model(
            run.model, run.data.encode, run.data.decode, eos, None, run.device, cfg.lm_eval.max_length,
            fallback_length=run.seq_len, source=str(run.checkpoint), step=run.step,
        )
    pretrained = cfg.model.get("pretrained") if hasattr(cfg.model, "get") else None
    if not pretrained:
        raise UserError(
            "task=lm_eval: nothing to evaluate; give a trained run (inference.checkpoint=<run dir>) or a transformers "
            "model directory (model=hf_causal_lm model.pretrained=<dir>)"
        )
    return _load_pretrained(cfg, str(pretrained))


def _load_pretrained(cfg, pretrained: str) -> HarnessModel:
    from ds_hydra.data.tokenizer import load_hf_tokenizer
    from ds_hydra.devices import resolve_device
    from ds_hydra.inference.loading import resolve_dtype
    from ds_hydra.models.build import build_model

    icfg = cfg.inference
    device = resolve_device(icfg.device, key="inference.device")
    dtype = resolve_dtype(icfg.dtype.value, device)
    tcfg = cfg.get("tokenizer") or {}
    path = (tcfg.get("path") if tcfg.get("kind") == "hf" else None) or pretrained  # tokenizer=hf tokenizer.path=...
    tokenizer = load_hf_tokenizer(path, tcfg.get("eos_token") if tcfg.get("kind") == "hf" else None)
    model = build_model(cfg.model, tokenizer.vocab_size)
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    bos = _configured_token(Path(path).expanduser(), "bos_token", tokenizer)
    return _harness_model(
        model, tokenizer.encode, tokenizer.decode, tokenizer.eos_id, bos, device, cfg.lm_eval.max_length,
        fallback_length=None, source=pretrained,
    )


def _harness_model(model, encode, decode, eos, bos, device, max_length, fallback_length, source, step=None) -> HarnessModel:
    from ds_hydra.models.contract import max_positions

    length = max_length or max_positions(model) or fallback_length
    if not length:
        raise UserError(f"{source}: the model does not say its maximum positions; set lm_eval.max_length=<tokens>")
    # The prefix of every perplexity window and of an empty context: beginning-of-text when the tokenizer
    # names one, else end-of-text (the harness's hf model does the same); a tokenizer with neither (a
    # character vocabulary) starts documents after a newline, the separator its corpus has.
    prefix = bos if bos is not None else eos
    if prefix is None:
        newline = encode("\n")
        if not newline:
            raise UserError(f"{source}: the tokenizer has no end-of-text token and cannot encode a newline to start documents with")
        prefix = newline[0]
    return HarnessModel(model, encode, decode, eos, int(prefix), device, int(length), source, step)


def _configured_token(folder: Path, key: str, tokenizer) -> Optional[int]:
    """The id of ``key`` (bos_token) in the folder's tokenizer_config.json, when the vocabulary has it."""
    config = (folder if folder.is_dir() else folder.parent) / "tokenizer_config.json"
    try:
        token = json.loads(config.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return tokenizer.tokenizer.get_vocab(with_added_tokens=True).get(token) if hasattr(tokenizer, "tokenizer") else None


# -- tasks -------------------------------------------------------------------------------------------


def task_manager(names: Sequence[str], include_path: Optional[str]):
    """The harness's task index: only ``include_path`` when every name is found there (indexing the
    thousands of built-in YAMLs takes tens of seconds), else the built-ins too. Unknown names are one
    line with the closest known names."""
    from lm_eval.tasks import TaskManager

    if include_path:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise UserError(f"lm_eval.include_path={include_path}: no such directory (a folder of the harness's task YAMLs)")
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if not _unknown(local, names):
            return local
    manager = TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)
    unknown = _unknown(manager, names)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"'{name}'" + (f" (close: {', '.join(close)})" if close else ""))
        where = f" or in lm_eval.include_path={include_path}" if include_path else ""
        raise UserError(f"lm_eval.tasks: unknown task {'; '.join(hints)}: not a harness task{where} (lm_eval --tasks list shows them)")
    return manager


def _unknown(manager, names: Sequence[str]) -> List[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not manager.match_tasks([n])]


@contextlib.contextmanager
def offline(enabled: bool) -> Iterator[None]:
    """The Hugging Face Hub and datasets offline (their variables and their modules' flags), then as before."""
    if not enabled:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    flags = []
    # imported now, before the variables change: they read them once, at import
    for module, attribute in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        try:
            owner = __import__(module, fromlist=[attribute])
        except ImportError:
            continue
        if hasattr(owner, attribute):
            flags.append((owner, attribute, getattr(owner, attribute)))
    try:
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
        for owner, attribute, _ in flags:
            setattr(owner, attribute, True)
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for owner, attribute, value in flags:
            setattr(owner, attribute, value)


def _dataset_of(manager, name: str) -> str:
    """The dataset a task (or the first of a group's tasks) reads, as its YAML names it."""
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    path = cfg.get("dataset_path")
    if path is None:  # a group or tag: its first task that names a dataset
        for member in manager.match_tasks([name]) or []:
            if member != name:
                return _dataset_of(manager, member)
        return "its dataset"
    return f"{path}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")


def _download_error(manager, names: Sequence[str], exc: BaseException) -> UserError:
    """Which task could not load its data offline, in one line."""
    from lm_eval.tasks import get_task_dict

    failing = names[0]
    if len(names) > 1:
        for name in names:
            try:
                get_task_dict([name], manager)
            except Exception:
                failing = name
                break
    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"lm_eval.tasks: task '{failing}' needs the dataset {_dataset_of(manager, failing)}, which is not on this machine, "
        f"and downloads are off ({reason}); set lm_eval.allow_download=true to let the harness download it, or point a "
        f"task YAML in lm_eval.include_path at local files (dataset_path: json, dataset_kwargs.data_files)"
    )


def run_harness(lcfg, loaded: HarnessModel) -> Dict[str, Any]:
    """Run ``lcfg.tasks`` on ``loaded``; returns the harness's results dict plus ``metrics`` (flat) and timing."""
    import_harness()
    from lm_eval.evaluator import simple_evaluate

    from ds_hydra.harness.model import DSHydraLM

    names = list(lcfg.tasks)
    with offline(not lcfg.allow_download):
        manager = task_manager(names, lcfg.include_path)
        lm = DSHydraLM(
            loaded.model, loaded.encode, loaded.decode, device=loaded.device, batch_size=lcfg.batch_size,
            max_length=loaded.max_length, prefix_token_id=loaded.prefix_token_id, eot_token_id=loaded.eot_token_id,
            max_gen_toks=lcfg.max_gen_toks, seed=lcfg.seed,
        )
        limit = None if lcfg.limit is None else (int(lcfg.limit) if lcfg.limit >= 1 else float(lcfg.limit))
        started = time.perf_counter()
        try:
            results = simple_evaluate(
                model=lm, tasks=names, num_fewshot=lcfg.num_fewshot, limit=limit, task_manager=manager,
                random_seed=lcfg.seed, numpy_random_seed=lcfg.seed, torch_random_seed=lcfg.seed,
                fewshot_random_seed=lcfg.seed, log_samples=False, bootstrap_iters=lcfg.bootstrap_iters,
            )
        except UserError:
            raise
        except Exception as exc:
            if not lcfg.allow_download and _looks_offline(exc):
                raise _download_error(manager, names, exc) from None
            raise
        seconds = time.perf_counter() - started
    if results is None:  # another rank's share (the harness returns results on rank 0 only)
        return {}
    items = sum(int(n.get("effective", n.get("original", 0))) for n in (results.get("n-samples") or {}).values())
    results["metrics"] = flatten(results.get("results", {}))
    results["eval_s"] = seconds
    results["items_per_s"] = items / seconds if seconds > 0 else None
    return results


def _looks_offline(exc: BaseException) -> bool:
    """Errors ``datasets`` and ``huggingface_hub`` raise for data that is not here while offline."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__} {exc}".lower()
        if any(word in text for word in ("offline", "connection", "couldn't reach", "not found on the hub",
                                         "doesn't exist on the hub", "datasetnotfound", "localentrynotfound")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def flatten(task_results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """``{"arc_easy": {"acc,none": 0.5, ...}}`` -> ``{"arc_easy/acc": 0.5, ...}`` (a filter other than
    ``none`` stays in the name: ``gsm8k/exact_match,strict-match``); numbers only."""
    flat: Dict[str, float] = {}
    for task, values in task_results.items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else key
            flat[f"{task}/{name}"] = float(value)
    return flat


def write_report(results: Dict[str, Any], loaded: HarnessModel, lcfg, out_dir: Path) -> Path:
    """``<out_dir>/lm_eval.json``: what was evaluated, with what settings, and the harness's results."""
    from omegaconf import OmegaConf

    from ds_hydra.common.files import atomic_write_text

    report = {
        "model": loaded.source,
        "step": loaded.step,
        "settings": OmegaConf.to_container(lcfg, resolve=True) if OmegaConf.is_config(lcfg) else dict(lcfg),
        "max_length": loaded.max_length,
        "metrics": results.get("metrics", {}),
        "eval_s": results.get("eval_s"),
        "items_per_s": results.get("items_per_s"),
        **{key: results[key] for key in ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions",
                                          "higher_is_better") if key in results},
    }
    path = out_dir / REPORT_FILE
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    return path


def log_table(results: Dict[str, Any]) -> None:
    from lm_eval.utils import make_table

    log.info("lm-evaluation-harness results:\n%s", make_table(results).rstrip())
    if results.get("groups"):
        log.info("groups:\n%s", make_table(results, "groups").rstrip())


def lm_eval_task(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=lm_eval``: harness tasks on ``inference.checkpoint`` or ``model.pretrained``; returns the metrics."""
    from ds_hydra.training.slices import tracked_run
    from ds_hydra.training.metrics import MetricsLogger
    from ds_hydra.common.run_dir import resolve_run_dir

    import_harness()  # one line naming the extra, before anything is loaded
    loaded = load_for_harness(cfg)
    if cfg.inference.checkpoint:
        from ds_hydra.inference.loading import find_run, output_dir

        out_dir = output_dir(run_dir, find_run(cfg.inference.checkpoint)[0])
    else:
        out_dir = resolve_run_dir(run_dir)
    log.info("lm_eval: %s on %s (max length %d, batch size %d)", ", ".join(cfg.lm_eval.tasks), loaded.source,
             loaded.max_length, cfg.lm_eval.batch_size)
    results = run_harness(cfg.lm_eval, loaded)
    path = write_report(results, loaded, cfg.lm_eval, out_dir)
    log_table(results)
    log.info("%d items in %.1f s (%.1f items/s); results written to %s", round(results["items_per_s"] * results["eval_s"]),
             results["eval_s"], results["items_per_s"], path)
    metrics = {**results["metrics"], "lm_eval_items_per_s": results["items_per_s"]}
    tracker = MetricsLogger(out_dir, tracked_run(cfg))  # metrics.jsonl and the trackers chosen in `logger`
    try:
        tracker.log(loaded.step or 0, **metrics)
    finally:
        tracker.close(final=metrics)
    return {**metrics, "model": loaded.source, "report": str(path)}


def evaluate_after_training(cfg, run_dir: Path, step: int, log_metrics: Callable[..., None]) -> Dict[str, Any]:
    """``lm_eval.after_training=true``: the listed tasks on the run's final checkpoint (loaded back from its
    run dir, as task=lm_eval would); the metrics are logged at the final step and returned."""
    if not cfg.lm_eval.after_training:
        return {}
    import_harness()
    loaded = load_for_harness(cfg, checkpoint=str(run_dir))  # device and dtype: the inference section
    log.info("lm_eval after training: %s on %s", ", ".join(cfg.lm_eval.tasks), loaded.source)
    results = run_harness(cfg.lm_eval, loaded)
    if not results:
        return {}
    path = write_report(results, loaded, cfg.lm_eval, run_dir)
    log_table(results)
    log.info("lm_eval: %.1f items/s; results written to %s", results["items_per_s"], path)
    metrics = dict(results["metrics"])
    log_metrics(step, **metrics)
    return metrics


__all__ = ["lm_eval_task", "evaluate_after_training", "run_harness", "load_for_harness", "flatten", "REPORT_FILE"]
