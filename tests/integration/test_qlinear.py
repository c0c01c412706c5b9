"""W4A16Linear backends against the dequantize-then-F.linear oracle, and inside a tiny Llama.

Tolerances are relative to the largest |output| and come from bf16's 8-bit significand
(eps = 2^-8 ~ 3.9e-3): the int4 kernels take bf16 activations and bf16 scale/zero pairs (the
tinygemm zero (8 - z) * s is rounded to bf16; our AVX-512 kernel takes bf16 x, holds each
weight group's slice of it as 16-bit integers, and may write bf16 outputs), so even for fp32
models they agree with the oracle to a few bf16 eps, not to fp32 rounding. 2e-2 leaves ~5x
margin over what we observe (~5e-3). The fp32 dense prefill paths dequantize with fp32 scales
and should match to fp32 rounding (1e-5).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq import qlinear
from vilaserve.adapters.worker.awq.qlinear import (
    W4A16Linear,
    cpu_int4_available,
    fuse_w4a16,
    keep_16_bit_prefill,
    quantize_model_linears,
    weight_bytes,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.cpu_kernels import packing
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

BF16_REL_TOL = 2e-2
# The AVX2 prefill GEMM rounds activations to 8 bits per 32 columns (half a step: 0.4 % of the
# block's largest |x|); we observe ~6e-3 of the largest output, and a wrong layout is ~1.
W4A8_REL_TOL = 2e-2
FP32_REL_TOL = 1e-5
AVX512 = cpu_kernels.avx512_kernels() is not None
FP32 = cpu_kernels.fp32_kernels()  # AVX2 on x86, NEON on ARM
AVX2 = FP32 is not None  # the fp32 backend's name is the same on both
CPU_BACKENDS = (
    ["dequant"]
    + (["cpu_int4"] if cpu_int4_available() else [])
    + (["cpu_avx512"] * AVX512)
    + (["cpu_fp32"] * AVX2)
)
# Every native kernel set this machine runs, each tested whatever path `auto` would pick.
NATIVE_KERNELS = [
    pytest.param(getter, id=name)
    for name, getter, usable in (
        ("avx512", cpu_kernels.avx512_kernels, AVX512),
        ("fp32", cpu_kernels.fp32_kernels, AVX2),
    )
    if usable
]
needs_native = pytest.mark.skipif(
    not NATIVE_KERNELS, reason="needs an AVX-512 BF16, AVX2 or NEON CPU and a C compiler"
)


def random_qweight(n: int, k: int, group: int, seed: int, bias: bool = True) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    return QuantizedWeight(
        q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(torch.float16),
        zeros=torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8),
        group_size=group,
        bias=torch.randn(n, generator=gen) if bias else None,
    )


def rtn_quantize(weight: torch.Tensor, group: int) -> QuantizedWeight:
    """Per-group asymmetric min/max round-to-nearest, AWQ's integer zero-point convention."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low).clamp(min=1e-5) / 15
    zeros = (-torch.round(low / scales)).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return QuantizedWeight(
        q.view(n, k).to(torch.uint8), scales, zeros.to(torch.uint8), group, bias=None
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6))


