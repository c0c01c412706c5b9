"""A Hugging Face Llama / Qwen2 `config.json` read into the decoder's arguments.

Accepts the transformers v4 and v5 layouts (`rope_scaling` or `rope_parameters`), refuses what
the decoder would silently compute differently (sliding windows, partial rotary, another
activation), and names the file in every error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_ROPE_THETA = 10_000.0
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# `model_type`s whose LLM is this decoder, by family. "llava_llama" is LLaVA-1.5's (and
# VILA-1.0's) single-folder LlavaLlamaForCausalLM, whose config holds the Llama fields at the
# top level. A config without `model_type` (hand-written, or an old export) is read as Llama.
_FAMILY_OF_MODEL_TYPE = {"llama": "llama", "llava_llama": "llama", "qwen2": "qwen2"}
# HF's defaults where a config leaves the field out (LlamaConfig / Qwen2Config).
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768}


@dataclass(frozen=True)
class RopeScaling:
    """Position-interpolation settings: `linear` uses only `factor`; `llama3` uses all."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama's flag: a bias on q, k, v *and* o
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2: a bias on q, k and v only
    model_type: str = "llama"  # the family: "llama" or "qwen2"

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str | None = None) -> LlamaArgs:
        """Reads a Hugging Face Llama or Qwen2 `config.json` dict (transformers v4 or v5
        layout). `source` (the file's path) only makes error messages name the file."""
        where = source or "the LLM config"
        family = _model_family(cfg, where)
        _refuse_sliding_window(cfg, where)
        activation = cfg.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"only SwiGLU (hidden_act='silu') is supported, got {activation!r}")
        heads = int(_required(cfg, "num_attention_heads", where))
        hidden = int(_required(cfg, "hidden_size", where))
        max_positions = int(cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[family])
        theta, scaling = _parse_rope(cfg, max_positions)
        qwen2 = family == "qwen2"
        return cls(
            vocab_size=int(_required(cfg, "vocab_size", where)),
            hidden_size=hidden,
            intermediate_size=int(_required(cfg, "intermediate_size", where)),
            num_hidden_layers=int(_required(cfg, "num_hidden_layers", where)),
            num_attention_heads=heads,
            # v5 writes these keys as null when unset, so `or` rather than a .get default.
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2's biases are fixed by its architecture, not by config fields.
            attention_bias=False if qwen2 else bool(cfg.get("attention_bias", False)),
            mlp_bias=False if qwen2 else bool(cfg.get("mlp_bias", False)),
            qkv_bias=qwen2,
            model_type=family,
        )


def _model_family(cfg: Mapping[str, Any], where: str) -> str:
    model_type = cfg.get("model_type") or "llama"
    family = _FAMILY_OF_MODEL_TYPE.get(str(model_type))
    if family is None:
        supported = ", ".join(sorted(_FAMILY_OF_MODEL_TYPE))
        raise ValueError(
            f"unsupported LLM model_type {model_type!r} in {where} (supported: {supported})"
        )
    return family


def _refuse_sliding_window(cfg: Mapping[str, Any], where: str) -> None:
    """Every layer here attends to the whole cache; a windowed layer would silently differ."""
    if cfg.get("use_sliding_window"):
        raise ValueError(
            f"use_sliding_window is true in {where}: sliding-window attention is not supported"
        )
    windowed = [t for t in cfg.get("layer_types") or [] if t != "full_attention"]
    if windowed:
        raise ValueError(
            f"layer_types in {where} has {windowed[0]!r} layers: only full attention is supported"
        )


def _required(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"{where} has no {key!r}: not a Llama/Qwen2 LLM config")
    return cfg[key]


def _parse_rope(cfg: Mapping[str, Any], max_positions: int) -> tuple[float, RopeScaling | None]:
    """Returns (theta, scaling) from either config layout.

    v5 stores everything in `rope_parameters` ({"rope_type", "rope_theta", ...}); v4 files have a
    top-level `rope_theta` plus an optional `rope_scaling` whose kind is `rope_type` (or `type`
    in older files). Like HF, `rope_scaling` wins when both dicts are present.
    """
    params: Mapping[str, Any] = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported for Llama")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(_rope_field(params, "factor", rope_type)))
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3",
            factor=float(_rope_field(params, "factor", rope_type)),
            low_freq_factor=float(_rope_field(params, "low_freq_factor", rope_type)),
            high_freq_factor=float(_rope_field(params, "high_freq_factor", rope_type)),
            # HF falls back to max_position_embeddings when the pretraining length is absent.
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", max_positions)
            ),
        )
    raise ValueError(
        f"unsupported rope type {rope_type!r} (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})"
    )


def _rope_field(params: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if key not in params:
        raise ValueError(f"rope type {rope_type!r} needs {key!r} in the rope parameters")
    return params[key]
