"""The token embedding table in int8 with one scale per row, for 4-bit models.

A decode step reads one row of the table, so its size is memory, not speed: in a W4A16 model
the 16-bit table is the largest single tensor after the head (6% of VILA1.5-3B's LLM). Per-row
absmax int8 halves it with an error (<= 0.4% of the row's largest value) of the order of bf16's
own rounding. Tied embeddings are left alone: the 16-bit head needs the table anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vilaserve.adapters.worker.torch_vila.llama import Llama

_ROWS_PER_CHUNK = 4096  # bounds the fp32 temporary while quantizing (a 32k x 2560 table: 42 MB)


class Int8Embedding(nn.Module):
    table: Tensor  # int8 [vocab, dim]
    scales: Tensor  # fp32 [vocab, 1]

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        vocab, dim = weight.shape
        table = torch.empty(vocab, dim, dtype=torch.int8, device=weight.device)
        scales = torch.empty(vocab, 1, dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            for start in range(0, vocab, _ROWS_PER_CHUNK):
                rows = weight[start : start + _ROWS_PER_CHUNK].float()
                scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
                table[start : start + len(rows)] = torch.round(rows / scale).to(torch.int8)
                scales[start : start + len(rows)] = scale
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.out_dtype = weight.dtype
        self.num_embeddings, self.embedding_dim = vocab, dim

    def forward(self, input_ids: Tensor) -> Tensor:
        return (self.table[input_ids].float() * self.scales[input_ids]).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, out_dtype={self.out_dtype}"


def compress_token_embeddings(model: Llama) -> bool:
    """Replaces the model's untied embedding table by an `Int8Embedding`; True if it did."""
    if model.args.tie_word_embeddings or not isinstance(model.model.embed_tokens, nn.Embedding):
        return False
    model.model.embed_tokens = Int8Embedding(model.model.embed_tokens.weight)
    return True
