"""The CPU decode-attention kernel against fp32 attention (skipped where it cannot run)."""

from __future__ import annotations

import pytest
import torch

from vilaserve.adapters.worker import cpu_kernels

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


def test_rope_kernel_is_bit_exact_with_the_torch_expression() -> None:
    assert KERNELS is not None
    from vilaserve.adapters.worker.torch_vila.llama import _apply_rope

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=gen).to(torch.bfloat16)  # [B, H, D]
    angles = torch.rand(64, generator=gen) * 6
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    want = _apply_rope(x[:, :, None, :], cos[None], sin[None])[:, :, 0]
    cache = torch.zeros(2, 5, 9, 64, dtype=torch.bfloat16)  # a cache: write position 3 only
    KERNELS.rope(x, cos, sin, cache[:, :, 3])
    assert torch.equal(cache[:, :, 3], want)
    assert not cache[:, :, [0, 1, 2, 4, 5, 6, 7, 8]].any()


def test_rms_norm_kernel_matches_hf_rmsnorm_to_one_bf16_step() -> None:
    assert KERNELS is not None
    from vilaserve.adapters.worker.torch_vila.cpu_path import KernelRMSNorm
    from vilaserve.adapters.worker.torch_vila.llama import RMSNorm

    norm = RMSNorm(256, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(3, 1, 256) * 4).to(torch.bfloat16)
    with torch.inference_mode():
        got = KernelRMSNorm(norm, KERNELS)(x)  # the kernel path
        want = norm(x)  # the PyTorch expression
    # only the fp32 summation order differs: at most one bf16 rounding step apart
    assert float((got.float() - want.float()).abs().max()) <= float(want.abs().max()) / 128


def test_llama_decode_on_kernels_agrees_with_the_torch_path() -> None:
    from vilaserve.adapters.worker.torch_vila.cpu_path import (
        KernelAttention,
        KernelRMSNorm,
        swap_kernel_norms_and_attention,
    )
    from vilaserve.adapters.worker.torch_vila.llama import Llama
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

    args = LlamaArgs(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(args).to(torch.bfloat16).eval()  # plain PyTorch until swapped
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))

    def decode_logits() -> torch.Tensor:
        cache = model.new_cache(2, 16)
        with torch.inference_mode():
            model(cache, 0, input_ids=ids[:, :6])
            steps = [model(cache, p, input_ids=ids[:, p : p + 1]) for p in range(6, 10)]
        return torch.cat(steps, dim=1)

    slow = decode_logits()
    assert KERNELS is not None
    # The per-op kernel path only (test_native_decode covers the one-call decoder).
    swap_kernel_norms_and_attention(model, KERNELS)
    kinds = {type(m) for m in model.modules()}
    assert KernelAttention in kinds and KernelRMSNorm in kinds
    fast = decode_logits()
    assert float((fast - slow).abs().max()) < 2e-2 * float(slow.abs().max())
