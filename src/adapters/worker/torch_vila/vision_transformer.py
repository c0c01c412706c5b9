"""SigLIP's and CLIP's vision transformers in plain torch, laid out as transformers lays them out.

VILA's towers are transformers' `SiglipVisionModel` / `CLIPVisionModel`, but importing those
classes costs 1.5 to 2 s before any work (transformers' `modeling_utils` brings in its
model-loading machinery, torch._dynamo, scipy and more), which every `vilaserve chat` and worker
start would pay for four small modules (issue 16). These are the same computations: the same
parameter names and shapes (a checkpoint's weights load as they are), sdpa attention as
transformers runs it by default, and transformers' activations, so a tower gives transformers'
hidden states, bit for bit in fp32 and bf16 (tests/integration/test_vision.py compares them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from vilaserve.adapters.worker.torch_vila.device import embedding_table

VisionKind = Literal["siglip", "clip"]

# architectures[0] / model_type of vision_tower/config.json -> the kind of tower.
# A full text+vision repo (LLaVA-1.5 names `openai/clip-vit-large-patch14-336`) counts too: its
# vision half is used.
_BY_ARCHITECTURE: dict[str, VisionKind] = {
    "SiglipVisionModel": "siglip",
    "CLIPVisionModel": "clip",
    "SiglipModel": "siglip",
    "CLIPModel": "clip",
}
_BY_MODEL_TYPE: dict[str, VisionKind] = {
    "siglip_vision_model": "siglip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "clip": "clip",
}
# A full SigLIP/CLIP config (text and vision) keeps the vision side under "vision_config".
_FULL_MODEL_TYPES = ("siglip", "clip")

# transformers' SiglipVisionConfig / CLIPVisionConfig defaults, for keys a config.json omits.
_DEFAULTS: dict[VisionKind, dict[str, Any]] = {
    "siglip": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    },
    "clip": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
    },
}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


# transformers' ACT2FN entries that vision towers use, computed exactly as transformers does.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "quick_gelu": _quick_gelu,
}


def vision_kind(config: Mapping[str, Any], where: str = "vision tower") -> VisionKind:
    """SigLIP or CLIP, from a vision_tower/config.json, or a ValueError naming what is not."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    model_type = str(config.get("model_type"))
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    described = ", ".join(architectures) or model_type
    raise ValueError(
        f"{where}: unsupported vision model {described!r}; supported architectures: "
        f"{', '.join(_BY_ARCHITECTURE)}, InternVisionModel"
    )


@dataclass(frozen=True)
class VisionConfig:
    kind: VisionKind
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "vision tower") -> VisionConfig:
        """From a config.json (or a transformers config's `to_dict()`)."""
        kind = vision_kind(config, where)
        nested = config.get("vision_config")
        if config.get("model_type") in _FULL_MODEL_TYPES and isinstance(nested, Mapping):
            config = nested
        values = {**_DEFAULTS[kind], **{k: v for k, v in config.items() if k in _DEFAULTS[kind]}}
        parsed = cls(
            kind=kind,
            hidden_size=int(values["hidden_size"]),
            intermediate_size=int(values["intermediate_size"]),
            num_hidden_layers=int(values["num_hidden_layers"]),
            num_attention_heads=int(values["num_attention_heads"]),
            num_channels=int(values["num_channels"]),
            image_size=int(values["image_size"]),
            patch_size=int(values["patch_size"]),
            hidden_act=str(values["hidden_act"]),
            layer_norm_eps=float(values["layer_norm_eps"]),
            attention_dropout=float(values["attention_dropout"]),
        )
        if parsed.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"{where}: unsupported hidden_act {parsed.hidden_act!r} (supported: "
                f"{', '.join(_ACTIVATIONS)})"
            )
        if parsed.hidden_size % parsed.num_attention_heads:
            raise ValueError(
                f"{where}: hidden_size {parsed.hidden_size} is not a multiple of "
                f"num_attention_heads {parsed.num_attention_heads}"
            )
        return parsed

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class VisionEmbeddings(nn.Module):
    """Patches (a strided convolution) plus learned positions; CLIP prepends a class token."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.is_clip = config.kind == "clip"
        width = config.hidden_size
        if self.is_clip:
            self.class_embedding = nn.Parameter(torch.empty(width))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            width,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=not self.is_clip,
        )
        positions = config.num_patches + (1 if self.is_clip else 0)  # CLIP's class token too
        self.position_embedding = embedding_table(positions, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [N, patches, C]
        if self.is_clip:
            cls = self.class_embedding.expand(embeddings.shape[0], 1, -1)
            embeddings = torch.cat([cls, embeddings], dim=1)
        return embeddings + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (width // self.num_heads) ** -0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden.shape
        shape = (batch, tokens, self.num_heads, -1)
        q = self.q_proj(hidden).view(shape).transpose(1, 2)
        k = self.k_proj(hidden).view(shape).transpose(1, 2)
        v = self.v_proj(hidden).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class VisionTransformer(nn.Module):
    """The parts of transformers' vision model that can run before `hidden_states[k]`: the
    embeddings, CLIP's pre-layernorm and the encoder (no post-layernorm, no pooling head)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm: nn.Module = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.kind == "clip"
            else nn.Identity()
        )
        self.encoder = Encoder(config)

    @classmethod
    def adopt(cls, model: nn.Module) -> VisionTransformer:
        """The same network as a transformers SiglipVisionModel / CLIPVisionModel, sharing its
        parameters (not copies): e.g. a freshly initialised one that is then trained."""
        model_config = getattr(model, "config", None)
        if not hasattr(model_config, "to_dict"):
            raise ValueError(f"expected a SigLIP or CLIP vision model, got {type(model).__name__}")
        config = VisionConfig.from_dict(model_config.to_dict(), where=type(model).__name__)
        with torch.device("meta"):
            ours = cls(config)
        wanted = ours.state_dict().keys()
        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k in wanted}
        ours.load_state_dict(state, strict=True, assign=True)
        return ours
