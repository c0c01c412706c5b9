"""Decode on CPU through one native call for all decoder layers (cpu_kernels/decoder.c).

The per-op path in llama.py already runs every matmul, norm and rotary on the CPU kernels, but
dispatches a dozen small ops per layer from Python; at batch 1 that costs more than the ops
themselves. A model qualifies when it is bf16 on CPU, bias-free, and every decoder linear is
either a W4A16 layer on the AVX-512 backend or a plain bf16 `nn.Linear`; others keep the
per-op path. The plan points at the model's weights: it is dropped whenever they may move
(`Llama.fuse_projections`, `.to()`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.cpu_kernels.decoder import DecoderPlan, LayerSpec, LinearSpec

if TYPE_CHECKING:
    from vilaserve.adapters.worker.torch_vila.llama import KVCache, Llama

# decoder.c's limits: vector widths of the norms and rotary, the attention kernel's head size.
_MAX_HEAD_DIM = 256


class NativeDecoder:
    """Runs one position of every decoder layer; see `for_model`."""

    def __init__(self, plan: DecoderPlan, kernels: cpu_kernels.CpuKernels) -> None:
        self.plan = plan
        self._kernels = kernels
        # Work buffers by (thread, batch size), allocated once: two threads decoding with one
        # model (each with its own cache) never share one.
        self._scratch: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def for_model(cls, model: Llama) -> NativeDecoder | None:
        """The decoder for `model`, or None when some layer is not one decoder.c can run."""
        kernels = cpu_kernels.load()
        args = model.args
        if (
            kernels is None
            or model.dtype != torch.bfloat16
            or model.device.type != "cpu"
            or args.attention_bias
            or args.mlp_bias
            or args.head_dim % 32
            or args.head_dim > _MAX_HEAD_DIM
            or args.hidden_size % 16
            or args.intermediate_size % 16
        ):
            return None
        layers = []
        for layer in model.model.layers:
            spec = _layer_spec(layer)
            if spec is None:
                return None
            layers.append(spec)
        plan = DecoderPlan(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            intermediate=args.intermediate_size,
            eps=args.rms_norm_eps,
            scale=args.head_dim**-0.5,
            layers=layers,
        )
        return cls(plan, kernels)

    def run(self, hidden: Tensor, cache: KVCache, pos: int, cos: Tensor, sin: Tensor) -> Tensor:
        """hidden [B, 1, hidden] bf16, contiguous and owned by the caller's forward (updated in
        place and returned); cos/sin: the rotary rows of `pos` [1, head_dim] in bf16."""
        key = (threading.get_ident(), hidden.shape[0])
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = self.plan.scratch(key[1])
        self._kernels.decode_layers(
            self.plan, hidden, pos, cos, sin, cache.native_pointers(), scratch
        )
        return hidden


def _layer_spec(layer: nn.Module) -> LayerSpec | None:
    attn, mlp = layer.self_attn, layer.mlp
    qkv_modules = (
        [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    )
    gate_up_modules = (
        [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
    )
    qkv = [_linear_spec(m) for m in qkv_modules]
    gate_up = [_linear_spec(m) for m in gate_up_modules]
    o, down = _linear_spec(attn.o_proj), _linear_spec(mlp.down_proj)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if (
        o is None
        or down is None
        or any(spec is None for spec in (*qkv, *gate_up))
        or any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in norms)
    ):
        return None
    return LayerSpec(
        input_norm=norms[0].detach(),
        post_norm=norms[1].detach(),
        qkv=[s for s in qkv if s is not None],
        gate_up=[s for s in gate_up if s is not None],
        o=o,
        down=down,
    )


def _linear_spec(module: nn.Module) -> LinearSpec | None:
    if getattr(module, "bias", None) is not None:
        return None
    layout = getattr(module, "avx512_layout", None)
    if callable(layout):  # a W4A16Linear: only its AVX-512 packing is readable here
        packed = layout()
        if packed is None:
            return None
        return LinearSpec(
            module.out_features, module.in_features, packed=packed, group_size=module.group_size
        )
    if isinstance(module, nn.Linear):
        w = module.weight
        if (
            w.dtype == torch.bfloat16
            and w.device.type == "cpu"
            and w.is_contiguous()
            and module.in_features % 32 == 0
        ):
            return LinearSpec(module.out_features, module.in_features, dense=w.detach())
    return None
