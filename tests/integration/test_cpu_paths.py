"""The CPU paths: which kernel set a process runs, the fp32 set's kernels (AVX2 on x86, NEON on
ARM) against fp32 oracles, and a whole model on each path this machine can run (forced with
VILASERVE_CPU_PATH).

The AVX2 build runs on any x86-64 CPU with AVX2 + FMA + F16C, AVX-512 machines included, so these
tests run wherever the suite does on x86; the AVX-512 set's own tests are in test_qlinear.py,
test_fast_linear.py and test_native_decode.py, and the NEON builds are checked under qemu in
test_native_kernels_c.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_wiring import engine_generator
from test_qlinear import random_qweight, rel_err, tiny_args
from torch import nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.cpu_kernels import packing
from vilaserve.adapters.worker.torch_vila.device import cpu_computes_bf16_natively, resolve_dtype
from vilaserve.adapters.worker.torch_vila.fast_linear import (
    PortableDecodeLinear,
    accelerate_cpu_linears,
    exact_16_bit,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama

FP32 = cpu_kernels.fp32_kernels()
needs_fp32 = pytest.mark.skipif(FP32 is None, reason="needs an AVX2 (or NEON) CPU and gcc")
PATHS = (
    ["torch"]
    + ([FP32.path] if FP32 else [])
    + (["avx512_bf16"] if cpu_kernels.avx512_kernels() else [])
)


def test_the_path_is_one_of_the_known_ones_and_can_be_forced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cpu_kernels.cpu_path() in cpu_kernels.CPU_PATHS
    monkeypatch.setenv("VILASERVE_CPU_PATH", "torch")
    assert cpu_kernels.cpu_path() == "torch"
    assert cpu_kernels.load() is None and cpu_kernels.load_fp32() is None
    if FP32 is not None:
        monkeypatch.setenv("VILASERVE_CPU_PATH", FP32.path)
        assert cpu_kernels.load_fp32() is FP32 and cpu_kernels.load() is None


@pytest.mark.parametrize("path", PATHS)
def test_auto_dtype_on_cpu_is_what_the_path_computes_in(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    want = {"avx512_bf16": torch.bfloat16, "torch": None}.get(path, torch.float32)
    if want is None:  # PyTorch's own kernels: bf16 only where the CPU computes it natively
        want = torch.bfloat16 if cpu_computes_bf16_natively() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@needs_fp32
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["y32", "y16"])
@pytest.mark.parametrize(("n", "k", "group"), [(576, 576, 64), (1536, 576, 64), (256, 2048, 2048)])
def test_fp32_int4_matmul_and_dequantize_against_the_oracle(
    n: int, k: int, group: int, x_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    """Rows 1 to 16 (the batching engine's range): the only difference from fp32 is the
    16-bit integer form of x, so fp32 outputs agree to 1e-4; bf16 outputs to their rounding."""
    assert FP32 is not None
    w = random_qweight(n, k, group, seed=n + k, bias=False)
    packed = packing.pack_for_kernel(w)
    dense = torch.empty(n, k)
    FP32.dequantize(packed, n, k, group, dense)
    assert torch.equal(dense, w.dequantize())
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 2, 5, 16):
        x = (torch.randn(rows, k, generator=gen) * 3).to(x_dtype)
        out = torch.empty(rows, n, dtype=out_dtype)
        FP32.matmul(x, packed, n, group, out)
        tol = 1e-4 if out_dtype == torch.float32 else 8e-3
        assert rel_err(out, x.float() @ w.dequantize().t()) < tol, rows


@needs_fp32
def test_fp32_int4_matmul_on_hard_rows_in_fp32() -> None:
    """An outlier among tiny values, a silent group, only tiny values, and the heap path."""
    assert FP32 is not None
    n, k, group = 64, 1024, 128
    w = random_qweight(n, k, group, seed=11, bias=False)
    packed = packing.pack_for_kernel(w)
    x = torch.randn(24, k, generator=torch.Generator().manual_seed(5)) * 1e-2
    x[0, 5] = 1e4
    x[1, group : 2 * group] = 0.0
    x[2] *= 1e-30
    out = torch.empty(24, n)
    FP32.matmul(x, packed, n, group, out)
    want = x @ w.dequantize().t()
    for row in range(24):
        assert rel_err(out[row], want[row]) < 1e-4, row


@needs_fp32
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=["wbf16", "wfp16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
def test_fp32_dense_matmul_against_fp32(w_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    assert FP32 is not None
    gen = torch.Generator().manual_seed(0)
    for n, k in ((49152, 576), (7, 24), (130, 2560)):
        weight = torch.randn(n, k, generator=gen).to(w_dtype)
        for rows in (1, 2, 3, 8):
            x = torch.randn(rows, k, generator=gen).to(x_dtype)
            out = torch.empty(rows, n)
            FP32.dense_matmul(x, weight, out)
            assert rel_err(out, x.float() @ weight.float().t()) < 1e-5, (n, k, rows)


@needs_fp32
def test_fp32_linear_keeps_exact_16_bit_weights_and_answers_like_f_linear() -> None:
    assert FP32 is not None
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.to(torch.bfloat16).float())  # exactly bf16
    narrow = exact_16_bit(linear.weight.detach())
    assert narrow is not None and narrow.dtype == torch.bfloat16
    layer = PortableDecodeLinear(narrow, linear.bias.detach(), FP32)
    with torch.inference_mode():
        for rows in (1, 3, 40):  # 40 rows: the widened weight and one GEMM
            x = torch.randn(2, rows, 64)
            assert rel_err(layer(x), linear(x)) < 1e-5
    not_16_bit = nn.Linear(64, 48)
    assert exact_16_bit(not_16_bit.weight.detach() + 1e-9) is None


@needs_fp32
def test_a_fp32_model_on_the_fp32_path_keeps_16_bit_weights_and_its_logits() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_args(tied=True)).to(torch.bfloat16).float().eval()  # fp32, exactly 16-bit
    ids = torch.randint(0, 512, (1, 10))
    with torch.inference_mode():
        want = model(model.new_cache(1, 32), 0, input_ids=ids, last_only=False)
    assert FP32 is not None
    swapped = accelerate_cpu_linears(model, FP32)
    assert swapped == 2 * 7 + 1  # every decoder linear and the (tied) head
    assert isinstance(model.lm_head, PortableDecodeLinear)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # lookups stay fp32
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        prefill = model(cache, 0, input_ids=ids[:, :-1], last_only=False)
        step = model(cache, 9, input_ids=ids[:, -1:])
    assert rel_err(torch.cat((prefill, step), dim=1), want) < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_the_worker_answers_the_same_on_every_path(
    path: str, tiny_vila_siglip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy text of the tiny 16-bit checkpoint in fp32 on each CPU path equals the torch
    path's (the kernels widen the exact 16-bit weights; only fp32 summation order differs),
    and the generator reports which path runs it (`/model_details` cpu_path)."""
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    got, reported = greedy_text(tiny_vila_siglip)
    assert reported == path
    monkeypatch.setenv("VILASERVE_CPU_PATH", "torch")
    want, _ = greedy_text(tiny_vila_siglip)
    assert got == want and got


def greedy_text(model_path: Path) -> tuple[str, str | None]:
    import asyncio

    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
    from vilaserve.domain.shared.generation import SamplingParams

    runtime = VilaRuntime.load(VilaRuntimeOptions(model_path=str(model_path), dtype="float32"))
    generator = engine_generator(runtime)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)

    async def run() -> str:
        return "".join([step.text async for step in generator.generate("Hello", None, params)])

    return asyncio.run(run()), generator.compute_path


@needs_fp32
def test_the_fp32_decoder_refuses_a_hidden_state_of_another_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C decoder reads and writes the hidden state in place: a bf16 buffer handed to the
    fp32 decoder would be overrun, so the model never hands one and `run` refuses it."""
    from vilaserve.adapters.worker.torch_vila.cpu_path import NativeDecodeBody, put_on_cpu_path

    assert FP32 is not None
    monkeypatch.setenv("VILASERVE_CPU_PATH", FP32.path)
    torch.manual_seed(0)
    model = Llama(tiny_args(tied=True)).to(torch.bfloat16).float().eval()
    report = put_on_cpu_path(model)
    assert report.path == FP32.path and report.native_decode
    assert isinstance(model.model, NativeDecodeBody)
    native = model.model.decoder
    assert native is not None and native.dtype == torch.float32
    cache = model.new_cache(1, 8)
    cos, sin = model.rope.rows(0, 1, torch.float32)
    zero = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32"):
        native.run(torch.zeros(1, 1, 128, dtype=torch.bfloat16), cache, zero, zero, cos, sin)
