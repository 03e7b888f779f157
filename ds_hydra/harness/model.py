"""The harness's model interface (``lm_eval.api.model.LM``) over a ds_hydra model and its tokenizer.

``DSHydraLM`` answers the harness's three request types with the model ds_hydra loaded (built-in
GPT, custom, Hugging Face) and the tokenizer the run trained with:

* ``loglikelihood``: each (context, continuation) pair is encoded whole and split where the context
  ends (the harness's ``TemplateLM``), requests are sorted longest first and run ``batch_size`` at a
  time, right-padded, and the continuation's log-probabilities summed; a continuation of one token
  shares its context's forward with its siblings (multiple-choice answers). This is the arrangement of
  the harness's own ``hf`` model, so the same model gives the same numbers through either.
* ``loglikelihood_rolling``: a document in disjoint windows of ``max_length`` tokens (each window
  conditioned on the tokens before it, the first on the prefix token), windows batched.
* ``generate_until``: prompts batched, greedy or sampled per the task's ``gen_kwargs``, with a KV
  cache (``model.make_kv_cache`` for the built-in GPT, ``generate``'s own for Hugging Face models),
  stopping once every row has produced one of the stop strings or the end-of-text token.

Importing this module imports ``lm_eval`` (the ``[eval]`` extra); ``ds_hydra.harness.run`` does so
only when tasks run.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ds_hydra.inference.generate import sample_next
from ds_hydra.models.contract import logits_of

log = logging.getLogger(__name__)

# (strings, context ids, continuation ids): one loglikelihood request once encoded
EncodedRequest = Tuple[Any, List[int], List[int]]


class DSHydraLM(TemplateLM):
    """A ds_hydra model as a harness model.

    ``encode(text) -> list of ids`` and ``decode(ids) -> text`` are the tokenizer the model was trained
    with (ds_hydra's, without special tokens, as the harness's ``hf`` model encodes);
    ``prefix_token_id`` starts each perplexity window (end-of-text, or the beginning-of-text token the
    tokenizer names); ``eot_token_id`` (None when the tokenizer has none) also ends generation.
    """

    def __init__(
        self,
        model: nn.Module,
        encode: Callable[[str], List[int]],
        decode: Callable[[Sequence[int]], str],
        *,
        device: torch.device,
        batch_size: int,
        max_length: int,
        prefix_token_id: int,
        eot_token_id: Optional[int],
        max_gen_toks: int = 256,
        seed: int = 1234,
    ):
        super().__init__()
        self.model = model
        self._encode = encode
        self._decode = decode
        self._device = device
        self._batch_size = int(batch_size)
        self._max_length = int(max_length)
        self._prefix_token_id = int(prefix_token_id)
        self._eot_token_id = eot_token_id
        self._max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # sampled generation only
        self.tokenizer = None  # no chat template: prompts are plain text

    # -- what the harness reads ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> Optional[int]:
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self._encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._decode([int(t) for t in tokens])

    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) log-probabilities in fp32."""
        return F.log_softmax(logits_of(self.model(input_ids)).float(), dim=-1)

    # -- loglikelihood ---------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: List[EncodedRequest], disable_tqdm: bool = False, override_bs: Optional[int] = None
    ) -> List[Tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether it is the greedy continuation, per request."""
        # Longest first (the first batch is the largest: memory trouble shows at once); requests whose
        # context + continuation[:-1] agree share one forward (one-token multiple-choice answers).
        ordered = Collator(
            requests,
            sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
            group_by="contexts",
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        results: List[Tuple[float, bool]] = []
        for chunk in ordered.get_batched(n=override_bs or self.batch_size):
            inputs, lengths = [], []
            for _, context, continuation in chunk:
                # the last max_length + 1 tokens; the last one is only ever a label
                ids = (context + continuation)[-(self.max_length + 1) :][:-1]
                inputs.append(torch.tensor(ids, dtype=torch.long, device=self.device))
                lengths.append(len(ids))
            batch = torch.zeros(len(inputs), max(lengths), dtype=torch.long, device=self.device)  # (B, T), right-padded
            for row, ids in zip(batch, inputs):
                row[: len(ids)] = ids
            logprobs = self._logits(batch)  # (B, T, V)
            for (strings, context, continuation), row, length in zip(chunk, logprobs, lengths):
                n = len(continuation)
                cont_logprobs = row[length - n : length].unsqueeze(0)  # (1, n, V): the positions that predict it
                for request_strings, cont_ids, cont_logprobs in ordered.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=cont_logprobs
                ):
                    target = torch.tensor(cont_ids, dtype=torch.long, device=self.device).unsqueeze(0)  # (1, n)
                    cont_logprobs = cont_logprobs[:, -target.size(1) :]  # a sibling's continuation may be shorter
                    greedy = bool((cont_logprobs.argmax(dim=-1) == target).all())
                    total = float(torch.gather(cont_logprobs, 2, target.unsqueeze(-1)).sum())
                    results.append((total, greedy))
                    if request_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", request_strings, (total, greedy))
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each document's total log-likelihood, over disjoint windows of ``max_length`` tokens."""
        windows: List[Tuple[int, EncodedRequest]] = []
        for index, (text,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )
            windows += [(index, (None, *make_disjoint_window(w))) for w in token_windows]
        totals = [0.0] * len(requests)
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start : start + self.batch_size]
            scored = self._loglikelihood_tokens([w for _, w in batch], override_bs=len(batch))
            for (index, _), (logprob, _) in zip(batch, scored):
                totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Continue each prompt until a stop string of its task, end-of-text, or ``max_gen_toks`` tokens."""
        ordered = Collator(
            [req.args for req in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        results: List[str] = []
        for chunk in ordered.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs: Dict[str, Any] = copy.deepcopy(all_kwargs[0])
            eos = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            # as the harness's hf model reads them: do_sample when given, else sampling iff temperature > 0;
            # sampling without a temperature samples at 1.0 (transformers' default)
            temperature = kwargs.pop("temperature", None)
            do_sample = kwargs.pop("do_sample", None)
            sampling = bool(do_sample) if do_sample is not None else float(temperature or 0.0) > 0
            temperature = (1.0 if temperature is None else float(temperature)) if sampling else 0.0
            top_k = kwargs.pop("top_k", None)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            keep = max(1, self.max_length - max_new)  # the prompt leaves room for the new tokens
            prompts = [self.tok_encode(context)[-keep:] or [self.prefix_token_id] for context in contexts]
            new_ids = self._generate(prompts, max_new, until, temperature, top_k, top_p)
            for context, ids in zip(contexts, new_ids):
                text = self.tok_decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return ordered.get_original(results)

    @torch.inference_mode()
    def _generate(self, prompts: List[List[int]], max_new: int, until: List[str], temperature: float,
                  top_k: Optional[int], top_p: float) -> List[List[int]]:
        """The new ids of each prompt. Prompts of one length decode together (no padding to mask);
        Hugging Face models decode through their own ``generate``, left-padded, with its KV cache."""
        if callable(getattr(self.model, "generate", None)) and getattr(self.model, "config", None) is not None:
            return self._hf_generate(prompts, max_new, until, temperature, top_k, top_p)
        out: List[Optional[List[int]]] = [None] * len(prompts)
        by_length: Dict[int, List[int]] = {}
        for n, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(n)
        for rows in by_length.values():
            batch = torch.tensor([prompts[n] for n in rows], dtype=torch.long, device=self.device)  # (B, P)
            for n, ids in zip(rows, self._decode_loop(batch, max_new, until, temperature, top_k, top_p)):
                out[n] = ids
        return out  # type: ignore[return-value]

    def _decode_loop(self, prompt: torch.Tensor, max_new: int, until: List[str], temperature: float,
                     top_k: Optional[int], top_p: float) -> List[List[int]]:
        """One token per step for every row of ``prompt`` (B, P), with the model's KV cache when it makes one."""
        B = prompt.size(0)
        new = torch.empty(B, 0, dtype=torch.long, device=self.device)  # (B, n)
        done = [False] * B
        cache = self.model.make_kv_cache(B) if callable(getattr(self.model, "make_kv_cache", None)) else None
        context = prompt
        logits = logits_of(self.model(context, kv_cache=cache) if cache is not None else self.model(context))
        for _ in range(max_new):
            token = sample_next(logits[:, -1, :], temperature, top_k, top_p, self.generator)  # (B, 1)
            new = torch.cat([new, token], dim=1)
            self._mark_done(new, done, until)
            if all(done) or new.size(1) == max_new:
                break
            context = torch.cat([context, token], dim=1)[:, -self.max_length :]
            if cache is None:  # the whole (cropped) context again
                logits = logits_of(self.model(context))
            elif cache.full:  # re-fill the cache from the latest half window (positions renumbered from 0)
                cache.reset()
                logits = logits_of(self.model(context[:, -max(1, self.max_length // 2) :], kv_cache=cache))
            else:  # one new position
                logits = logits_of(self.model(token, kv_cache=cache))
        return [row.tolist() for row in new]

    def _mark_done(self, new: torch.Tensor, done: List[bool], until: List[str]) -> None:
        """A row is done once its new tokens hold the end-of-text token or decode to a stop string."""
        last = new[:, -1].tolist()
        for b in range(len(done)):
            if done[b]:
                continue
            if self.eot_token_id is not None and last[b] == self.eot_token_id:
                done[b] = True
            elif until:
                text = self.tok_decode(new[b].tolist())
                done[b] = any(stop and stop in text for stop in until)

    def _hf_generate(self, prompts: List[List[int]], max_new: int, until: List[str], temperature: float,
                     top_k: Optional[int], top_p: float) -> List[List[int]]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        lm = self

        # a stop string shows in the last few new tokens: decode only those (as the harness's hf model does)
        lookback = max(len(self.tok_encode(stop)) for stop in until) + 2 if until else 0

        class StopStrings(StoppingCriteria):
            """Per row: done once the new tokens decode to one of the stop strings (and done stays done)."""

            def __init__(self, prompt_len: int, rows: int):
                self.prompt_len = prompt_len
                self.done = torch.zeros(rows, dtype=torch.bool)

            def __call__(self, input_ids, scores, **kwargs):
                start = max(self.prompt_len, input_ids.size(1) - lookback)
                for b, row in enumerate(input_ids[:, start:].tolist()):
                    if not self.done[b]:
                        text = lm.tok_decode(row)
                        self.done[b] = any(stop and stop in text for stop in until)
                return self.done.to(input_ids.device)

        pad = self.eot_token_id if self.eot_token_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=self.device)
        sampling = temperature > 0
        if sampling:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator, device=self.device)))
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sampling,
            temperature=temperature if sampling else None, top_k=(top_k or 0) if sampling else None,
            top_p=top_p if sampling else None, use_cache=True, eos_token_id=self.eot_token_id, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([StopStrings(width, len(prompts))]) if until else None,
        )
        rows = []
        for row in out[:, width:].tolist():
            if self.eot_token_id is not None and self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            rows.append(row)
        return rows


__all__ = ["DSHydraLM"]
