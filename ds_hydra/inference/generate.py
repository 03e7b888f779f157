"""Autoregressive sampling, with and without a KV cache, and the ``task=infer`` entry point.

Without a cache every new token runs the whole context (the last ``block_size`` tokens) through the
model, as nanoGPT's ``generate`` does. With a ``KVCache`` the keys and values of earlier positions
are kept, so a new token costs one position.

Past ``block_size``: the model's learned position table has ``block_size`` rows, so a context can
never be longer, and sliding it by one token renumbers every position, which would invalidate every
cached key and value. When the cache is full we therefore *re-prefill*: empty it and run the last
``window_keep`` tokens (default ``block_size // 2``) through the model in one pass, at positions
``0..window_keep-1``; the next ``block_size - window_keep`` tokens are cheap one-position steps
again. Each token thus sees between ``window_keep`` and ``block_size`` tokens of context, where the
uncached loop always sees the full last ``block_size``. The two agree token for token while the
sequence fits in ``block_size``, and may differ after it; ``window_keep = block_size`` makes
them agree everywhere (every token past the window is then a full re-prefill: the uncached cost).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ds_hydra.errors import UserError
from ds_hydra.models.contract import logits_of, max_positions, model_vocab_size

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.txt"
REPORT_FILE = "inference.json"


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): greedy for temperature 0, else top-k / top-p sampling. -> (B, 1)"""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return sample_categorical(logits.softmax(dim=-1), generator)


def sample_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), drawn with probability ``probs`` by inverting the CDF. -> (B, 1)

    The same distribution as ``torch.multinomial(probs, 1)`` in five cheap ops: multinomial's input
    checks and exponential draws cost as much as a whole KV-cached decode step of a small model.
    A token of probability 0 spans an empty interval of the CDF, so it is never drawn.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first i with cdf[i] > u * total
    return index.clamp_(max=probs.size(-1) - 1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    kv_cache: bool = True,
    window_keep: Optional[int] = None,
    context: Optional[int] = None,
    forward=None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, P) by ``max_new_tokens`` tokens; returns (B, P + max_new_tokens).

    ``kv_cache`` picks the cached loop, for models that make one (``model.make_kv_cache``, the
    built-in GPT); other models run the uncached loop. ``context``: the longest context a forward
    sees (default: the model's maximum positions). ``window_keep`` is the number of latest tokens the
    cache is re-filled from when it is full (see the module docstring). ``forward`` replaces
    ``model`` for the forward passes (a compiled version of it).
    """
    if prompt.dim() != 2 or prompt.size(1) < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got shape {tuple(prompt.shape)}")
    forward = forward or model
    block_size = context or max_positions(model)
    if block_size is None:
        raise ValueError(f"{type(model).__name__} does not say its maximum positions; pass context=<tokens>")
    B, P = prompt.shape
    out = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=prompt.device)
    out[:, :P] = prompt

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)

    if not (kv_cache and callable(getattr(model, "make_kv_cache", None))):
        last_only = {"logits_to_keep": 1} if _takes_argument(model, "logits_to_keep") else {}
        for n in range(P, P + max_new_tokens):
            logits = logits_of(forward(out[:, max(0, n - block_size) : n], **last_only))  # the whole (cropped) context
            out[:, n : n + 1] = pick(logits)
        return out

    keep = block_size // 2 if window_keep is None else window_keep
    if not 1 <= keep <= block_size:
        raise ValueError(f"window_keep={keep}: must be in 1..{block_size} (block_size={block_size})")
    cache = model.make_kv_cache(B)
    logits = forward(out[:, max(0, P - block_size) : P], kv_cache=cache)  # prefill
    for n in range(P, P + max_new_tokens):
        token = pick(logits)
        out[:, n : n + 1] = token
        if n + 1 == P + max_new_tokens:
            break
        if cache.full:  # re-prefill from the latest window, renumbered from position 0
            cache.reset()
            logits = forward(out[:, n + 1 - keep : n + 1], kv_cache=cache)
        else:  # one new position
            logits = forward(token, kv_cache=cache)
    return out


def _takes_argument(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def hf_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    kv_cache: bool = True,
    eos_token_id: Optional[int] = None,
    seed: int = 0,
) -> torch.Tensor:
    """A Hugging Face model's own ``generate`` (with its KV cache), seeded; stops only at ``eos_token_id``
    (None: always ``max_new_tokens``), so outputs are (B, P + new) with new <= max_new_tokens."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_k=(top_k or 0) if sampling else None,
        top_p=top_p if sampling else None,
        use_cache=kv_cache,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    torch.manual_seed(seed)
    return model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt))