@pytest.mark.parametrize("dense_from", [None, 16], ids=["default-split", "dense-prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("n", "k", "group"), [(256, 512, 32), (384, 1024, 64), (256, 512, 128)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_oracle(
    backend: str,
    n: int,
    k: int,
    group: int,
    dtype: torch.dtype,
    dense_from: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if dense_from is not None:
        # Route M=17 and M=64 through the CPU dequant + GEMM prefill paths as well.
        monkeypatch.setattr(qlinear, "PREFILL_MIN_ROWS", dense_from)
        monkeypatch.setattr(qlinear, "AVX512_PREFILL_MIN_ROWS", dense_from)
        monkeypatch.setattr(qlinear, "FP32_PREFILL_MIN_ROWS", dense_from)
    w = random_qweight(n, k, group, seed=n + k + group)
    oracle = W4A16Linear.from_quantized(w, torch.float32, "cpu", "dequant")
    if backend in qlinear.NATIVE_BACKENDS and not packing.fits(n, k, group):
        with pytest.raises(ValueError, match="group%64"):
            W4A16Linear.from_quantized(w, dtype, "cpu", backend)
        return
    layer = W4A16Linear.from_quantized(w, dtype, "cpu", backend)
    assert layer.backend == backend
    if dense_from is not None:
        layer.keep_16_bit_prefill()
    gemm = backend == "cpu_fp32" and FP32 is not None and FP32.has_gemm and dense_from is None
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 17, 64):
        x = torch.randn(2, rows, k, generator=gen).to(dtype)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (2, rows, n)
        want = oracle(x.float())
        dense = (
            (backend == "cpu_int4" and rows >= qlinear.PREFILL_MIN_ROWS)
            or (backend == "cpu_avx512" and rows >= qlinear.AVX512_PREFILL_MIN_ROWS)
            or (backend == "cpu_fp32" and rows >= qlinear.FP32_PREFILL_MIN_ROWS)
        )
        exact = dtype == torch.float32 and (backend == "dequant" or dense)
        tol = FP32_REL_TOL if exact else BF16_REL_TOL
        if gemm and rows >= qlinear.GEMM_MIN_ROWS:
            tol = W4A8_REL_TOL
        assert rel_err(got, want) < tol, (backend, rows, rel_err(got, want))


@pytest.mark.skipif(not qlinear.cpu_int4_available(), reason="no CPU int4 kernel in this torch")
def test_the_dequantize_oracle_runs_where_the_int4_layout_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On AVX-512 CPUs PyTorch packs int4 in a layout the prefill dequant does not read (the
    probe finds no block): `dequantized()` then asks the kernel itself, and must not recurse
    into the reference path a caller pointed `_impl` at (it did, forcing the torch path)."""
    monkeypatch.setattr(qlinear, "_cpu_pack_block", lambda: None)
    w = random_qweight(256, 512, 64, seed=11)
    layer = W4A16Linear.from_quantized(w, torch.float32, "cpu", "cpu_int4")
    oracle = W4A16Linear.from_quantized(w, torch.float32, "cpu", "dequant")
    layer._impl = layer._forward_dequant  # as test_w4a16 makes its reference model
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    assert rel_err(layer(x), oracle(x)) < BF16_REL_TOL


def test_fp16_activations_and_dequantized_weight() -> None:
    w = random_qweight(256, 512, 64, seed=7)
    layer = W4A16Linear.from_quantized(w, torch.float16, "cpu")
    x = torch.randn(5, 512).half()
    assert layer(x).dtype == torch.float16
    assert rel_err(layer(x), x.float() @ w.dequantize().t() + w.bias) < BF16_REL_TOL
    assert rel_err(layer.dequantized(), w.dequantize()) < BF16_REL_TOL


@pytest.mark.parametrize("path", ["auto", "avx512_bf16", "fp32", "torch"])
def test_auto_picks_the_fastest_cpu_kernel_that_fits(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = {"auto": True, "avx512_bf16": AVX512, "fp32": AVX2, "torch": True}
    if not runs[path]:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    if path == "fp32":
        assert FP32 is not None
        path = FP32.path  # avx2, neon or neon_dotprod
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    int4 = "cpu_int4" if cpu_int4_available() else "dequant"
    native = {"avx512_bf16": "cpu_avx512", "torch": int4}
    native.update(dict.fromkeys(("avx2", "neon", "neon_dotprod"), "cpu_fp32"))
    fits = W4A16Linear.from_quantized(random_qweight(64, 128, 64, 0), torch.bfloat16, "cpu")
    assert fits.backend == native[cpu_kernels.cpu_path()]
    if path != "auto":
        assert cpu_kernels.cpu_path() == path
    # group 32 does not fit the AVX-512 kernel's 64-wide blocks: PyTorch's int4 kernel takes it
    small_groups = W4A16Linear.from_quantized(random_qweight(64, 128, 32, 0), torch.bfloat16, "cpu")
    assert small_groups.backend == int4


def test_without_native_kernels_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "avx512_kernels", lambda: None)
    monkeypatch.setattr(cpu_kernels, "fp32_kernels", lambda path=None: None)
    monkeypatch.setenv("VILASERVE_CPU_PATH", "torch")
    w = random_qweight(64, 128, 64, 0)
    layer = W4A16Linear.from_quantized(w, torch.bfloat16, "cpu")
    assert layer.backend == ("cpu_int4" if cpu_int4_available() else "dequant")
    with pytest.raises(ValueError, match="AVX-512 BF16"):
        W4A16Linear.from_quantized(w, torch.bfloat16, "cpu", "cpu_avx512")
    with pytest.raises(ValueError, match="fp32 kernels"):
        W4A16Linear.from_quantized(w, torch.bfloat16, "cpu", "cpu_fp32")


def test_a_forced_path_this_cpu_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VILASERVE_CPU_PATH", "sse2")
    with pytest.raises(ValueError, match="VILASERVE_CPU_PATH=sse2"):
        cpu_kernels.cpu_path()
    if not AVX512:
        monkeypatch.setenv("VILASERVE_CPU_PATH", "avx512_bf16")
        with pytest.raises(ValueError, match="cannot run here"):
            cpu_kernels.cpu_path()


@needs_native
@pytest.mark.parametrize("kernels", NATIVE_KERNELS)
def test_native_kernel_exact_against_fp32_oracle_on_real_shapes(kernels: Any) -> None:
    """fp32 output of the kernel for bf16 x: besides fp32 summation order, only the 16-bit
    integer form of x (per row and group, error <= max|x_group| / 65278) differs."""
    w = random_qweight(2560, 6912, 128, seed=3, bias=False)
    packed = packing.pack_for_kernel(w)
    kernel = kernels()
    assert kernel is not None
    x = torch.randn(3, 6912).to(torch.bfloat16)
    out = torch.empty(3, 2560)
    kernel.matmul(x, packed, 2560, 128, out)
    assert rel_err(out, x.float() @ w.dequantize().t()) < 1e-4
    dense = torch.empty(2560, 6912)
    kernel.dequantize(packed, 2560, 6912, 128, dense)
    assert torch.equal(dense, w.dequantize())


@needs_native
@pytest.mark.parametrize("kernels", NATIVE_KERNELS)
def test_native_kernel_keeps_activations_16_bit_on_hard_rows(kernels: Any) -> None:
    """Rows the integer form of x could get wrong: a group holding one huge outlier among tiny
    values, an all-zero group, tiny values alone, and more rows than the kernel's stack buffer
    (the heap path). Each is checked against the fp32 oracle, row by row."""
    n, k, group = 64, 1024, 128
    w = random_qweight(n, k, group, seed=11, bias=False)
    packed = packing.pack_for_kernel(w)
    kernel = kernels()
    assert kernel is not None
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, k, generator=gen) * 1e-2  # 24 x 1024 columns: past the stack buffer
    x[0, 5] = 1e4  # one outlier in group 0
    x[1, group : 2 * group] = 0.0  # a silent group
    x[2] *= 1e-30  # only tiny values (scale far below 1)
    x = x.to(torch.bfloat16)
    out = torch.empty(24, n)
    kernel.matmul(x, packed, n, group, out)
    want = x.float() @ w.dequantize().t()
    for row in range(24):
        assert rel_err(out[row], want[row]) < 1e-4, row


needs_gemm = pytest.mark.skipif(
    FP32 is None or not FP32.has_gemm, reason="the W4A8 prefill GEMM is built for AVX2 only"
)


@needs_gemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_gemm_against_the_oracle_on_hard_rows(dtype: torch.dtype) -> None:
    """Each row within the 8-bit bound of the fp32 oracle, for row counts that leave every
    tail of the kernel's 4-row blocks, and rows its 8-bit form could get wrong: one huge
    outlier (only its own 32 columns lose precision), a silent block, tiny values alone."""
    assert FP32 is not None
    n, k, group = 96, 1024, 128
    w = random_qweight(n, k, group, seed=12, bias=False)
    packed = packing.pack_for_kernel(w)
    dense = w.dequantize()
    gen = torch.Generator().manual_seed(6)
    for rows in (4, 5, 6, 7, 33):
        x = torch.randn(rows, k, generator=gen)
        x[0, 5] = 1e3
        x[1, 32:64] = 0.0
        x[2] *= 1e-30
        x = x.to(dtype)
        out = torch.empty(rows, n, dtype=dtype)
        FP32.gemm(x, packed, n, group, out)
        want = x.float() @ dense.t()
        # The outlier's block keeps the outlier alone (its 8-bit step, 1e3 / 127, rounds the
        # block's other values to 0); every other block of the row keeps its precision.
        kept = x[0].float().clone()
        kept[:32] = 0.0
        others = float((kept @ dense.t()).abs().max())
        kept[5] = x[0, 5].float()
        want0 = kept @ dense.t()
        bound = W4A8_REL_TOL * others
        if dtype == torch.bfloat16:  # the output's own rounding, at the outlier's magnitude
            bound += 2**-8 * float(want0.abs().max())
        assert float((out[0].float() - want0).abs().max()) < bound
        for row in range(1, rows):
            assert rel_err(out[row], want[row]) < W4A8_REL_TOL, (rows, row)


@needs_gemm
def test_prefill_rows_take_the_gemm_unless_kept_16_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """From `GEMM_MIN_ROWS` rows a cpu_fp32 layer calls the GEMM; `keep_16_bit_prefill` sends
    them back to the 16-bit decode kernel (and the dense switch), and survives fusing."""
    assert FP32 is not None
    calls: list[int] = []
    gemm = FP32.gemm
    monkeypatch.setattr(FP32, "gemm", lambda x, *a: calls.append(x.shape[0]) or gemm(x, *a))
    parts = [
        W4A16Linear.from_quantized(random_qweight(64, 256, 64, s), torch.float32, "cpu", "cpu_fp32")
        for s in (1, 2)
    ]
    x = torch.randn(qlinear.GEMM_MIN_ROWS, 256)
    parts[0](x[:-1])
    assert calls == []
    parts[0](x)
    assert calls == [qlinear.GEMM_MIN_ROWS]
    keep_16_bit_prefill(nn.Sequential(parts[0]))
    exact = parts[0](x)
    assert calls == [qlinear.GEMM_MIN_ROWS]
    assert rel_err(exact, x @ parts[0].dequantized().t() + parts[0].bias) < 1e-4
    fused = fuse_w4a16(parts)
    assert fused is not None
    fused(x)
    assert calls == [qlinear.GEMM_MIN_ROWS]


def test_avx512_kernel_declines_rows_not_in_tiles_of_16() -> None:
    assert not packing.fits(72, 128, 64)
    assert packing.fits(80, 128, 64)
    assert not packing.fits(64, 4096, 4096)  # group > 2048: int32 sums could overflow
    # PyTorch's int4 kernel needs N % 16 too: the reference dequantize path takes 72 rows.
    odd = W4A16Linear.from_quantized(random_qweight(72, 128, 64, 0), torch.bfloat16, "cpu")
    assert odd.backend == "dequant"
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert odd(x).shape == (3, 72)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_cuda_int4_matches_oracle(group: int) -> None:
    w = random_qweight(384, 1024, group, seed=group)
    layer = W4A16Linear.from_quantized(w, torch.bfloat16, "cuda")
    assert layer.backend == "cuda_int4"
    oracle = W4A16Linear.from_quantized(w, torch.float32, "cpu", "dequant")
    for rows in (1, 3, 17, 64):
        x = torch.randn(rows, 1024, dtype=torch.bfloat16)
        got = layer(x.cuda()).cpu()
        assert rel_err(got, oracle(x.float())) < BF16_REL_TOL


def tiny_args(
    hidden: int = 128, inter: int = 256, vocab: int = 512, tied: bool = False
) -> LlamaArgs:
    return LlamaArgs(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        rope_scaling=None,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )


def rtn_weights(model: Llama, group: int) -> dict[str, QuantizedWeight]:
    return {
        f"model.layers.{i}.{suffix}": rtn_quantize(
            model.get_submodule(f"model.layers.{i}.{suffix}").weight, group
        )
        for i in range(model.args.num_hidden_layers)
        for suffix in DECODER_LINEARS
    }


def run_prefill_and_decode(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], 32)
    with torch.inference_mode():
        prefill = model(cache, 0, input_ids=ids[:, :-2], last_only=False)
        step1 = model(cache, ids.shape[1] - 2, input_ids=ids[:, -2:-1])
        step2 = model(cache, ids.shape[1] - 1, input_ids=ids[:, -1:])
    return torch.cat((prefill, step1, step2), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_llama_logits_match_dequantized_model(backend: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    reference = Llama(tiny_args()).to(dtype).eval()
    weights = rtn_weights(reference, group=64)
    # Reference: the same model with the dequantized weights put back into nn.Linear.
    with torch.no_grad():
        for name, w in weights.items():
            reference.get_submodule(name).weight.copy_(w.dequantize(dtype))
    quantized = Llama(tiny_args()).to(dtype).eval()
    quantized.load_state_dict(reference.state_dict())
    quantize_model_linears(quantized, weights, dtype, "cpu", backend)
    assert all(isinstance(quantized.get_submodule(name), W4A16Linear) for name in weights)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    got = run_prefill_and_decode(quantized, ids)
    want = run_prefill_and_decode(reference, ids)
    # Per-layer bf16-level differences (see the module docstring) compound over two layers,
    # the norms and the head; logits still agree to 2e-2 of their range, and that error is
    # far below the gap between the top two logits, so the argmax is unchanged.
    assert rel_err(got, want) < BF16_REL_TOL
    if dtype == torch.float32 and backend == "dequant":
        assert rel_err(got, want) < 1e-4


def test_weight_bytes_ratio_for_linear_dominated_model() -> None:
    args = tiny_args(hidden=512, inter=1536, vocab=128, tied=True)
    model = Llama(args).to(torch.float16)
    fp16_bytes = weight_bytes(model)
    quantize_model_linears(model, rtn_weights(model, group=128), torch.bfloat16, "cpu")
    ratio = weight_bytes(model) / fp16_bytes
    assert ratio <= 0.3, ratio


def test_quantize_errors_name_the_module() -> None:
    model = Llama(tiny_args())
    good = rtn_quantize(model.model.layers[0].self_attn.q_proj.weight, 32)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj"):
        quantize_model_linears(
            model, {"model.layers.9.self_attn.q_proj": good}, torch.float32, "cpu"
        )
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*128x128"):
        quantize_model_linears(model, {"model.layers.0.mlp.up_proj": good}, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"expected nn\.Linear"):
        quantize_model_linears(model, {"model.norm": good}, torch.float32, "cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_projections_answer_like_separate_ones(backend: str) -> None:
    torch.manual_seed(0)
    model = Llama(tiny_args()).to(torch.bfloat16).eval()
    quantize_model_linears(model, rtn_weights(model, group=64), torch.bfloat16, "cpu", backend)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    separate = run_prefill_and_decode(model, ids)
    merged = model.fuse_projections(fuse_w4a16)
    if backend not in qlinear.NATIVE_BACKENDS:  # only the native layout concatenates along N
        assert merged == 0
        return
    assert merged == 2 * model.args.num_hidden_layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.out_features == 128 + 2 * 64
    assert not hasattr(mlp, "gate_proj") and mlp.gate_up_proj.out_features == 2 * 256
    # The prefill GEMM runs over a wider matrix (other blocking): bf16-level agreement.
    assert rel_err(run_prefill_and_decode(model, ids), separate) < BF16_REL_TOL


@pytest.mark.skipif(not (AVX512 or AVX2), reason="needs native kernels (AVX-512, AVX2, NEON)")
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in qlinear.NATIVE_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_layer_decode_rows_equal_the_concatenated_parts(
    backend: str, dtype: torch.dtype
) -> None:
    parts = [
        W4A16Linear.from_quantized(random_qweight(n, 256, 64, seed=n), dtype, "cpu", backend)
        for n in (128, 64, 64)
    ]
    fused = fuse_w4a16(parts)  # type: ignore[arg-type]
    assert fused is not None
    x = torch.randn(3, 256).to(dtype)
    # each output row is computed by the same kernel code from the same bytes (bias included)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
