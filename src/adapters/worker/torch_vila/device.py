"""Where the model runs and in which precision."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (as TinyChat); on CPU what the CPU path computes in: bf16 on the
    AVX-512 kernels, fp32 on the AVX2 / NEON ones, and on PyTorch's own kernels bf16 where the
    CPU computes it natively, else fp32 (where bf16 is emulated the same forward runs several
    times faster in fp32). Weights stay 4-bit or 16-bit in memory either way."""
    if name != "auto":
        dtype = _DTYPES[name]
        if dtype == torch.bfloat16 and not bf16_works(device):
            raise ValueError(f"bfloat16 is not supported on {device}")
        return dtype
    if device.type == "cuda":
        return torch.float16
    path = cpu_kernels.cpu_path()
    if path in cpu_kernels.FP32_PATHS:  # avx2, neon*: the native fp32 decoder
        return torch.float32
    if path == "avx512_bf16" or (cpu_computes_bf16_natively() and bf16_works(device)):
        return torch.bfloat16
    return torch.float32


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (oneDNN's bf16 path: AVX-512 cores, AMX,
    Arm's BF16 extension). Elsewhere (AVX2-only x86) bf16 is emulated, and the same work runs
    several times faster in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def apply_keeping_dtypes(
    module: nn.Module,
    fn: Callable[[Tensor], Tensor],
    recurse: bool,
    names: Collection[str] | None = None,
) -> None:
    """`nn.Module._apply` (what `.to()`, `.float()`, `.cuda()` run) for a module whose buffers
    `names` (default: all) have a dtype of their own: they follow device moves, never a dtype
    cast. The original is kept, so a cast there and back never rounds them."""
    kept = {
        name: buf
        for name, buf in module._buffers.items()
        if buf is not None and (names is None or name in names)
    }
    nn.Module._apply(module, fn, recurse)
    for name, old in kept.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(device=new.device)


def embedding_table(rows: int, width: int) -> nn.Embedding:
    """`nn.Embedding(rows, width)`, minus its random init when built on the meta device (a model
    built to load weights into): torch computes `normal_` on a meta tensor with a Python
    decomposition whose first call imports torch._dynamo, most of a second of every cold start
    (issue 16)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding.from_pretrained(torch.empty(rows, width), freeze=False)
    return nn.Embedding(rows, width)


def bf16_works(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16, device=device)
        return bool((a @ a).float().sum().item() == 64.0)
    except RuntimeError:
        return False