def timed_generate(model, prompt, max_new_tokens, device: torch.device, seed: int, hf: bool = False, **kwargs):
    """``generate`` (``hf_generate`` for Hugging Face models) seeded with ``seed``; returns (tokens, seconds)."""
    _sync(device)
    started = time.perf_counter()
    if hf:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("forward", "context")}
        tokens = hf_generate(model, prompt, max_new_tokens, seed=seed, **kwargs)
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        tokens = generate(model, prompt, max_new_tokens, generator=generator, **kwargs)
    _sync(device)
    return tokens, time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_prompt(data, text: str, vocab_size: int) -> List[int]:
    """The prompt as token ids; problems name ``inference.prompt``."""
    try:
        ids = data.encode(text)
    except UserError as exc:
        raise UserError(f"inference.prompt={text!r}: {exc}") from None
    except ValueError:
        raise UserError(
            f"inference.prompt={text!r}: this data takes space-separated token ids (e.g. inference.prompt='0 1 2')"
        ) from None
    if not ids:
        raise UserError(f"inference.prompt={text!r}: encodes to no tokens; give at least one (for token ids: '0 1 2')")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"inference.prompt={text!r}: token {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")
    return ids


def compile_for_cuda_graphs(model: nn.Module, device: torch.device):
    """``enable_cuda_graph``: the model's forward under torch.compile(mode="reduce-overhead")."""
    if device.type != "cuda":
        raise UserError(f"inference.enable_cuda_graph=true: CUDA graphs need a CUDA device, this run is on {device.type}")
    log.info("enable_cuda_graph: torch.compile(mode='reduce-overhead'); CUDA graphs are recorded on first use")
    return torch.compile(model, mode="reduce-overhead", dynamic=True)


def uses_hf_generate(model: nn.Module, total_tokens: int) -> bool:
    """Hugging Face models decode through their own ``generate`` (and its KV cache) while the sequence
    fits their positions; past that, the windowed loop here crops the context instead."""
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
        return False
    limit = max_positions(model)
    if limit is not None and total_tokens > limit:
        log.info("%d tokens exceed the model's %d positions: generating with a sliding context window", total_tokens, limit)
        return False
    return True


def infer(cfg, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """``task=infer``: load ``inference.checkpoint``, sample, print and save the samples; returns metrics."""
    from ds_hydra.inference.config import new_tokens
    from ds_hydra.inference.loading import load_run, output_dir

    icfg = cfg.inference
    run = load_run(icfg.checkpoint, icfg.device, icfg.dtype.value, list(cfg.get("allowed_targets") or []), merge_adapter=True)
    out_dir = output_dir(run_dir, run.run_dir)
    if icfg.replace_with_kernel_inject:
        log.info("replace_with_kernel_inject: nothing to inject; attention already runs through fused SDPA kernels")
    forward = compile_for_cuda_graphs(run.model, run.device) if icfg.enable_cuda_graph else None
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    vocab = model_vocab_size(run.model) or run.data.vocab_size
    ids = encode_prompt(run.data, icfg.prompt, vocab)
    prompt = torch.tensor([ids] * icfg.num_samples, dtype=torch.long, device=run.device)  # (B, P)
    n_new = new_tokens(icfg)
    hf = uses_hf_generate(run.model, len(ids) + n_new)
    sampling = dict(temperature=icfg.temperature, top_k=icfg.top_k, top_p=icfg.top_p, forward=forward, context=run.seq_len)
    log.info(
        "loaded %s (step %d) on %s in %s; %d sample(s) of %d new tokens, temperature %g, top_k %s, top_p %g, seed %d",
        run.checkpoint, run.step, run.device, str(run.dtype).replace("torch.", ""), icfg.num_samples, n_new,
        icfg.temperature, icfg.top_k, icfg.top_p, icfg.seed,
    )

    tokens, seconds = timed_generate(run.model, prompt, n_new, run.device, icfg.seed, hf=hf, kv_cache=icfg.kv_cache, **sampling)
    produced = icfg.num_samples * (tokens.size(1) - len(ids))
    metrics: Dict[str, Any] = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "kv_cache": icfg.kv_cache,
        "new_tokens": n_new,
        "num_samples": icfg.num_samples,
        "tokens_per_s": produced / seconds,
    }
    log.info("tokens/s: %.0f (kv_cache=%s; python bench/inference.py compares it with and without)",
             metrics["tokens_per_s"], icfg.kv_cache)

    texts = [run.data.decode(row.tolist()) for row in tokens.cpu()]
    samples_path = out_dir / SAMPLES_FILE
    samples_path.write_text("".join(f"{text}\n{'-' * 16}\n" for text in texts), encoding="utf-8")
    metrics["samples"] = texts
    metrics["samples_file"] = str(samples_path)
    (out_dir / REPORT_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    for text in texts:
        print(text, "-" * 16, sep="\n", flush=True)
    log.info("samples written to %s", samples_path)
    return metrics
