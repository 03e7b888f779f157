"""A model of a user's own, as README's "Bring your own model" section shows it (kept identical: a test
checks). ds_hydra trains it with: model=custom model._target_=my_models.build_model allowed_targets=[my_models]"""
import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, max_seq_len: int = 64):
        super().__init__()
        self.max_seq_len = max_seq_len  # tells ds_hydra the longest sequence (the default data.seq_len)
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_seq_len, width)
        layer = lambda: nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True)  # noqa: E731
        self.layers = nn.ModuleList(layer() for _ in range(layers))  # the block list ckpt policies recompute
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, V)
        T = input_ids.size(1)
        x = self.embed(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def build_model(vocab_size: int, width: int = 64, layers: int = 2) -> nn.Module:
    return TinyLM(vocab_size, width, layers)
