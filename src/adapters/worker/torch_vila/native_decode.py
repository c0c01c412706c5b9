"""Decode on CPU through one native call for all decoder layers.

The per-op path in llama.py runs every matmul on the CPU kernels, but dispatches a dozen small
ops per layer from Python; at batch 1 that costs more than the ops themselves. Two native
decoders exist, one per CPU path:

* ``avx512_bf16`` (cpu_kernels/decoder.c): a bf16 model whose decoder linears are W4A16 layers
  on the AVX-512 backend or plain bf16 `nn.Linear`s;
* ``avx2``, ``neon``, ``neon_dotprod`` (vsf_decode_layers in cpu_kernels/fp32_kernels.c): an
  fp32 model whose decoder linears are W4A16 layers on the fp32 backend or 16-bit
  `PortableDecodeLinear`s.

Either also needs a model on CPU whose only biases are on q/k/v (none, or Qwen2's); others
keep the per-op path. The plan points at the model's weights and biases; cpu_path.py decides
when one is made and drops it whenever they may move (`.to()`).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.cpu_kernels.decoder import DecoderPlan, LayerSpec, LinearSpec
from vilaserve.adapters.worker.torch_vila.fast_linear import PortableDecodeLinear
from vilaserve.adapters.worker.torch_vila.kv_cache import KVCache
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

# decoder.c's limits: vector widths of the norms and rotary, the attention kernel's head size.
_MAX_HEAD_DIM = 256


class NativeDecoder:
    """Runs one position of every decoder layer; see `for_layers`."""

    def __init__(
        self, plan: DecoderPlan, kernels: cpu_kernels.NativeKernels, dtype: torch.dtype
    ) -> None:
        self.plan = plan
        self._kernels = kernels
        self.dtype = dtype  # of the hidden state, the cache and the rotary rows
        # Work buffers by (thread, batch size), allocated once: two threads decoding with one
        # model (each with its own cache) never share one.
        self._scratch: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def for_layers(
        cls,
        args: LlamaArgs,
        layers: nn.ModuleList,
        kernels: cpu_kernels.NativeKernels,
        dtype: torch.dtype,
    ) -> NativeDecoder | None:
        """The decoder of `layers` on `kernels` (whose hidden state is `dtype`: bf16 on
        AVX-512, fp32 on AVX2 / NEON), or None when some layer is not one they can run."""
        norm = layers[0].input_layernorm.weight
        if (
            norm.dtype != dtype
            or norm.device.type != "cpu"
            or args.attention_bias
            or args.mlp_bias
            or args.head_dim % 32
            or args.head_dim > _MAX_HEAD_DIM
            or args.hidden_size % 16
            or args.intermediate_size % 16
        ):
            return None
        specs = []
        for layer in layers:
            spec = _layer_spec(layer, dtype)
            if spec is None:
                return None
            specs.append(spec)
        plan = DecoderPlan(
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            intermediate=args.intermediate_size,
            eps=args.rms_norm_eps,
            scale=args.head_dim**-0.5,
            layers=specs,
        )
        return cls(plan, kernels, dtype)

    def run(
        self,
        hidden: Tensor,
        cache: KVCache,
        positions: Tensor,
        rows: Tensor,
        cos: Tensor,
        sin: Tensor,
    ) -> Tensor:
        """hidden [B, 1, hidden] in `self.dtype`, contiguous and owned by the caller's forward
        (updated in place and returned). Row b is at positions[b] of cache row rows[b] (int64
        [B] on the CPU); cos / sin [B, head_dim] are each row's rotary row in `self.dtype`."""
        if hidden.dtype != self.dtype or not hidden.is_contiguous():
            raise ValueError(f"the native decoder runs {self.dtype} contiguous hidden states")
        key = (threading.get_ident(), hidden.shape[0])
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = self.plan.scratch(key[1], self.dtype)
        self._kernels.decode_layers(
            self.plan, hidden, positions, rows, cos.contiguous(), sin.contiguous(),
            cache.native_pointers(), scratch,
        )  # fmt: skip
        return hidden


def _layer_spec(layer: nn.Module, dtype: torch.dtype) -> LayerSpec | None:
    attn, mlp = layer.self_attn, layer.mlp
    qkv_modules = (
        [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    )
    gate_up_modules = (
        [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
    )
    # The C decoder adds q/k/v biases itself (Qwen2), read in place like the weights.
    qkv_bias = [_bias(m) for m in qkv_modules]
    if any(b is not None and (b.dtype != dtype or not b.is_contiguous()) for b in qkv_bias):
        return None
    qkv = [_linear_spec(m, dtype, bias_added_by_caller=True) for m in qkv_modules]
    gate_up = [_linear_spec(m, dtype) for m in gate_up_modules]
    o, down = _linear_spec(attn.o_proj, dtype), _linear_spec(mlp.down_proj, dtype)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if (
        o is None
        or down is None
        or any(spec is None for spec in (*qkv, *gate_up))
        or any(w.dtype != dtype or not w.is_contiguous() for w in norms)
    ):
        return None
    return LayerSpec(
        input_norm=norms[0].detach(),
        post_norm=norms[1].detach(),
        qkv=[s for s in qkv if s is not None],
        gate_up=[s for s in gate_up if s is not None],
        o=o,
        down=down,
        qkv_bias=qkv_bias if any(b is not None for b in qkv_bias) else (),
    )


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def _linear_spec(
    module: nn.Module, dtype: torch.dtype, bias_added_by_caller: bool = False
) -> LinearSpec | None:
    """The layer's matmul as the decoder of `dtype` reads it (bf16: AVX-512, fp32: AVX2/NEON),
    or None. A bias declines it unless the caller adds the bias itself."""
    if getattr(module, "bias", None) is not None and not bias_added_by_caller:
        return None
    layout = getattr(module, "native_layout", None)
    if callable(layout):  # a W4A16Linear: only a native packing of this path is readable here
        packed = layout(dtype)
        if packed is None:
            return None
        return LinearSpec(
            module.out_features, module.in_features, packed=packed, group_size=module.group_size
        )
    if isinstance(module, PortableDecodeLinear):
        if dtype != torch.float32 or module.in_features % 8:
            return None
        return LinearSpec(module.out_features, module.in_features, dense=module.weight)
    if dtype == torch.bfloat16 and isinstance(module, nn.Linear):
        w = module.weight
        if (
            w.dtype == torch.bfloat16
            and w.device.type == "cpu"
            and w.is_contiguous()
            and module.in_features % 32 == 0
        ):
            return LinearSpec(module.out_features, module.in_features, dense=w.detach())
    return None
