"""The CPU decode-attention kernel against fp32 attention (skipped where it cannot run)."""

from __future__ import annotations

import pytest
import torch

from vilaserve.adapters import cpu_kernels

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="needs an AVX-512 BF16 CPU and gcc")


def fp32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 128), (6, 2, 64), (8, 1, 32)])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 300])  # masked softmax tails around 16
def test_matches_fp32_attention_on_cache_views(
    heads: int, kv_heads: int, dim: int, length: int
) -> None:
    assert KERNELS is not None
    gen = torch.Generator().manual_seed(length + dim)
    # views of a longer cache, as the model passes them (head stride = max_len * dim)
    keys = torch.randn(2, kv_heads, 512, dim, generator=gen).to(torch.bfloat16)[:, :, :length]
    values = torch.randn(2, kv_heads, 512, dim, generator=gen).to(torch.bfloat16)[:, :, :length]
    q = (3 * torch.randn(2, heads, 1, dim, generator=gen)).to(torch.bfloat16)  # peaky softmax
    got = KERNELS.decode_attention(q, keys, values, dim**-0.5)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    want = fp32_attention(q, keys, values)
    # fp32 math throughout; only the bf16 output rounding (2^-8 relative) remains
    assert float((got.float() - want).abs().max()) < 1e-2 * float(want.abs().max())


def test_refuses_head_sizes_it_cannot_take() -> None:
    assert KERNELS is not None
    q = torch.zeros(1, 2, 1, 48, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 4, 48, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="status 1"):
        KERNELS.decode_attention(q, kv, kv, 0.1)
