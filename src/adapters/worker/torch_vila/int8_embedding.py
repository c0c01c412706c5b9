"""The token embedding table in int8 with one scale per row, for 4-bit models.

A decode step reads one row of the table, so its size is memory, not speed: in a W4A16 model
the 16-bit table is the largest single tensor after the head (6% of VILA1.5-3B's LLM). Per-row
absmax int8 halves it with an error (<= 0.4% of the row's largest value) of the order of bf16's
own rounding. Tied embeddings are left alone on most paths: the 16-bit head needs the table
anyway. On the fp32 CPU paths (AVX2, NEON) the tied table is kept once, in int8, as both the
token lookup and the LM head (`Int8TiedHead`): decode streams the head every step, and int8
halves it (llama.cpp's SmolLM2 Q4_1 GGUF keeps that table in Q8_0 likewise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.device import apply_keeping_dtypes
from vilaserve.adapters.worker.torch_vila.fast_linear import FP32_KERNEL_MAX_ROWS
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

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8Embedding:
        # `model.to(dtype)` changes the dtype rows come out in (the model's activations); the
        # int8 table and the fp32 scales only follow device moves.
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype, device=self.scales.device)).dtype
        apply_keeping_dtypes(self, fn, recurse, names=("scales",))
        return self


def compress_token_embeddings(model: Llama) -> bool:
    """Replaces the model's untied embedding table by an `Int8Embedding`; True if it did."""
    if model.args.tie_word_embeddings or not isinstance(model.model.embed_tokens, nn.Embedding):
        return False
    model.model.embed_tokens = Int8Embedding(model.model.embed_tokens.weight)
    return True


class Int8TiedHead(nn.Module):
    """The LM head of a tied model, reading the `Int8Embedding`'s table and scales (one copy)."""

    def __init__(self, embedding: Int8Embedding, kernels: cpu_kernels.Fp32Kernels) -> None:
        super().__init__()
        self.embedding = [embedding]  # a plain list: the embedding stays the model's submodule
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self._kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        embedding = self.embedding[0]
        rows = x.reshape(-1, self.in_features)
        if (
            rows.shape[0] > FP32_KERNEL_MAX_ROWS  # more rows widen the table once, for a GEMM
            or x.dtype != torch.float32
            or torch.is_grad_enabled()
        ):
            weight = (embedding.table.float() * embedding.scales).to(x.dtype)
            return F.linear(x, weight)
        out = torch.empty(rows.shape[0], self.out_features)
        self._kernels.int8_matmul(
            rows.contiguous(), embedding.table, embedding.scales.view(-1), out
        )
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (tied)"


def compress_tied_embeddings(model: Llama) -> bool:
    """On the fp32 CPU paths, a tied model's table becomes one int8 copy serving as both the
    embedding and the head; True if it did (elsewhere, or untied, nothing changes)."""
    kernels = cpu_kernels.load_fp32()
    if (
        kernels is None
        or not model.args.tie_word_embeddings
        or not isinstance(model.model.embed_tokens, nn.Embedding)
        or model.args.hidden_size % 8
    ):
        return False
    embedding = Int8Embedding(model.model.embed_tokens.weight)
    model.model.embed_tokens = embedding
    model.lm_head = Int8TiedHead(embedding, kernels)
    return True
