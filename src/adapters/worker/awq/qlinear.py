"""W4A16 linear layers: 4-bit weights packed once for PyTorch's int4 kernels, 16-bit activations.

`W4A16Linear.from_quantized` packs a canonical `QuantizedWeight` (`w = (q - z) * s`) for one of:

* ``cpu_avx512`` -- our AVX-512 VNNI kernel (adapters/worker/cpu_kernels) for decode, streaming
  the packed weights at memory speed; from `AVX512_PREFILL_MIN_ROWS` rows it dequantizes into a
  reused per-thread buffer and runs one dense GEMM. Needs N % 16, K % 64, group % 64 == 0,
  group <= 2048.
* ``cpu_fp32``   -- our AVX2 / NEON kernel (fp32_kernels.c: the same packed layout and integer
  numerics, `vpmaddubsw` or `sdot` instead of VNNI) with fp32 or bf16 activations, for CPUs
  that only emulate bf16. On AVX2, from `GEMM_MIN_ROWS` rows, the W4A8 GEMM (prefill_gemm.c:
  activations in 8 bits per 32 columns, as llama.cpp's prefill); elsewhere, from
  `FP32_PREFILL_MIN_ROWS` rows it dequantizes into the reused buffer and runs one dense GEMM.
  Same shape rules.
* ``cpu_int4``  -- `aten._weight_int4pack_mm_for_cpu` for decode (few rows); many-row calls
  (prefill) dequantize the packed weight to 16 bits once per call and run a dense GEMM.
* ``cuda_int4`` -- tinygemm (`aten._weight_int4pack_mm`, bf16 only, inner_k_tiles 8).
* ``dequant``   -- the reference: dequantize, then `F.linear`. Always available; the test oracle.

Both ATen int4 kernels dequantize tinygemm-style, `(q - 8) * scale + zero`, so AWQ's integer zero
point becomes the float `zero = (8 - z) * s`. Everything is packed at construction so that the
decode call is a reshape, one kernel call and (only for non-bf16 models) two casts.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.cpu_kernels import packing
from vilaserve.adapters.worker.torch_vila.device import apply_keeping_dtypes

BACKENDS = ("auto", "cpu_avx512", "cpu_fp32", "cpu_int4", "cuda_int4", "dequant")
NATIVE_BACKENDS = ("cpu_avx512", "cpu_fp32")

# Rows from which the AVX-512 path dequantizes + runs one dense GEMM. Measured on the shared
# 2-core EPYC (2 threads, g128, bf16, reused dequant buffer), ms per call, kernel | dequant+GEMM:
#   2560x2560  M=8: 0.55 | 1.07   M=32: 2.2 | 1.8   M=64: 4.3 | 2.6   M=128: 8.8 | 5.1
#   6912x2560  M=8: 1.6 | 3.0     M=32: 5.9 | 5.2   M=64: 11.6 | 8.0  M=128: 23 | 13
AVX512_PREFILL_MIN_ROWS = 24
# The same switch for the fp32 kernels (AVX2 / NEON). Measured on an AVX2-only 2-core EPYC (2
# threads, g128, fp32 activations), ms per call, kernel | dequantize to fp32 + sgemm:
#   2560x2560  M=16: 1.5 | 6.2   M=64: 11 | 14   M=128: 17 | 18   M=256: 28 | 29   M=512: 65 | 51
#   6912x2560  M=16: 5.7 | 25    M=64: 21 | 40   M=128: 40 | 59   M=256: 72 | 83   M=512: 143 | 141
# Writing a 4-byte dequantized weight costs as much as the integer kernel's extra work per row up
# to a few hundred rows, so the switch sits where the two meet: no cliff at any row count.
FP32_PREFILL_MIN_ROWS = 256
# Rows from which the AVX2 build runs the W4A8 GEMM instead of the decode kernel. Measured on the
# AVX2-only 2-core EPYC (2 threads, g128, fp32 activations), GMAC/s, decode kernel | GEMM:
#   2560x2560  M=2: 46 | 42   M=4: 53 | 80   M=8: 53 | 89   M=64: 63 | 150   M=256: 71 | 150
#   6912x2560  M=2: 54 | 46   M=4: 57 | 80   M=8: 54 | 89   M=64: 74 | 150   M=256: 73 | 156
# The decode kernel re-unpacks a tile's nibbles for each row and multiplies 16-bit activations in
# two byte halves; the GEMM unpacks once per call and needs one `vpmaddubsw` per 32 products.
GEMM_MIN_ROWS = 4
_NEVER = 1 << 62

# Rows from which the CPU path dequantizes + runs one dense GEMM instead of the int4 kernel.
# Measured on the shared 2-core EPYC (AVX-512, torch 2.13, 1 thread, g128, bf16), ms per call,
# int4 kernel | dequant + bf16 GEMM:
#   2560x2560  M=64: 9.9 | 11.7    M=128: 19.4 | 16.4    M=256: 39.0 | 24.1   M=512: 78 | 41
#   6912x2560  M=64: 40 | 98       M=128: 80 | 102       M=256: 158 | 134     M=512: 314 | 194
# The int4 kernel's cost grows linearly in M (it re-unpacks weights per row tile), while the
# dequant is a fixed 6-60 ms (page faults on the fresh [K, N] buffer dominate for big layers).
# So M=64 stays on the int4 kernel and the dense path wins from ~128-256 rows.
PREFILL_MIN_ROWS = 128
# tinygemm's K tile count: K must be a multiple of 16 * inner_k_tiles; 8 is the fastest layout.
_CUDA_INNER_K_TILES = (8, 4, 2)
_TINYGEMM_MID = 8


class W4A16Linear(nn.Module):
    """y = x @ dequant(W).T + b with W stored as packed 4-bit integers plus group scales.

    Buffers are non-persistent: the packed layout is backend- and machine-specific, so it is
    never checkpoint state (checkpoints hold the canonical `QuantizedWeight`).
    """

    weight: Tensor  # backend-specific packed int4 (dequant backend: uint8 q [N, K])
    scales_and_zeros: Tensor  # int4 backends: [K // group, N, 2] (scale, tinygemm zero)
    prefill_scales: Tensor | None  # [K // group, N] scale / offset for the CPU dequant path,
    prefill_offsets: Tensor | None  # only when they differ from scales_and_zeros (fp32 models)
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        backend: str,
        compute_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.backend = backend
        self.compute_dtype = compute_dtype
        # The dtype the GEMM runs in: the CPU int4 kernel is ~30x slower (scalar fallback) in
        # fp32/fp16 than in bf16 on this build, and tinygemm on CUDA takes bf16 only.
        self.kernel_dtype = torch.bfloat16 if backend != "dequant" else compute_dtype
        # Dense dtype for the CPU prefill GEMM: bf16 for bf16 models, fp32 otherwise (exact for
        # fp32 models; fp16 GEMM has no fast path on most CPUs).
        self.prefill_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
        self._prefill_block: int | None = None  # CPU packing block along N, if understood
        self._impl: Callable[[Tensor], Tensor] = self._forward_dequant

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(
        cls,
        w: QuantizedWeight,
        compute_dtype: torch.dtype,
        device: torch.device | str,
        backend: str = "auto",
    ) -> W4A16Linear:
        device = torch.device(device)
        chosen = resolve_backend(backend, device)
        shape = (w.out_features, w.in_features, w.group_size)
        if backend == "auto" and chosen in NATIVE_BACKENDS and not packing.fits(*shape):
            chosen = "cpu_int4" if cpu_int4_available() else "dequant"
        if backend == "auto" and chosen == "cpu_int4" and not cpu_int4_fits(*shape):
            chosen = "dequant"
        backend = chosen
        layer = cls(w.in_features, w.out_features, w.group_size, backend, compute_dtype)
        if backend == "dequant":
            layer._pack_dequant(w, device)
        elif backend == "cpu_avx512":
            layer._pack_avx512(w, device)
        elif backend == "cpu_fp32":
            layer._pack_fp32(w, device)
        elif backend == "cpu_int4":
            layer._pack_cpu(w, device)
        else:
            layer._pack_cuda(w, device)
        bias = None if w.bias is None else w.bias.to(device=device, dtype=compute_dtype)
        layer.register_buffer("bias", bias, persistent=False)
        return layer

    def _pack_dequant(self, w: QuantizedWeight, device: torch.device) -> None:
        self.register_buffer("weight", w.q.to(device=device, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales", w.scales.to(device, torch.float32), persistent=False)
        self.register_buffer("zeros", w.zeros.to(device, torch.uint8), persistent=False)
        self._impl = self._forward_dequant

    def _pack_avx512(self, w: QuantizedWeight, device: torch.device) -> None:
        kernel = cpu_kernels.avx512_kernels()
        if device.type != "cpu" or kernel is None:
            raise ValueError(
                f"cpu_avx512 needs an AVX-512 BF16 + VNNI CPU and a C compiler ({device})"
            )
        self._adopt_native(packing.pack_for_kernel(w), kernel)

    def _pack_fp32(self, w: QuantizedWeight, device: torch.device) -> None:
        # The build of this process's path (a forced `neon` stays `neon`), else this CPU's best.
        kernel = cpu_kernels.load_fp32() or cpu_kernels.fp32_kernels()
        if device.type != "cpu" or kernel is None:
            raise ValueError(
                f"cpu_fp32 needs an AVX2 + FMA + F16C or NEON CPU and a C compiler ({device})"
            )
        self._adopt_native(packing.pack_for_kernel(w), kernel)

    def _adopt_native(self, packed: packing.PackedInt4, kernel: cpu_kernels.NativeKernels) -> None:
        """Takes the packed layout both native kernels read (AVX-512, and fp32 on AVX2/NEON)."""
        self.register_buffer("weight", packed.weight, persistent=False)
        self.register_buffer("kernel_scales", packed.scales, persistent=False)
        self.register_buffer("kernel_zeros", packed.zeros, persistent=False)
        self._kernel = kernel
        self._packed = packed
        # Decode output: bf16 for bf16 models; fp32 otherwise (cast once in `_finish`).
        self._decode_out_dtype = (
            torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        )
        # The AVX-512 kernel reads bf16 rows; the fp32 one reads fp32 or bf16 as they come.
        self._decode_in_dtypes = (
            (torch.bfloat16,) if self.backend == "cpu_avx512" else (torch.float32, torch.bfloat16)
        )
        self._prefill_min_rows = (
            AVX512_PREFILL_MIN_ROWS if self.backend == "cpu_avx512" else FP32_PREFILL_MIN_ROWS
        )
        # The AVX2 build's W4A8 GEMM takes every call from a handful of rows (before the
        # dequantize + dense GEMM switch, which it outruns at every row count).
        has_gemm = isinstance(kernel, cpu_kernels.Fp32Kernels) and kernel.has_gemm
        self._gemm_min_rows = GEMM_MIN_ROWS if has_gemm else _NEVER
        self._impl = self._forward_native

    def keep_16_bit_prefill(self) -> None:
        """Prefill without the W4A8 GEMM: the decode kernel's 16-bit activations for few rows,
        a dequantize + dense GEMM for many (exact to fp32 rounding in fp32 models)."""
        self._gemm_min_rows = _NEVER

    def native_layout(self, dtype: torch.dtype) -> packing.PackedInt4 | None:
        """The packed weight a native decoder reads: the AVX-512 one (bf16) for bf16 layers on
        that backend, the fp32 one for fp32 layers on the fp32 (AVX2 / NEON) backend."""
        wanted = {torch.bfloat16: "cpu_avx512", torch.float32: "cpu_fp32"}.get(dtype)
        if self.backend != wanted or self.compute_dtype != dtype:
            return None
        return self._packed

    def _pack_cpu(self, w: QuantizedWeight, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"cpu_int4 needs a CPU device, got {device}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            w.q.to(torch.int32).contiguous(), 1
        )
        self.register_buffer("weight", packed, persistent=False)
        scales, zeros = _tinygemm_scales_zeros(w)
        self.register_buffer(
            "scales_and_zeros",
            torch.stack((scales, zeros), dim=-1).to(torch.bfloat16).contiguous(),
            persistent=False,
        )
        # The prefill dequant reads the packed layout directly (no second copy of the weight);
        # that layout is an ATen internal, so it is probed once and otherwise not used.
        block = _cpu_pack_block()
        self._prefill_block = block if block and w.out_features % block == 0 else None
        if self._prefill_block is not None and self.prefill_dtype != torch.bfloat16:
            # fp32 models: keep exact fp32 scale/offset for prefill (the bf16 copy rounds them).
            offsets = zeros - _TINYGEMM_MID * scales  # = -z * s, so w = q * s + offset
            for name, t in (("prefill_scales", scales), ("prefill_offsets", offsets)):
                self.register_buffer(name, _block_major(t, block), persistent=False)
        else:
            self.prefill_scales = None
            self.prefill_offsets = None
        self._impl = self._forward_cpu

    def _pack_cuda(self, w: QuantizedWeight, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"cuda_int4 needs a CUDA device, got {device}")
        k = w.in_features
        tiles = next((t for t in _CUDA_INNER_K_TILES if k % (16 * t) == 0), None)
        if tiles is None or w.out_features % 8 or w.group_size not in (32, 64, 128, 256):
            raise ValueError(
                f"tinygemm needs K % 32 == 0, N % 8 == 0 and group 32/64/128/256; got "
                f"N={w.out_features}, K={k}, group={w.group_size}"
            )
        q = w.q.to(device=device, dtype=torch.int32)
        # tinygemm's input: two 4-bit values per byte, even column in the high nibble.
        nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), tiles)
        self.register_buffer("weight", packed, persistent=False)
        scales, zeros = _tinygemm_scales_zeros(w)
        sz = torch.stack((scales, zeros), dim=-1).to(device=device, dtype=torch.bfloat16)
        self.register_buffer("scales_and_zeros", sz.contiguous(), persistent=False)
        self._impl = self._forward_cuda

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        return self._impl(x)

    def _forward_cpu(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= PREFILL_MIN_ROWS and self._prefill_block is not None:
            out = self._prefill_cpu(rows)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros
            )
        return self._finish(out, x)

    def _forward_native(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        n, g, m = self.out_features, self.group_size, rows.shape[0]
        if self._prefill_min_rows <= m < self._gemm_min_rows:
            w = _dequant_buffer(n, self.in_features, self.prefill_dtype)
            self._kernel.dequantize(self._packed, n, self.in_features, g, w)
            out = torch.mm(rows.to(self.prefill_dtype), w.t())
        else:
            if rows.dtype not in self._decode_in_dtypes:
                rows = rows.to(self._decode_in_dtypes[0])
            rows = rows.contiguous()  # a no-op on the decode path
            out = torch.empty(m, n, dtype=self._decode_out_dtype)
            if m >= self._gemm_min_rows:
                self._kernel.gemm(rows, self._packed, n, g, out)  # type: ignore[union-attr]
            else:
                self._kernel.matmul(rows, self._packed, n, g, out)
        return self._finish(out, x)

    def _forward_cuda(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm(
            rows, self.weight, self.group_size, self.scales_and_zeros
        )
        return self._finish(out, x)

    def _forward_dequant(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantized(self.compute_dtype), self.bias)

    def _finish(self, out: Tensor, x: Tensor) -> Tensor:
        out = out.to(self.compute_dtype)  # no-op (returns `out`) for bf16 models
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ dequantization
    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [N, K] weight this layer multiplies by (for tests and the reference path)."""
        g = self.group_size
        if self.backend == "dequant":
            scales = self.scales.repeat_interleave(g, dim=1)
            zeros = self.zeros.to(torch.float32).repeat_interleave(g, dim=1)
            return ((self.weight.to(torch.float32) - zeros) * scales).to(dtype)
        if self.backend in NATIVE_BACKENDS:
            w = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
            self._kernel.dequantize(self._packed, self.out_features, self.in_features, g, w)
            return w.to(dtype)
        if self.backend == "cpu_int4" and self._prefill_block is not None:
            blocks = self._dequant_cpu_blocks()  # [N / block, K, block]
            return blocks.permute(0, 2, 1).reshape(self.out_features, -1).to(dtype)
        # Multiplying by the identity makes the kernel itself report what it computes. The
        # backend's own kernel, not `_impl`: a caller may have pointed `_impl` at
        # `_forward_dequant` (the reference oracle), which asks this method.
        kernel = self._forward_cuda if self.backend == "cuda_int4" else self._forward_cpu
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=torch.bfloat16)
        saved, self.bias = self.bias, None
        try:
            return kernel(eye).to(dtype).t().contiguous()
        finally:
            self.bias = saved

    def _dequant_cpu_blocks(self) -> Tensor:
        """W.T as [N / block, K, block] in the prefill dtype, unpacked from the CPU int4 layout.

        The packer stores N in blocks of `block` rows; for block b, column k, byte j holds row
        b*block + j in its low nibble and row b*block + block/2 + j in its high nibble. Keeping
        that block-major order (and multiplying block-wise) makes every pass here contiguous:
        unpacking into a [K, N] matrix instead was 2.6x slower (13 ms vs 5 ms at 2560x2560).
        """
        block = self._prefill_block
        assert block is not None
        k, n = self.in_features, self.out_features
        packed = self.weight.view(n // block, k, block // 2)
        # uint8 unpack, then one vectorized widening copy (mixed-dtype addcmul was 3x slower).
        w = torch.cat((packed & 15, packed >> 4), dim=-1).to(self.prefill_dtype)
        groups = w.view(n // block, k // self.group_size, self.group_size, block)
        scales, offsets = self._prefill_affine()
        groups.mul_(scales).add_(offsets)
        return w

    def _prefill_affine(self) -> tuple[Tensor, Tensor]:
        """Scale and offset [N / block, K / group, 1, block] with w = q * scale + offset."""
        if self.prefill_scales is not None and self.prefill_offsets is not None:
            return self.prefill_scales, self.prefill_offsets
        scales = self.scales_and_zeros[..., 0]
        return _block_major(scales, self._prefill_block), _block_major(
            self.scales_and_zeros[..., 1] - _TINYGEMM_MID * scales, self._prefill_block
        )

    def _prefill_cpu(self, rows: Tensor) -> Tensor:
        w = self._dequant_cpu_blocks()  # [N / block, K, block]
        # One [K, N] copy then a single GEMM: a batched GEMM over the 64-wide blocks avoided
        # the copy but ran 2-3x slower than MKL's one big GEMM for M >= 128.
        w_t = w.permute(1, 0, 2).reshape(self.in_features, self.out_features)
        return torch.mm(rows.to(self.prefill_dtype), w_t)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> W4A16Linear:
        # `model.to(dtype)` would cast the packed scales (and break the kernels' dtype
        # contracts); follow device moves only, keep every buffer's dtype.
        apply_keeping_dtypes(self, fn, recurse)
        if self.backend in NATIVE_BACKENDS:
            self._packed = packing.PackedInt4(self.weight, self.kernel_scales, self.kernel_zeros)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, backend={self.backend}, "
            f"compute_dtype={self.compute_dtype}, bias={self.bias is not None}"
        )


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Maps "auto" to the fastest backend for `device`; checks an explicit choice is usable."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown W4A16 backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda_int4"
        if device.type == "cpu" and cpu_kernels.load() is not None:
            return "cpu_avx512"
        if device.type == "cpu" and cpu_kernels.load_fp32() is not None:
            return "cpu_fp32"
        if device.type == "cpu" and cpu_int4_available():
            return "cpu_int4"
        return "dequant"
    if backend == "cpu_avx512" and cpu_kernels.avx512_kernels() is None:
        raise ValueError(
            "the AVX-512 BF16 + VNNI kernels cannot run here (CPU or C compiler missing)"
        )
    if backend == "cpu_fp32" and cpu_kernels.fp32_kernels() is None:
        raise ValueError(
            "the fp32 kernels (AVX2 + FMA + F16C, or NEON) cannot run here (CPU or C compiler)"
        )
    if backend == "cpu_int4" and not cpu_int4_available():
        raise ValueError("this torch build has no _weight_int4pack_mm_for_cpu")
    return backend


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def cpu_int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The shapes PyTorch's CPU int4 kernels accept (its packer and matmul check these)."""
    return (
        out_features % 16 == 0
        and group_size in (32, 64, 128, 256)
        and in_features % group_size == 0
    )


_dequant_buffers = threading.local()


def _dequant_buffer(n: int, k: int, dtype: torch.dtype) -> Tensor:
    """A [N, K] scratch for the prefill dequant, reused per thread (fresh buffers of tens of MB
    cost more in page faults than the dequant itself). The GEMM reads it before returning."""
    key = f"buf_{dtype}"
    buf: Tensor | None = getattr(_dequant_buffers, key, None)
    if buf is None or buf.numel() < n * k:
        buf = torch.empty(n * k, dtype=dtype)
        setattr(_dequant_buffers, key, buf)
    return buf[: n * k].view(n, k)


def _tinygemm_scales_zeros(w: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """fp32 [K // group, N] scales and tinygemm zeros, so (q - 8) * s + zero == (q - z) * s."""
    scales = w.scales.to(torch.float32)
    zeros = (_TINYGEMM_MID - w.zeros.to(torch.float32)) * scales
    return scales.t().contiguous(), zeros.t().contiguous()


def _block_major(t: Tensor, block: int | None) -> Tensor:
    """[K / group, N] -> [N / block, K / group, 1, block], contiguous, to broadcast per group."""
    assert block is not None
    groups, n = t.shape
    return t.view(groups, n // block, block).permute(1, 0, 2)[:, :, None, :].contiguous()


@functools.cache
def _cpu_pack_block() -> int | None:
    """The N block of `_convert_weight_to_int4pack_for_cpu`'s layout on this machine, or None.

    The layout depends on the CPU capability the kernel was dispatched for (and may change
    between torch versions), so pack a matrix whose entries encode their own row and check.
    """
    if not cpu_int4_available():
        return None
    n, k = 128, 64
    rows = torch.arange(n, dtype=torch.int32)[:, None].expand(n, k)
    cols = torch.arange(k, dtype=torch.int32)[None, :].expand(n, k)
    probes = ((rows * 7 + cols * 3) % 16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probes, 1)
    for block in (64, 32, 16):
        half = block // 2
        view = packed.reshape(n // block, k, half).permute(0, 2, 1)  # [N/block, half, K]
        unpacked = torch.cat((view & 15, view >> 4), dim=1).reshape(n, k)
        if torch.equal(unpacked.to(torch.int32), probes):
            return block
    return None


def quantize_model_linears(
    model: nn.Module,
    weights: Mapping[str, QuantizedWeight],
    compute_dtype: torch.dtype,
    device: torch.device | str,
    backend: str = "auto",
) -> None:
    """Replaces each `nn.Linear` named in `weights` by a `W4A16Linear` (in place).

    Names are module paths (`model.layers.0.self_attn.q_proj`). A Linear's own bias is kept
    when its `QuantizedWeight` carries none. Raises ValueError naming the first module that
    is missing, is not a Linear, or whose shape disagrees.
    """
    for name, w in weights.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as err:
            raise ValueError(f"{name}: no such module in {type(model).__name__}") from err
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name}: expected nn.Linear, found {type(old).__name__}")
        if (old.out_features, old.in_features) != (w.out_features, w.in_features):
            raise ValueError(
                f"{name}: quantized weight is {w.out_features}x{w.in_features}, "
                f"the module is {old.out_features}x{old.in_features}"
            )
        if w.bias is None and old.bias is not None:
            w = QuantizedWeight(w.q, w.scales, w.zeros, w.group_size, old.bias.detach())
        setattr(parent, child, W4A16Linear.from_quantized(w, compute_dtype, device, backend))


def fuse_w4a16(parts: list[nn.Module]) -> W4A16Linear | None:
    """One native-kernel layer computing the parts' outputs side by side, or None to decline.

    Merging q/k/v (and gate/up) saves kernel launches per decode step; the packed layout is
    tiled by 16 output rows, so concatenating the parts' buffers along N is the merged layer.
    Other backends decline: their packings are not row-concatenable (or they gain nothing).
    """
    layers = [p for p in parts if isinstance(p, W4A16Linear) and p.backend in NATIVE_BACKENDS]
    shared = {(p.in_features, p.group_size, p.compute_dtype, p.backend) for p in layers}
    if len(layers) != len(parts) or len(shared) != 1:
        return None
    first = layers[0]
    fused = W4A16Linear(
        first.in_features,
        sum(p.out_features for p in layers),
        first.group_size,
        first.backend,
        first.compute_dtype,
    )
    packed = packing.PackedInt4(
        torch.cat([p.weight for p in layers]),
        torch.cat([p.kernel_scales for p in layers]),
        torch.cat([p.kernel_zeros for p in layers]),
    )
    fused._adopt_native(packed, first._kernel)
    if any(p._gemm_min_rows == _NEVER for p in layers):
        fused.keep_16_bit_prefill()
    biases = [p.bias for p in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b if b is not None else torch.zeros(p.out_features, dtype=p.compute_dtype)
             for b, p in zip(biases, layers, strict=True)]
        )  # fmt: skip
    fused.register_buffer("bias", bias, persistent=False)
    return fused


def keep_16_bit_prefill(model: nn.Module) -> int:
    """`W4A16Linear.keep_16_bit_prefill` on every layer of `model`; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    for layer in layers:
        layer.keep_16_bit_prefill()
    return len(layers)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by all parameters and buffers (tied/shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
