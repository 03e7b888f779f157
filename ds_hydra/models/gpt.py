"""A GPT language model: pre-LayerNorm blocks, causal attention through SDPA, GELU MLP, tied embeddings.

It meets the model contract of ``ds_hydra.models.contract``: ``model(input_ids)`` returns the logits
(or, with ``head_chunk_tokens``, a ``ChunkedHead`` the trainer's loss applies a chunk at a time). The
blocks live in ``GPT.blocks`` (an ``nn.ModuleList``) and take and return one tensor, so the
activation-checkpoint policies can wrap any of them. Generation can use a ``KVCache``
(``make_kv_cache``) so that each new token costs one position's worth of compute instead of the
whole context.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_hydra.models.contract import ChunkedHead


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's ``nn.LayerNorm`` only got ``bias=`` in 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LayerKVCache:
    """Keys and values of one attention layer for positions ``[0, length)``, preallocated to ``max_len``."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.weights = None  # the block's parameters, gathered by Block.decode_one on first use

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v of shape (B, nh, t, hs) after the cached positions; return all of them."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: {end} positions, room for {self.k.size(2)}")
        self.k.narrow(2, start, end - start).copy_(k)
        self.v.narrow(2, start, end - start).copy_(v)
        self.length = end
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)  # views, no copy: (B, nh, end, hs)


class KVCache:
    """Per-layer caches for one generation; ``length`` is the number of positions already seen.

    The cache holds at most ``max_len == model.block_size`` positions, because the learned position
    table has no rows beyond it. What to do when it is full is the generator's choice
    (``ds_hydra.inference.generate`` empties it with ``reset()`` and re-fills it from a window of
    the latest tokens, renumbered from position 0).
    """

    def __init__(self, model: "GPT", batch: int, device=None, dtype=None):
        param = next(model.parameters())
        device = device or param.device
        dtype = dtype or param.dtype
        head_dim = model.n_embd // model.n_head
        self.batch = batch
        self.max_len = model.block_size
        self.layers: List[LayerKVCache] = [
            LayerKVCache(batch, model.n_head, model.block_size, head_dim, device, dtype)
            for _ in model.blocks
        ]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten, not reallocated)."""
        for layer in self.layers:
            layer.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: Optional[LayerKVCache] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attn_mask``: (B, 1, T, T) booleans, True where a query may attend (packed rows: block-causal)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if cache is None and attn_mask is not None:  # packed examples: each attends within itself only
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = cache.length
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
            if T == 1:  # one new query attends to every cached position: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # a prompt after a (possibly empty) prefix: causal within the new rows
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, cache: Optional[LayerKVCache] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, attn_mask)
        return x + self.mlp(self.ln_2(x))

    def decode_one(self, x: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """``forward`` for one new position x: (B, C) in eval mode, with the ops called directly.

        The same arithmetic without nn.Module calls and attribute look-ups: at one position per step,
        generation of a small model costs per-op overhead rather than FLOPs. The head split of a
        single position is a view, with no transposes, and no mask is built."""
        B, C = x.shape
        if cache.weights is None:  # looked up once per generation: attribute access costs too
            cache.weights = self.decode_weights()
        ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = cache.weights
        n_head = self.attn.n_head
        h = F.layer_norm(x, (C,), ln1_w, ln1_b, 1e-5)
        # (B, C) -> (B, nh, 1, hs): with one position the head split needs no transpose
        q, k, v = F.linear(h, qkv_w, qkv_b).view(B, 3, n_head, 1, C // n_head).unbind(1)
        k, v = cache.append(k, v)  # (B, nh, past + 1, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: nothing cached lies in the future
        x = x + F.linear(y.reshape(B, C), proj_w, proj_b)
        h = F.layer_norm(x, (C,), ln2_w, ln2_b, 1e-5)
        return x + F.linear(F.gelu(F.linear(h, fc_w, fc_b)), out_w, out_b)

    def decode_weights(self):
        attn, mlp = self.attn, self.mlp
        return (self.ln_1.weight, self.ln_1.bias, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                self.ln_2.weight, self.ln_2.bias, mlp.fc.weight, mlp.fc.bias, mlp.proj.weight, mlp.proj.bias)


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_size: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        pad_vocab_to: int = 1,
        head_chunk_tokens: int = 0,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.vocab_size = vocab_size
        self.n_layer, self.n_head, self.n_embd, self.block_size = n_layer, n_head, n_embd, block_size
        padded_vocab = math.ceil(vocab_size / pad_vocab_to) * pad_vocab_to
        self.wte = nn.Embedding(padded_vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = LayerNorm(n_embd, bias)
        self.lm_head = nn.Linear(n_embd, padded_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.head_chunk_tokens = head_chunk_tokens

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_kv_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """An empty cache for generating ``batch`` sequences (``forward(..., kv_cache=cache)``)."""
        return KVCache(self, batch, device, dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are excluded by default (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    # Packed rows (several examples in one row, ``position_ids`` restarting at 0 at each) are kept apart:
    # a block-causal mask, and positions counted from each example's start (ds_hydra.models.packing).
    packs_documents = True

    def forward(self, idx: torch.Tensor, kv_cache: Optional[KVCache] = None, logits_to_keep: int = 0,
                position_ids: Optional[torch.Tensor] = None):
        """idx: (B, T) token ids -> logits (B, T, V), the model contract (``ds_hydra.models.contract``).

        ``position_ids`` (B, T): each token's position in its own example, 0 where an example starts (packed
        rows); tokens then attend within their example only, and the loss of a packed example equals the
        loss of the example run on its own.

        ``logits_to_keep=n`` computes the logits of the last n positions only (generation needs one);
        0 keeps all. With ``head_chunk_tokens`` the output is a ``ChunkedHead`` instead, which the
        trainer's loss applies a chunk at a time. With ``kv_cache`` the tokens continue the cached
        sequence and only the last position's logits are computed.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.block_size}")
        if kv_cache is None and position_ids is not None:
            x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
            mask = block_causal_mask(position_ids)  # (B, 1, T, T)
            for block in self.blocks:
                x = block(x, attn_mask=mask)
        elif kv_cache is None:
            pos = torch.arange(start, start + T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
            for block in self.blocks:
                x = block(x)
        else:
            if kv_cache.batch != B:
                raise ValueError(f"KV cache is for batch {kv_cache.batch}, got a batch of {B}")
            logits_to_keep = 1
            # the rows wpe(arange) would gather, without building the index on every token
            if T == 1 and not self.training:  # decode step: one new position as (B, C), see Block.decode_one
                x = self.wte(idx[:, 0]) + self.wpe.weight[start]  # (B, C)
                for block, cache in zip(self.blocks, kv_cache.layers):
                    x = block.decode_one(x, cache)
                x = x[:, None, :]  # (B, 1, C)
            else:
                x = self.drop(self.wte(idx) + self.wpe.weight[start : start + T])  # (B, T, C)
                for block, cache in zip(self.blocks, kv_cache.layers):
                    x = block(x, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:, :]  # (B, n, C)
        x = self.ln_f(x)
        if self.head_chunk_tokens and not logits_to_keep:
            return ChunkedHead(x, self.lm_head, self.vocab_size, self.head_chunk_tokens)
        return self.lm_head(x)[..., : self.vocab_size]  # (B, T, V): the padding columns dropped


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 at each example -> (B, 1, T, T) booleans: query t may attend key
    u when u <= t and both lie in the same example (SDPA's boolean mask: True attends)."""
    T = position_ids.size(1)
    example = (position_ids == 0).cumsum(dim=1)  # (B, T): which example of the row each token is in
    same = example[:, :, None] == example[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]
