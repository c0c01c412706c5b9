"""The dense bf16 decode kernel behind `Avx512DecodeLinear` (skipped where AVX-512 cannot run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila import fast_linear
from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.fast_linear import (
    Avx512DecodeLinear,
    accelerate_cpu_linears,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="needs an AVX-512 BF16 CPU and gcc")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("out_features", [37, 64, 1000])  # 37: a partial 4-row tile at the end
@pytest.mark.parametrize("bias", [False, True])
def test_decode_rows_match_f_linear(out_features: int, bias: bool) -> None:
    torch.manual_seed(out_features)
    linear = nn.Linear(256, out_features, bias=bias).to(torch.bfloat16)
    model = nn.Sequential(linear)
    assert KERNELS is not None
    assert accelerate_cpu_linears(model, KERNELS) == 1
    fast = model[0]
    assert isinstance(fast, Avx512DecodeLinear) and fast.weight is linear.weight
    for rows in (1, 3, fast_linear.DECODE_MAX_ROWS):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        want = x.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0)
        with torch.inference_mode():
            got = fast(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # fp32 accumulation, one bf16 rounding of the output (and of the bias add)
        assert rel_err(got, want) < 1e-2


def test_prefill_rows_and_other_dtypes_take_f_linear_unchanged() -> None:
    linear = nn.Linear(128, 96).to(torch.bfloat16)
    assert KERNELS is not None
    fast = Avx512DecodeLinear(linear, KERNELS)
    many = torch.randn(fast_linear.DECODE_MAX_ROWS + 1, 128).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fast(many), F.linear(many, linear.weight, linear.bias))
    # with autograd on, even one row takes F.linear: gradients flow (training through the LLM)
    one = torch.randn(1, 128).to(torch.bfloat16).requires_grad_()
    fast(one).float().sum().backward()
    assert one.grad is not None and one.grad.abs().sum() > 0
    fp32 = nn.Linear(128, 96)
    assert accelerate_cpu_linears(nn.Sequential(fp32), KERNELS) == 0  # only bf16 weights


def test_llama_keeps_its_state_dict_and_tied_head() -> None:
    args = LlamaArgs(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(args).to(torch.bfloat16).eval()
    keys = list(model.state_dict())
    ids = torch.randint(0, 320, (1, 9))

    def greedy_logits() -> torch.Tensor:
        cache = model.new_cache(1, 16)
        with torch.inference_mode():
            model(cache, 0, input_ids=ids[:, :-1])
            return model(cache, 8, input_ids=ids[:, -1:])

    before = greedy_logits()
    report = put_on_cpu_path(model)
    assert report.kernel_linears == 2 * 7 + 1  # every decoder linear and the head
    assert list(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rel_err(greedy_logits(), before) < 3e-2
