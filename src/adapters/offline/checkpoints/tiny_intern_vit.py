"""A tiny, random InternViT checkpoint laid out exactly as VILA1.5-40b's `vision_tower/`.

The real tower (InternViT-6B-448px-V1-2) is 5.9 B parameters, so tests use this one: the same
config.json fields and value styles (reference §3.1) and the same weight names and shape
pattern (§3.2), in bf16 like the release, only with toy sizes. Norm weights sit near 1 and layer
scales near 0.1 (their initial values) plus noise, so no weight is an identity that would hide a
misplaced or missing multiplication.

No preprocessor_config.json is written: VILA builds InternViT's preprocessing in code
(`InternVisionPreprocessor`, §3.4), and the reference lists no such file for VILA1.5-40b.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vilaserve.adapters.offline.checkpoints import vila_layout


def intern_vit_config(
    *,
    hidden_size: int,
    num_heads: int,
    num_layers: int,
    intermediate_size: int,
    image_size: int,
    patch_size: int,
    qkv_bias: bool,
    qk_normalization: bool = True,
) -> dict[str, Any]:
    """config.json as VILA1.5-40b ships it (§3.1), with the given sizes."""
    return {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": hidden_size,
        "image_size": image_size,
        "initializer_factor": 0.1,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "num_attention_heads": num_heads,
        "num_channels": 3,
        "num_hidden_layers": num_layers,
        "patch_size": patch_size,
        "qk_normalization": qk_normalization,
        "qkv_bias": qkv_bias,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "use_flash_attn": True,
    }


def _intern_vit_tensors(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under InternViT's names (§3.2), scaled so activations stay O(1)."""
    width = int(config["hidden_size"])
    ffn = int(config["intermediate_size"])
    patch = int(config["patch_size"])
    positions = (int(config["image_size"]) // patch) ** 2 + 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return randn(out_features, in_features) * in_features**-0.5

    def near(value: float, *shape: int) -> torch.Tensor:
        return value + 0.1 * value * randn(*shape)

    tensors = {
        "embeddings.class_embedding": randn(1, 1, width) * 0.5,
        "embeddings.patch_embedding.weight": randn(width, 3, patch, patch) * (3 * patch**2) ** -0.5,
        "embeddings.patch_embedding.bias": randn(width) * 0.1,
        "embeddings.position_embedding": randn(1, positions, width) * 0.5,
    }
    for index in range(int(config["num_hidden_layers"])):
        prefix = f"encoder.layers.{index}."
        tensors[prefix + "norm1.weight"] = near(1.0, width)
        tensors[prefix + "attn.qkv.weight"] = linear(3 * width, width)
        if config["qkv_bias"]:
            tensors[prefix + "attn.qkv.bias"] = randn(3 * width) * 0.1
        if config["qk_normalization"]:
            tensors[prefix + "attn.q_norm.weight"] = near(1.0, width)
            tensors[prefix + "attn.k_norm.weight"] = near(1.0, width)
        tensors[prefix + "attn.proj.weight"] = linear(width, width)
        tensors[prefix + "attn.proj.bias"] = randn(width) * 0.1
        tensors[prefix + "ls1"] = near(0.1, width)
        tensors[prefix + "norm2.weight"] = near(1.0, width)
        tensors[prefix + "mlp.fc1.weight"] = linear(ffn, width)
        tensors[prefix + "mlp.fc1.bias"] = randn(ffn) * 0.1
        tensors[prefix + "mlp.fc2.weight"] = linear(width, ffn)
        tensors[prefix + "mlp.fc2.bias"] = randn(width) * 0.1
        tensors[prefix + "ls2"] = near(0.1, width)
    return tensors


def write_tiny_intern_vit(
    directory: Path,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    num_heads: int = 2,
    num_layers: int = 3,
    intermediate_size: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    qkv_bias: bool = False,
    qk_normalization: bool = True,
) -> dict[str, Any]:
    """Writes `config.json` and `model.safetensors` (bf16) into `directory`; returns the config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = intern_vit_config(
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        image_size=image_size,
        patch_size=patch_size,
        qkv_bias=qkv_bias,
        qk_normalization=qk_normalization,
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in _intern_vit_tensors(config, gen).items()
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    vila_layout.write_json(directory / "config.json", config)
    return config
