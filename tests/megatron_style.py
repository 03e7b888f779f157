"""A small GPT written the way Megatron-DeepSpeed models are: it checkpoints its own layers through the
DeepSpeed checkpointing module and draws attention dropout from the model-parallel RNG tracker.

Only the import differs from DeepSpeed code (``import deepspeed; checkpointing = deepspeed.checkpointing``).
The constructor takes ds_hydra's ``model`` keys, so a run trains it with
``model._target_=tests.megatron_style.MegatronGPT allowed_targets=[tests.megatron_style]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ds_hydra.checkpointing as checkpointing

USE_CHECKPOINTING = True  # Megatron's --checkpoint-activations (tests turn it off for a reference run)
CHECKPOINT_NUM_LAYERS = 1  # Megatron's --checkpoint-num-layers: layers per checkpointed chunk


class ParallelSelfAttention(nn.Module):
    """Megatron's attention with a tensor-parallel size of 1: fused QKV projection, causal softmax,
    dropout on the attention probabilities under the model-parallel RNG state."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.attention_dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden.shape
        q, k, v = self.query_key_value(hidden).split(h, dim=2)
        q, k, v = (z.view(b, t, self.heads, h // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(h // self.heads)
        probs = F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        with checkpointing.get_cuda_rng_tracker().fork():  # differs between tensor-parallel ranks
            probs = self.attention_dropout(probs)
        context = (probs @ v).transpose(1, 2).reshape(b, t, h)
        return self.dense(context)


class ParallelTransformerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.attention = ParallelSelfAttention(hidden, heads, dropout)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.hidden_dropout = nn.Dropout(dropout)  # the default generator: the same on every tensor-parallel rank
        self.calls = 0  # forwards run, recomputes included (tests read it)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        hidden = hidden + self.hidden_dropout(self.attention(self.input_layernorm(hidden), mask))
        return hidden + self.hidden_dropout(self.mlp(self.post_attention_layernorm(hidden)))


class MegatronGPT(nn.Module):
    """Embeddings, ``n_layer`` transformer layers checkpointed Megatron's way, tied output layer."""

    def __init__(self, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, block_size: int = 64,
                 vocab_size: int = 65, pad_vocab_to: int = 1, head_chunk_tokens: int = 0, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.block_size, self.vocab_size = block_size, vocab_size
        self.word_embeddings = nn.Embedding(vocab_size, n_embd)
        self.position_embeddings = nn.Embedding(block_size, n_embd)
        self.layers = nn.ModuleList(ParallelTransformerLayer(n_embd, n_head, dropout) for _ in range(n_layer))
        self.final_layernorm = nn.LayerNorm(n_embd)
        self.embedding_dropout = nn.Dropout(dropout)
        # Megatron seeds both generators at start-up (initialize_megatron -> _set_random_seed)
        checkpointing.model_parallel_cuda_manual_seed(torch.initial_seed())

    def _checkpointed_forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Megatron's ParallelTransformer._checkpointed_forward: chunks of layers, each one checkpoint."""

        def custom(start: int, end: int):
            def custom_forward(*inputs):
                x = inputs[0]
                for layer in self.layers[start:end]:
                    x = layer(x, inputs[1])
                return x

            return custom_forward

        index = 0
        while index < len(self.layers):
            hidden = checkpointing.checkpoint(custom(index, index + CHECKPOINT_NUM_LAYERS), hidden, mask)
            index += CHECKPOINT_NUM_LAYERS
        return hidden

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        t = idx.size(1)
        positions = torch.arange(t, device=idx.device)
        hidden = self.embedding_dropout(self.word_embeddings(idx) + self.position_embeddings(positions))  # (B, T, C)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), diagonal=1)
        if USE_CHECKPOINTING:
            hidden = self._checkpointed_forward(hidden, mask)
        else:
            for layer in self.layers:
                hidden = layer(hidden, mask)
        logits = self.final_layernorm(hidden) @ self.word_embeddings.weight.t()  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss
