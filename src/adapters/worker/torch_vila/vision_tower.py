"""The VILA vision tower: a transformers SigLIP/CLIP vision model cut at the selected layer.

VILA takes `hidden_states[select_layer]` of the full model, i.e. the output of an intermediate
encoder layer before any post-layernorm or pooling head. Running the layers after it, the
post-layernorm and SigLIP's attention-pooling head would be pure waste, so we keep only the
embeddings, CLIP's pre-layernorm and the first `k` encoder layers, and run exactly those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel

SELECT_FEATURES = ("patch", "cls_patch")

# architectures[0] / model_type of vision_tower/config.json -> transformers class.
_BY_ARCHITECTURE: dict[str, type[PreTrainedModel]] = {
    "SiglipVisionModel": SiglipVisionModel,
    "CLIPVisionModel": CLIPVisionModel,
}
_BY_MODEL_TYPE: dict[str, type[PreTrainedModel]] = {
    "siglip_vision_model": SiglipVisionModel,
    "clip_vision_model": CLIPVisionModel,
}


def resolve_vision_class(
    config: dict[str, Any], where: str = "vision tower"
) -> type[PreTrainedModel]:
    """Picks the transformers class for a vision_tower/config.json, or names what is unsupported."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[str(model_type)]
    described = ", ".join(architectures) or str(model_type)
    hint = (
        " (InternViT, used by VILA1.5-40b, is not part of transformers and is not supported yet)"
        if "intern" in described.lower()
        else ""
    )
    raise ValueError(
        f"{where}: unsupported vision model {described!r}{hint}; supported architectures: "
        f"{', '.join(_BY_ARCHITECTURE)}"
    )


class VisionTower(nn.Module):
    """Embeddings + the encoder layers up to `select_layer`; forward returns [N, T, C]."""

    def __init__(self, model: PreTrainedModel, select_layer: int, select_feature: str) -> None:
        super().__init__()
        if not isinstance(model, SiglipVisionModel | CLIPVisionModel):
            raise ValueError(f"VisionTower supports SigLIP and CLIP, got {type(model).__name__}")
        if select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature {select_feature!r} is not supported "
                f"(supported: {', '.join(SELECT_FEATURES)})"
            )
        config = model.config
        num_layers = int(config.num_hidden_layers)
        # hidden_states has num_layers + 1 entries: [0] is the encoder input, [i] the output of
        # layer i - 1. So hidden_states[select_layer] needs exactly `keep` layers to run.
        num_states = num_layers + 1
        if not -num_states <= select_layer < num_states:
            raise ValueError(
                f"mm_vision_select_layer {select_layer} is out of range for a "
                f"{num_layers}-layer vision model"
            )
        keep = select_layer % num_states

        self.select_layer = select_layer
        self.select_feature = select_feature
        self.is_clip = isinstance(model, CLIPVisionModel)
        self.image_size = int(config.image_size)
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.layers_run = keep

        self.embeddings = model.embeddings
        # CLIP normalizes the embeddings before the encoder (and hidden_states[0] is taken
        # after it); SigLIP has no such norm.
        self.pre_norm: nn.Module = model.pre_layrnorm if self.is_clip else nn.Identity()
        encoder = model.encoder
        # Dropping the tail layers frees their memory; the encoder loops over whatever is left.
        encoder.layers = nn.ModuleList(list(encoder.layers)[:keep])
        self.encoder = encoder
        # post_layernorm / head stay with `model`, which we do not keep a reference to.

    @classmethod
    def from_pretrained(
        cls,
        directory: Path,
        select_layer: int,
        select_feature: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> VisionTower:
        directory = Path(directory)
        config_path = directory / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read vision tower config {config_path}: {exc}") from exc
        model_class = resolve_vision_class(config, where=str(config_path))
        # transformers v5 takes `dtype=` (`torch_dtype=` is the deprecated v4 spelling).
        model, info = model_class.from_pretrained(directory, dtype=dtype, output_loading_info=True)
        # transformers only warns about missing weights and initializes them randomly; a tower
        # with random weights would serve garbage, so refuse. The pooling head is never run, so
        # its weights may be absent.
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("head."))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or mismatched:
            raise ValueError(
                f"vision tower weights in {directory} are incomplete: missing {missing}, "
                f"shape mismatches {mismatched}"
            )
        tower = cls(model, select_layer, select_feature)
        return tower.to(device=device).eval()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def output_tokens(self) -> int:
        """Tokens emitted per image: patches (+ CLIP's class token), minus token 0 for `patch`."""
        tokens = self.num_patches + (1 if self.is_clip else 0)
        return tokens - 1 if self.select_feature == "patch" else tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixels.to(self.dtype))
        hidden = self.pre_norm(hidden)
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        if self.select_feature == "patch":
            hidden = hidden[:, 1:]
        return hidden
