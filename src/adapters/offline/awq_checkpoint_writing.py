"""Writing AWQ W4 checkpoints, for the offline tools (`vilaserve quantize`, the test fixtures):
canonical `QuantizedWeight`s packed into llm-awq v2, AutoAWQ GEMM or GEMV, and saved as TinyChat's
`*-awq-v2.pt` or a Hugging Face AWQ folder. The packings are described, and read back for
serving, in adapters/worker/awq/formats.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vilaserve.adapters.worker.awq.formats import V2_INTERLEAVE, V2_KSTRIDE, padded_group_count
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

# --------------------------------------------------------------------------------------------
# One layer, canonical -> each packing
# --------------------------------------------------------------------------------------------


def _pack_nibbles(nibbles: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., bits/4] values 0..15 (any strides) -> [...] signed ints, nibble m at bits 4m..4m+3.

    The top nibble may set the sign bit, as in the reference packers (which OR nibbles into
    signed ints). On a little-endian host two nibbles make a byte and the bytes are read back
    as one word: a few byte-wide passes instead of a shift and an OR per nibble in int64 (the
    demo build packs 100M weights: 40 s the nibble-wise way on two busy cores).
    """
    signed = torch.int16 if bits == 16 else torch.int32
    if sys.byteorder == "little":
        pairs = nibbles.to(torch.uint8).reshape(*nibbles.shape[:-1], bits // 8, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)  # nibble 2j low, 2j+1 high in byte j
        return packed.contiguous().view(signed).squeeze(-1)
    # Accumulate in int32 for 16-bit words and int64 for 32-bit ones (the top nibble of an
    # int32 word would overflow), then reinterpret as the signed type.
    wide = torch.int32 if bits == 16 else torch.int64
    words = nibbles[..., 0].to(wide)
    for m in range(1, bits // 4):
        words |= nibbles[..., m].to(wide) << (4 * m)
    words = torch.where(words >= (1 << (bits - 1)), words - (1 << bits), words)
    return words.to(signed)


def _with_bias(packed: dict[str, torch.Tensor], w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Every packing stores the layer's bias as is, beside its packed tensors."""
    if w.bias is not None:
        packed["bias"] = w.bias
    return packed


def pack_v2(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Canonical -> llm-awq v2 (`WQLinear.from_linear` / `pack_intweight(interleave=4,
    kstride=64)`), byte-identical to the reference packer. Scales keep `w.scales`' dtype."""
    n, k = w.out_features, w.in_features
    if n % V2_INTERLEAVE or k % V2_KSTRIDE:
        raise ValueError(f"v2 needs out_features % 4 == 0 and in_features % 64 == 0, got {n}x{k}")
    groups = k // w.group_size
    padded = padded_group_count(k, w.group_size)

    # The inverse of the view in `unpack_v2`: column k = 64t + 32h + 8y + 2x + z of row
    # n = 4i + r goes to word (i, t, r, h, x, z), nibble y.
    tiles = w.q.reshape(n // 4, 4, k // 64, 2, 4, 4, 2).permute(0, 2, 1, 3, 5, 6, 4)
    qweight = _pack_nibbles(tiles, 16).reshape(n // 4, k).contiguous()

    dtype = w.scales.dtype
    scales = torch.zeros(padded, n, dtype=dtype, device=w.scales.device)
    scales[:groups] = w.scales.t()
    # As llm-awq: the 16-bit scale times the zero in fp32, rounded once to the scale dtype.
    scaled_zeros = torch.zeros_like(scales)
    scaled_zeros[:groups] = (
        (-(w.scales.to(torch.float32) * w.zeros.to(torch.float32))).t().to(dtype)
    )
    return _with_bias({"qweight": qweight, "scales": scales, "scaled_zeros": scaled_zeros}, w)


def pack_gemm(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Canonical -> AutoAWQ GEMM (`WQLinear_GEMM.from_linear`)."""
    n, k = w.out_features, w.in_features
    if n % 8:
        raise ValueError(f"GEMM needs out_features % 8 == 0, got {n}")
    groups = k // w.group_size
    # Inverse of `unpack_gemm`'s view: row n = 8j + 2b + a -> word (k, j), nibble 4a + b.
    tiles = w.q.reshape(n // 8, 4, 2, k).permute(3, 0, 2, 1).reshape(k, n // 8, 8)
    qweight = _pack_nibbles(tiles, 32)
    zeros = w.zeros.reshape(n // 8, 4, 2, groups).permute(3, 0, 2, 1).reshape(groups, n // 8, 8)
    qzeros = _pack_nibbles(zeros, 32)
    packed = {
        "qweight": qweight.contiguous(),
        "qzeros": qzeros.contiguous(),
        "scales": w.scales.t().contiguous(),
    }
    return _with_bias(packed, w)


def pack_gemv(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Canonical -> AutoAWQ GEMV / llm-awq v1 (natural nibble order, padded group columns)."""
    n, k = w.out_features, w.in_features
    if k % 8:
        raise ValueError(f"GEMV needs in_features % 8 == 0, got {k}")
    groups = k // w.group_size
    padded = padded_group_count(k, w.group_size)
    scales = torch.zeros(n, padded, dtype=w.scales.dtype, device=w.scales.device)
    scales[:, :groups] = w.scales
    zeros = torch.zeros(n, padded, dtype=torch.uint8, device=w.zeros.device)
    zeros[:, :groups] = w.zeros
    packed = {
        "qweight": _pack_nibbles(w.q.reshape(n, k // 8, 8), 32).contiguous(),
        "qzeros": _pack_nibbles(zeros.reshape(n, padded // 8, 8), 32).contiguous(),
        "scales": scales,
    }
    return _with_bias(packed, w)


# --------------------------------------------------------------------------------------------
# Whole checkpoints
# --------------------------------------------------------------------------------------------


def _storage_plain(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 plain tensors are stored as fp16 like every AWQ release (and identically by both
    writers, so both files load to the same model); bf16 stays bf16 (fp16 could overflow)."""
    if tensor.dtype == torch.float32:
        tensor = tensor.to(torch.float16)
    return tensor.detach().cpu().contiguous()


def _fp16_scales(w: QuantizedWeight) -> QuantizedWeight:
    """AWQ kernels and both reference packers keep scales in fp16 (bf16 is kept as is)."""
    if w.scales.dtype == torch.float32:
        return QuantizedWeight(w.q, w.scales.to(torch.float16), w.zeros, w.group_size, w.bias)
    return w


def _check_group(quantized: Mapping[str, QuantizedWeight], group_size: int) -> None:
    for name, w in quantized.items():
        if w.group_size != group_size:
            raise ValueError(f"{name}: group size {w.group_size}, expected {group_size}")


def _flat_state(
    quantized: Mapping[str, QuantizedWeight],
    plain: Mapping[str, torch.Tensor],
    pack: Callable[[QuantizedWeight], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for module in sorted(quantized):
        packed = pack(_fp16_scales(quantized[module]))
        for leaf, tensor in packed.items():
            state[f"{module}.{leaf}"] = tensor.detach().cpu().contiguous()
    seen: set[int] = set()
    for key in sorted(plain):
        tensor = _storage_plain(plain[key])
        # Tied weights share storage; safetensors refuses shared tensors, so copy repeats.
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[key] = tensor
    return state


def save_hf_awq_directory(
    directory: Path,
    quantized: Mapping[str, QuantizedWeight],
    plain: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    group_size: int,
) -> None:
    """Writes `model.safetensors` (GEMM packing) + `config.json` with an AWQ
    `quantization_config` readable by transformers, AutoAWQ and vLLM."""
    directory = Path(directory)
    _check_group(quantized, group_size)
    directory.mkdir(parents=True, exist_ok=True)
    state = _flat_state(quantized, plain, pack_gemm)
    # A copied fp16 shard index would point loaders at shards that are not there.
    stale = directory / "model.safetensors.index.json"
    if stale.is_file():
        stale.unlink()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    out = dict(config)
    out["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        # AutoAWQ's own key names, so its loader reads the folder too.
        "w_bit": 4,
        "q_group_size": group_size,
    }
    (directory / "config.json").write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")


def save_tinychat_checkpoint(
    path: Path,
    quantized: Mapping[str, QuantizedWeight],
    plain: Mapping[str, torch.Tensor],
    group_size: int,
) -> None:
    """Writes TinyChat's `*-awq-v2.pt`: `torch.save` of a flat state dict, v2-packed, fp16."""
    path = Path(path)
    _check_group(quantized, group_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_flat_state(quantized, plain, pack_v2), path)
