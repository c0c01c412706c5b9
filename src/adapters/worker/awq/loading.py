"""Builds a W4A16 Llama from an AWQ checkpoint: TinyChat's `.pt` or a Hugging Face AWQ `llm/`.

Every non-quantized tensor (embeddings, the norms AWQ rescaled, the head) comes from the AWQ
source itself, never from the fp16 `llm/` weights: mixing them silently corrupts the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from vilaserve.adapters.worker.awq.checkpoint_reading import (
    load_hf_awq_directory,
    load_tinychat_checkpoint,
)
from vilaserve.adapters.worker.awq.config_detection import has_awq_config
from vilaserve.adapters.worker.awq.qlinear import quantize_model_linears
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs


def expected_linear_shapes(args: LlamaArgs) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every decoder Linear, from the config alone."""
    h, inter, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    per_layer = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    return {
        f"model.layers.{i}.{name}": shape
        for i in range(args.num_hidden_layers)
        for name, shape in per_layer.items()
    }


def find_awq_source(checkpoint: VilaCheckpoint, quant_path: str | None) -> Path:
    """`--quant-path` if given; else a `*awq*.pt` in `llm/` (VILA's AWQ releases) or an
    `llm/` whose config says `quant_method: awq`."""
    if quant_path:
        path = Path(quant_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--quant-path {path} does not exist")
        return path
    pickles = sorted(checkpoint.llm_dir.glob("*awq*.pt"))
    if pickles:
        return pickles[0]
    if has_awq_config(checkpoint.llm_dir):
        return checkpoint.llm_dir
    raise FileNotFoundError(
        f"--precision W4A16 needs AWQ weights: pass --quant-path (a TinyChat *-awq-v2.pt or an "
        f"AWQ model directory); none found in {checkpoint.llm_dir}"
    )


def read_awq(
    source: Path, args: LlamaArgs, group_size: int = 128
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    shapes = expected_linear_shapes(args)
    if source.is_dir():
        quantized, plain = load_hf_awq_directory(source, expected_shapes=shapes)
    else:
        quantized, plain = load_tinychat_checkpoint(
            source, group_size=group_size, expected_shapes=shapes
        )
    missing = sorted(set(shapes) - set(quantized))
    if missing:
        raise ValueError(f"{source}: no quantized weights for {', '.join(missing[:8])}")
    _check_biases(source, quantized, args)
    return quantized, plain


def _check_biases(source: Path, quantized: Mapping[str, QuantizedWeight], args: LlamaArgs) -> None:
    """A bias must come with exactly the linears that have one (Qwen2: q/k/v): the model is
    built uninitialised, so a missing bias would otherwise be whatever memory held."""
    qkv = args.attention_bias or args.qkv_bias
    biased = dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), qkv)
    biased["self_attn.o_proj"] = args.attention_bias
    missing, unexpected = [], []
    for i in range(args.num_hidden_layers):
        for linear in DECODER_LINEARS:
            name = f"model.layers.{i}.{linear}"
            has_bias = quantized[name].bias is not None
            wants_bias = biased.get(linear, args.mlp_bias)
            if has_bias != wants_bias:
                (missing if wants_bias else unexpected).append(f"{name}.bias")
    if missing or unexpected:
        raise ValueError(
            f"{source}: the biases do not match the {args.model_type} config: missing "
            f"{', '.join(missing[:8]) or 'none'}; unexpected {', '.join(unexpected[:8]) or 'none'}"
        )


def load_awq_llm(
    checkpoint: VilaCheckpoint,
    quant_path: str | None,
    dtype: torch.dtype,
    device: torch.device,
    backend: str = "auto",
) -> Llama:
    args = LlamaArgs.from_hf_config(checkpoint.llm_config)
    source = find_awq_source(checkpoint, quant_path)
    quantized, plain = read_awq(source, args)
    model = Llama.empty(args, dtype, device)
    quantize_model_linears(model, quantized, dtype, device, backend)
    plain = dict(plain)
    if "lm_head.weight" not in plain and args.tie_word_embeddings:
        plain["lm_head.weight"] = plain["model.embed_tokens.weight"]
    expected = {k for k in model.state_dict() if not _in_quantized_linear(k)}
    absent = sorted(expected - plain.keys())
    if absent:
        raise ValueError(f"{source}: missing tensors {', '.join(absent[:8])}")
    with torch.no_grad():
        own = model.state_dict()
        for name in expected:
            tensor = plain[name]
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
    return model.eval().requires_grad_(False)


def _in_quantized_linear(key: str) -> bool:
    return any(f".{name}." in key for name in DECODER_LINEARS)
