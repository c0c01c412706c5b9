"""The vision tower in W8A8 (`--quantize-vision-tower w8a8`): int8 weights per output channel,
activations rounded per token at run time, SmoothQuant's smoothing folded in first.

A tower's linears take most of a picture's time to first token (SigLIP-so400m at 384 px: ~300 of
~330 GMAC). On AVX2 an int8 GEMM (w8a8_gemm.c) outruns PyTorch's fp32 GEMM; elsewhere the layers
compute the same rounding in floating point (so tests run anywhere), which saves nothing.

Smoothing (SmoothQuant, Xiao et al. 2023; TinyChat's `--smooth_VT`): LLM and ViT activations have
a few channels far larger than the rest, which per-token rounding would flatten. Dividing input
channel j by s_j and multiplying the weights' column j by s_j changes nothing in exact arithmetic
and moves the outliers into the weights, which are rounded per output channel. The division is
folded into the LayerNorm before q/k/v and before fc1. The factors s come from calibration
pictures, offline (adapters/offline/vision_smoothing.py), saved beside the tower's weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.cpu_kernels import packing

log = logging.getLogger(__name__)

SMOOTHING_FILE = "smoothquant_scales.safetensors"
X_LEVELS = 63  # 7-bit activations: see w8a8_gemm.c for why not 8
W_LEVELS = 127


class W8A8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with x rounded to 7 bits per row; fp32 out (cast to x's dtype)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / W_LEVELS
        q = torch.round(weight / scales[:, None]).clamp(-W_LEVELS, W_LEVELS).to(torch.int8)
        self.register_buffer("scales", scales, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)
        fits = packing.w8a8_fits(self.out_features, self.in_features)
        self._kernels = int8_kernels(weight.device) if fits else None
        # One copy of the int8 weights: the kernel's tiles where it runs, else the plain matrix.
        on_kernel = self._kernels is not None
        self._packed = packing.pack_int8(q, scales) if on_kernel else None
        self.register_buffer("_q", None if on_kernel else q, persistent=False)

    @property
    def on_kernel(self) -> bool:
        return self._kernels is not None

    @property
    def q(self) -> Tensor:
        """The int8 weights [N, K] (read back from the kernel's tiles where it runs)."""
        if self._packed is None:
            assert self._q is not None
            return self._q  # type: ignore[no-any-return]
        tiles = self._packed.weight  # [N / 8, K / 4, 8, 4]
        return tiles.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._kernels is not None and self._packed is not None and not torch.is_grad_enabled():
            if rows.dtype not in (torch.float32, torch.bfloat16):
                rows = rows.float()
            out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
            self._kernels.w8a8_gemm(rows.contiguous(), self._packed, self.bias, out)
        else:
            out = self.reference(rows)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def reference(self, rows: Tensor) -> Tensor:
        """The kernel's arithmetic in fp32: exact integer products, then the two scales."""
        rows = rows.float()
        step = rows.abs().amax(dim=1, keepdim=True) / X_LEVELS
        xq = torch.round(rows / torch.where(step > 0, step, 1.0))
        return F.linear(xq, self.q.float()) * step * self.scales + (
            0.0 if self.bias is None else self.bias
        )

    def extra_repr(self) -> str:
        kernel = "w8a8_gemm.c" if self.on_kernel else "fp32 reference"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kernel}"


def smooth(norm: nn.LayerNorm, linears: list[nn.Linear], factors: Tensor) -> None:
    """Divides the norm's output channels by `factors` and scales the linears' input columns by
    them: the same function, with the activations' outliers moved into the weights."""
    factors = factors.to(device=norm.weight.device, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.div_(factors.to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.div_(factors.to(norm.bias.dtype))
        for linear in linears:
            linear.weight.mul_(factors.to(linear.weight.dtype)[None, :])


def smoothing_groups(tower: nn.Module) -> dict[str, tuple[nn.LayerNorm, list[nn.Linear]]]:
    """Each pre-norm of a SigLIP/CLIP encoder layer and the linears that read its output, named
    as the smoothing file names them (`layers.{i}.attention`, `layers.{i}.mlp`), whatever wraps
    the encoder (VisionTower, S2Tower)."""
    groups: dict[str, tuple[nn.LayerNorm, list[nn.Linear]]] = {}
    for name, layer in tower.named_modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norm1, norm2 = getattr(layer, "layer_norm1", None), getattr(layer, "layer_norm2", None)
        if not all(isinstance(m, nn.Module) for m in (attn, mlp, norm1, norm2)):
            continue
        key = name[name.rindex("layers.") :] if "layers." in name else name
        groups[f"{key}.attention"] = (norm1, [attn.q_proj, attn.k_proj, attn.v_proj])  # type: ignore[union-attr,list-item]
        groups[f"{key}.mlp"] = (norm2, [mlp.fc1])  # type: ignore[union-attr,list-item]
    return groups


def quantize_vision_tower(tower: nn.Module, factors: Mapping[str, Tensor] | None) -> int:
    """Folds the smoothing `factors` (if any) into `tower`, then puts every linear of the tower
    in W8A8 (SigLIP, CLIP and InternViT alike). Returns how many linears were swapped."""
    if factors:
        groups = smoothing_groups(tower)
        unknown = sorted(set(factors) - set(groups))
        if unknown:
            raise ValueError(f"smoothing factors for parts this tower lacks: {unknown[:3]}")
        for name, (norm, linears) in groups.items():
            if name in factors:
                smooth(norm, linears, factors[name])
    swaps = [
        (parent, name, child)
        for parent in tower.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, W8A8Linear(child))
    return len(swaps)


def int8_kernels(device: torch.device) -> cpu_kernels.Fp32Kernels | None:
    """The kernel set whose w8a8_gemm.c runs here (its AVX2 build, also on AVX-512 CPUs), or
    None: CUDA, NEON and the forced torch path have no integer GEMM for the tower."""
    if device.type != "cpu" or cpu_kernels.cpu_path() == "torch":
        return None
    kernels = cpu_kernels.load_fp32() or cpu_kernels.fp32_kernels()
    return kernels if kernels is not None and kernels.has_w8a8 else None


def int8_path_here(device: torch.device) -> bool:
    """Whether the W8A8 tower would run on an integer GEMM here; elsewhere its fp32 reference
    would only add work, so the tower stays 16-bit."""
    return int8_kernels(device) is not None


def load_smoothing(weights_dir: Path) -> dict[str, Tensor] | None:
    """The tower's smoothing factors, or None (with a warning) where it was not calibrated."""
    path = Path(weights_dir) / SMOOTHING_FILE
    if not path.is_file():
        log.warning(
            "vision tower in W8A8 without smoothing factors: accuracy may suffer",
            extra={"missing": str(path), "make_them": "vilaserve-quantize --smooth-vision-tower"},
        )
        return None
    from safetensors.torch import load_file

    return load_file(str(path))
