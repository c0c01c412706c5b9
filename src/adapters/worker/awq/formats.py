"""The on-disk AWQ W4 packings of one linear layer -> the canonical `QuantizedWeight`.

Three packings exist in the wild for the same numbers `w = (q - z) * s`:

* llm-awq **v2** (TinyChat `*-w4-g128-awq-v2.pt`, AutoAWQ GEMVFast): `qweight` int16 [N/4, K] with
  a 4-row interleave and an in-block column shuffle, `scales` / `scaled_zeros` [Gp, N] where
  `scaled_zeros = -(s * z)` and Gp pads the group count (see `padded_group_count`).
* llm-awq **v1** = AutoAWQ **GEMV**: `qweight` int32 [N, K/8] in natural nibble order,
  `qzeros` int32 [N, Gp/8], `scales` [N, Gp].
* llm-awq **v0** = AutoAWQ **GEMM** = HF `version: gemm`: `qweight` int32 [K, N/8] and
  `qzeros` int32 [K/G, N/8] with nibble order [0,2,4,6,1,3,5,7], `scales` [K/G, N].

Serving only reads them (`checkpoint_reading.py` reads whole checkpoints). The packers and the
checkpoint writers, which only the offline tools use, live in
adapters/offline/awq_checkpoint_writing.py.

Everything is vectorised torch (no per-element Python loops) so that a 2560x6912 layer unpacks in
a fraction of a second. Every validation failure is an `AwqFormatError` (a `ValueError`) whose
message names the file (when known), the tensor and what was expected.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

LayerFormat = Literal["v2", "gemv", "gemm"]

# Nibble i of a GEMM int32 word holds column 8j + GEMM_ORDER[i] (the dequant-friendly order of
# AutoAWQ's CUDA kernel). The code realises it as a reshape: i = 4a + b <-> column 2b + a.
GEMM_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# llm-awq v2 packing parameters (`pack_intweight(..., interleave=4, kstride=64)`).
V2_INTERLEAVE = 4
V2_KSTRIDE = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Group sizes llm-awq's `calculate_zeros_width` knows; used to infer a file's group size.
_KNOWN_GROUP_SIZES = (128, 64, 32)


class AwqFormatError(ValueError):
    """A packed tensor that does not match its format. `tensor` is the offending tensor's name
    (short, e.g. `scales`, until a loader prefixes the module name and the file)."""

    def __init__(self, tensor: str, detail: str, file: Path | str | None = None) -> None:
        self.tensor = tensor
        self.detail = detail
        self.file = file
        where = f"{file}: " if file is not None else ""
        super().__init__(f"{where}tensor {tensor}: {detail}")

    def located(self, module: str, file: Path | str) -> AwqFormatError:
        """The same error with the module prefix and the file name filled in."""
        name = self.tensor if not module else f"{module}.{self.tensor}"
        return AwqFormatError(name, self.detail, file)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def padded_group_count(in_features: int, group_size: int) -> int:
    """Rows of llm-awq's padded `scales` (v2: [Gp, N]; v1/GEMV: columns of [N, Gp]).

    llm-awq's `calculate_zeros_width` is `m * ceil(ceil(G/8) / m)` words of 8 groups, with the
    multiplier m = 1 for group >= 128, 2 for g64 and 4 for g32; Gp is 8 times that. For g32, g64
    and g128 this works out to K padded up to a multiple of 1024 columns, divided by the group size
    (so e.g. K=2560: g128 -> 24, g64 -> 48, g32 -> 96).
    """
    if group_size >= 128:
        multiplier = 1
    elif group_size == 64:
        multiplier = 2
    elif group_size == 32:
        multiplier = 4
    else:
        raise ValueError(
            f"llm-awq padding is defined for group sizes 32, 64, >=128, not {group_size}"
        )
    words = math.ceil((in_features // group_size) / 8)
    words = math.ceil(words / multiplier) * multiplier
    return 8 * words


def _unpack_nibbles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[...] signed ints -> [..., bits/4] uint8 nibbles, lowest first.

    On little-endian hosts the words are reinterpreted as bytes (low byte first), which halves
    the work and avoids widening: ~4x faster than shifting the int16/int32 words.
    """
    if sys.byteorder == "little":
        raw = words.contiguous().view(torch.uint8).view(*words.shape, bits // 8)
        return torch.stack([raw & 0xF, raw >> 4], dim=-1).view(*words.shape, bits // 4)
    # The arithmetic shift smears the sign bit into the high bits; `& 0xF` discards them.
    return torch.stack(
        [((words >> (4 * m)) & 0xF).to(torch.uint8) for m in range(bits // 4)], dim=-1
    )


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _check_tensor(
    name: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
) -> None:
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise AwqFormatError(
            name, f"dtype is {str(tensor.dtype).removeprefix('torch.')}, expected {wanted} {shape}"
        )
    if _shape(tensor) != shape:
        raise AwqFormatError(name, f"shape is {_shape(tensor)}, expected {shape}")


def _check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise AwqFormatError(name, f"shape is {_shape(tensor)}, expected {layout}")


def _check_scales_values(name: str, scales: torch.Tensor) -> None:
    """AWQ scales are (max-min)/15 >= 0; NaN/Inf/negative means a corrupt or foreign file."""
    if not bool(torch.isfinite(scales).all()):
        raise AwqFormatError(name, "contains NaN or Inf, expected finite scales >= 0")
    if bool((scales < 0).any()):
        raise AwqFormatError(name, "contains negative values, expected scales >= 0")


def _check_group_size(in_features: int, group_size: int, tensor: str = "qweight") -> int:
    if group_size <= 0 or in_features % group_size:
        raise AwqFormatError(
            tensor,
            f"in_features {in_features} is not a multiple of group size {group_size}",
        )
    return in_features // group_size


# --------------------------------------------------------------------------------------------
# llm-awq v2 (TinyChat)
# --------------------------------------------------------------------------------------------


def unpack_v2(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    scaled_zeros: torch.Tensor,
    group_size: int,
    in_features: int | None = None,
    *,
    out_features: int | None = None,
) -> QuantizedWeight:
    """llm-awq v2 tensors -> canonical. Padding group rows are dropped; zeros are recovered as
    round(-scaled_zeros / scales) (0 where the scale is 0, where the product carries no zero)."""
    _check_ndim("scales", scales, 2, "[Gp, N]")
    _check_ndim("qweight", qweight, 2, "[N/4, K]")
    n = int(scales.shape[1]) if out_features is None else out_features
    k = int(qweight.shape[1]) if in_features is None else in_features
    if n % V2_INTERLEAVE or k % V2_KSTRIDE:
        raise AwqFormatError(
            "qweight", f"v2 needs out_features % 4 == 0 and in_features % 64 == 0, got N={n} K={k}"
        )
    groups = _check_group_size(k, group_size)
    padded = padded_group_count(k, group_size)
    _check_tensor("qweight", qweight, (n // V2_INTERLEAVE, k), (torch.int16,))
    _check_tensor("scales", scales, (padded, n), _FLOAT_DTYPES)
    _check_tensor("scaled_zeros", scaled_zeros, (padded, n), _FLOAT_DTYPES)

    s = scales[:groups].t().contiguous()  # [N, G]
    s32 = s.to(torch.float32)  # fp32 for the checks: fp16 isfinite/compare are slow on CPU
    _check_scales_values("scales", s32)
    sz = scaled_zeros[:groups].t().to(torch.float32)
    if not bool(torch.isfinite(sz).all()):
        raise AwqFormatError("scaled_zeros", "contains NaN or Inf, expected -(scale * zero)")
    safe = torch.where(s32 == 0, torch.ones_like(s32), s32)
    ratio = torch.where(s32 == 0, torch.zeros_like(sz), -sz / safe)
    zeros = torch.round(ratio)
    # A 16-bit product s*z loses a few bits; anything farther than that from an integer in
    # 0..15 is not an AWQ zero point (wrong tensor, wrong sign convention, or corruption).
    if bool(((ratio - zeros).abs() > 0.25).any()) or bool(((zeros < 0) | (zeros > 15)).any()):
        raise AwqFormatError(
            "scaled_zeros",
            "is not -(scale * zero) with an integer zero in 0..15 (zeros out of range)",
        )

    # Word j of row-group i, nibble m is tile position f = 4*(j % 64) + m of the row-major 4x64
    # tile (row r, column u) of rows 4i..4i+3, K-tile t. Within a 64-wide tile u = 32h + lane,
    # and lane (x, z, y) = 8x + 4z + y holds column 8y + 2x + z of that 32-block. All of this is
    # a single view + permute: [i, t, r, h, x, z, y] -> [i, r, t, h, y, x, z] = [n, k].
    nib = _unpack_nibbles(qweight, 16).view(n // 4, k // 64, 4, 2, 4, 2, 4)
    q = nib.permute(0, 2, 1, 3, 6, 4, 5).reshape(n, k)
    return QuantizedWeight(q=q, scales=s, zeros=zeros.to(torch.uint8), group_size=group_size)


# --------------------------------------------------------------------------------------------
# AutoAWQ GEMM (= HF `version: gemm` = llm-awq v0)
# --------------------------------------------------------------------------------------------


def unpack_gemm(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
) -> QuantizedWeight:
    """AutoAWQ GEMM tensors -> canonical. Shapes follow from `scales` [K/G, N] and the group
    size, so a truncated `qweight` is reported as such."""
    _check_ndim("scales", scales, 2, "[K/G, N]")
    _check_ndim("qweight", qweight, 2, "[K, N/8]")
    n = int(scales.shape[1]) if out_features is None else out_features
    k = int(scales.shape[0]) * group_size if in_features is None else in_features
    if n % 8:
        raise AwqFormatError("scales", f"GEMM needs out_features % 8 == 0, got N={n}")
    groups = _check_group_size(k, group_size)
    _check_tensor("qweight", qweight, (k, n // 8), (torch.int32,))
    _check_tensor("qzeros", qzeros, (groups, n // 8), (torch.int32,))
    _check_tensor("scales", scales, (groups, n), _FLOAT_DTYPES)
    _check_scales_values("scales", scales.to(torch.float32))

    # Nibble i = 4a + b of word j is output column 8j + GEMM_ORDER[i] = 8j + 2b + a, so view
    # the nibbles as [k, j, a, b] and permute to [j, b, a, k] = [n, k].
    q = _unpack_nibbles(qweight, 32).view(k, n // 8, 2, 4).permute(1, 3, 2, 0).reshape(n, k)
    zeros = _unpack_nibbles(qzeros, 32).view(groups, n // 8, 2, 4)
    zeros = zeros.permute(1, 3, 2, 0).reshape(n, groups)
    return QuantizedWeight(q=q, scales=scales.t().contiguous(), zeros=zeros, group_size=group_size)


# --------------------------------------------------------------------------------------------
# AutoAWQ GEMV (= llm-awq v1)
# --------------------------------------------------------------------------------------------


def unpack_gemv(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_features: int,
    *,
    out_features: int | None = None,
) -> QuantizedWeight:
    """AutoAWQ GEMV / llm-awq v1 tensors -> canonical (padding groups dropped). `in_features`
    is needed because the padded `scales` width does not pin K down."""
    _check_ndim("scales", scales, 2, "[N, Gp]")
    n = int(scales.shape[0]) if out_features is None else out_features
    k = in_features
    if k % 8:
        raise AwqFormatError("qweight", f"GEMV needs in_features % 8 == 0, got K={k}")
    groups = _check_group_size(k, group_size)
    padded = padded_group_count(k, group_size)
    _check_tensor("qweight", qweight, (n, k // 8), (torch.int32,))
    _check_tensor("qzeros", qzeros, (n, padded // 8), (torch.int32,))
    _check_tensor("scales", scales, (n, padded), _FLOAT_DTYPES)
    s = scales[:, :groups].contiguous()
    _check_scales_values("scales", s.to(torch.float32))

    q = _unpack_nibbles(qweight, 32).reshape(n, k).contiguous()
    zeros = _unpack_nibbles(qzeros, 32).reshape(n, padded)[:, :groups].contiguous()
    return QuantizedWeight(q=q, scales=s, zeros=zeros, group_size=group_size)


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def _quant_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Accepts a whole HF config (with `quantization_config`) or the quantization config."""
    if not config:
        return {}
    inner = config.get("quantization_config")
    return inner if isinstance(inner, Mapping) else config


def detect_layer_format(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> LayerFormat:
    """Which packing one layer's tensors (`qweight`, `scales`, `qzeros` / `scaled_zeros`) use.

    `quantization_config.version` wins when given (square layers are otherwise ambiguous by
    `qweight` alone); else int16 + `scaled_zeros` -> v2, and for int32 the `scales` shape
    decides: [N, Gp] sharing qweight's rows -> gemv, [G, N] with N = 8 * qweight cols -> gemm.
    """
    version = str(_quant_config(config).get("version", "") or "").lower()
    if version == "gemm":
        return "gemm"
    if version == "gemv":
        return "gemv"
    if version in ("gemv_fast", "v2"):
        return "v2"
    qweight, scales = tensors.get("qweight"), tensors.get("scales")
    if qweight is None or scales is None:
        missing = "qweight" if qweight is None else "scales"
        raise AwqFormatError(missing, "is missing, expected qweight + scales (+ zeros)")
    if qweight.dtype == torch.int16 or "scaled_zeros" in tensors:
        return "v2"
    if qweight.dim() != 2 or scales.dim() != 2:
        raise AwqFormatError("qweight", f"shape is {_shape(qweight)}, expected a 2-D packed tensor")
    as_gemv = scales.shape[0] == qweight.shape[0] and scales.shape[1] != 8 * qweight.shape[1]
    as_gemm = scales.shape[1] == 8 * qweight.shape[1] and scales.shape[0] != qweight.shape[0]
    if as_gemv == as_gemm:
        raise AwqFormatError(
            "scales",
            f"shape {_shape(scales)} with qweight {_shape(qweight)} fits neither GEMV "
            "([N, Gp] with qweight [N, K/8]) nor GEMM ([K/G, N] with qweight [K, N/8]); "
            "set quantization_config.version",
        )
    return "gemv" if as_gemv else "gemm"


# --------------------------------------------------------------------------------------------
# One layer's tensors, whatever the packing
# --------------------------------------------------------------------------------------------


def _candidate_group_sizes(in_features: int, padded: int, hint: int) -> list[int]:
    """Group sizes whose llm-awq padding gives `padded` rows for this K, the hint first.

    TinyChat files carry no group-size metadata; for g32/g64/g128 the padded count is unique
    per K (K padded to 1024 columns / G), so a g32 file read with the g128 default still works.
    """
    found = []
    for g in (hint, *[g for g in _KNOWN_GROUP_SIZES if g != hint]):
        if g <= 0 or in_features % g:
            continue
        try:
            if padded_group_count(in_features, g) == padded:
                found.append(g)
        except ValueError:
            continue
    return found


def unpack_layer(
    fmt: LayerFormat,
    parts: Mapping[str, torch.Tensor],
    group_size: int,
    expected: tuple[int, int] | None,
    infer_group: bool,
) -> QuantizedWeight:
    """One module's tensors -> canonical, shapes checked against `expected` (N, K) if given."""
    zeros_name = "scaled_zeros" if fmt == "v2" else "qzeros"
    for name in ("qweight", "scales", zeros_name):
        if name not in parts:
            raise AwqFormatError(name, f"is missing, expected the {fmt} tensor {name}")
    qweight, scales, zeros = parts["qweight"], parts["scales"], parts[zeros_name]
    n, k = expected if expected is not None else (None, None)

    if fmt == "v2":
        _check_ndim("qweight", qweight, 2, "[N/4, K]")
        _check_ndim("scales", scales, 2, "[Gp, N]")
        k_eff = k if k is not None else int(qweight.shape[1])
        if infer_group:
            fits = _candidate_group_sizes(k_eff, int(scales.shape[0]), group_size)
            group_size = fits[0] if fits else group_size
        w = unpack_v2(qweight, scales, zeros, group_size, k_eff, out_features=n)
    elif fmt == "gemv":
        _check_ndim("qweight", qweight, 2, "[N, K/8]")
        _check_ndim("scales", scales, 2, "[N, Gp]")
        k_eff = k if k is not None else 8 * int(qweight.shape[1])
        if infer_group:
            fits = _candidate_group_sizes(k_eff, int(scales.shape[1]), group_size)
            group_size = fits[0] if fits else group_size
        w = unpack_gemv(qweight, zeros, scales, group_size, k_eff, out_features=n)
    else:
        _check_ndim("qweight", qweight, 2, "[K, N/8]")
        _check_ndim("scales", scales, 2, "[K/G, N]")
        if infer_group and scales.shape[0] > 0:
            k_eff = k if k is not None else int(qweight.shape[0])
            if k_eff % int(scales.shape[0]) == 0:
                group_size = k_eff // int(scales.shape[0])
        w = unpack_gemm(qweight, zeros, scales, group_size, in_features=k, out_features=n)

    bias = parts.get("bias")
    if bias is not None:
        _check_tensor("bias", bias, (w.out_features,), _FLOAT_DTYPES)
        w = QuantizedWeight(w.q, w.scales, w.zeros, w.group_size, bias)
    return w
