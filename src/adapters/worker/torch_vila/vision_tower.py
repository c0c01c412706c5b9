"""The VILA vision tower: a SigLIP/CLIP vision model cut at the selected layer.

VILA takes `hidden_states[select_layer]` of the full model, i.e. the output of an intermediate
encoder layer before any post-layernorm or pooling head. Running the layers after it, the
post-layernorm and SigLIP's attention-pooling head would be pure waste, so we keep only the
embeddings, CLIP's pre-layernorm and the first `k` encoder layers, and run exactly those. The
modules are our own plain-torch copies of transformers' (see vision_transformer.py): loading a
checkpoint's tower imports no transformers model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

from vilaserve.adapters.worker.torch_vila.checkpoint import read_json_object, safetensors_files
from vilaserve.adapters.worker.torch_vila.vision_transformer import (
    VisionConfig,
    VisionTransformer,
)

if TYPE_CHECKING:
    from vilaserve.adapters.worker.torch_vila.layout import TowerSource

SELECT_FEATURES = ("patch", "cls_patch")
# transformers v4 saved vision models with every key under this prefix; v5 saves none.
_V4_PREFIX = "vision_model."


def _tower_key(name: str) -> str:
    """A checkpoint's weight name -> the tower's (only CLIP's pre-layernorm is renamed)."""
    key = name.removeprefix(_V4_PREFIX)
    if key.startswith("pre_layrnorm."):
        return "pre_norm." + key.removeprefix("pre_layrnorm.")
    return key


def layers_to_run(select_layer: int, select_feature: str, num_layers: int) -> int:
    """How many encoder layers `hidden_states[select_layer]` needs (any tower), after checking
    both VILA settings. hidden_states has num_layers + 1 entries: [0] is the encoder input, [i]
    the output of layer i - 1."""
    if select_feature not in SELECT_FEATURES:
        raise ValueError(
            f"mm_vision_select_feature {select_feature!r} is not supported "
            f"(supported: {', '.join(SELECT_FEATURES)})"
        )
    num_states = num_layers + 1
    if not -num_states <= select_layer < num_states:
        raise ValueError(
            f"mm_vision_select_layer {select_layer} is out of range for a "
            f"{num_layers}-layer vision model"
        )
    return select_layer % num_states


class TowerShape(Protocol):
    """The config fields that every tower family's selection and sizes come from."""

    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...


class SelectedLayerTower(nn.Module):
    """What every tower family shares: VILA's feature selection (`hidden_states[select_layer]`,
    token 0 dropped for `patch`) and the sizes the vision pipeline reads (`image_size`,
    `hidden_size`, `output_tokens()`). `class_tokens`: tokens the embeddings put before the
    patches (CLIP's and InternViT's class token; none for SigLIP)."""

    def __init__(
        self, config: TowerShape, select_layer: int, select_feature: str, class_tokens: int
    ) -> None:
        super().__init__()
        self.layers_run = layers_to_run(select_layer, select_feature, config.num_hidden_layers)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.class_tokens = class_tokens

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def output_tokens(self) -> int:
        """Tokens emitted per image: class token(s) + patches, minus token 0 for `patch`."""
        tokens = self.num_patches + self.class_tokens
        return tokens - 1 if self.select_feature == "patch" else tokens

    def selected_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The selected layer's output [N, T, C] as VILA takes it."""
        return hidden[:, 1:] if self.select_feature == "patch" else hidden


class VisionTower(SelectedLayerTower):
    """Embeddings + the encoder layers up to `select_layer`; forward returns [N, T, C]."""

    def __init__(self, model: nn.Module, select_layer: int, select_feature: str) -> None:
        """`model`: a `VisionTransformer`, or a transformers SiglipVisionModel / CLIPVisionModel
        (e.g. freshly initialised for training), whose parameters the tower then takes over."""
        vit = model if isinstance(model, VisionTransformer) else VisionTransformer.adopt(model)
        config = vit.config
        class_tokens = 1 if config.kind == "clip" else 0
        super().__init__(config, select_layer, select_feature, class_tokens)
        self.embeddings = vit.embeddings
        # CLIP normalizes the embeddings before the encoder (and hidden_states[0] is taken
        # after it); SigLIP has no such norm (an identity there).
        self.pre_norm = vit.pre_layrnorm
        encoder = vit.encoder
        # Dropping the tail layers frees their memory; the encoder loops over whatever is left.
        encoder.layers = nn.ModuleList(list(encoder.layers)[: self.layers_run])
        self.encoder = encoder

    @classmethod
    def from_pretrained(
        cls,
        directory: Path,
        select_layer: int,
        select_feature: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> VisionTower:
        """A tower folder: `config.json` + safetensors (VILA's `vision_tower/`, a CLIP repo)."""
        directory = Path(directory)
        config_path = directory / "config.json"
        config = read_json_object(config_path)
        return cls.from_weights(
            config, directory, "", select_layer, select_feature, dtype, device, str(config_path)
        )

    @classmethod
    def from_source(
        cls,
        source: TowerSource,
        select_layer: int,
        select_feature: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> VisionTower:
        return cls.from_weights(
            source.config,
            source.weights_dir,
            source.key_prefix,
            select_layer,
            select_feature,
            dtype,
            device,
            source.where,
        )

    @classmethod
    def from_weights(
        cls,
        config: Mapping[str, Any],
        weights_dir: Path,
        key_prefix: str,
        select_layer: int,
        select_feature: str,
        dtype: torch.dtype,
        device: torch.device | str,
        where: str,
    ) -> VisionTower:
        """`config` and the shards in `weights_dir` whose keys start with `key_prefix` (llava-hf
        keeps its tower among the LLM's shards under `vision_tower.`), read one at a time."""
        # Built on the meta device: the checkpoint's tensors are then taken as they are (cast to
        # `dtype`), with no random initialisation to overwrite, and only for what runs.
        with torch.device("meta"):
            vit = VisionTransformer(VisionConfig.from_dict(config, where=where))
        tower = cls(vit, select_layer, select_feature)
        wanted = tower.state_dict()
        state: dict[str, torch.Tensor] = {}
        for path in safetensors_files(Path(weights_dir)):
            with safe_open(str(path), framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if not name.startswith(key_prefix):
                        continue
                    key = _tower_key(name.removeprefix(key_prefix))
                    if key in wanted:
                        state[key] = weights.get_tensor(name).to(device=device, dtype=dtype)
        # Refuse a tower with weights missing (it would serve garbage); the layers after the
        # selected one, the post-layernorm and the pooling head never run and may be absent.
        missing = sorted(wanted.keys() - state.keys())
        mismatched = sorted(k for k, v in state.items() if v.shape != wanted[k].shape)
        if missing or mismatched:
            raise ValueError(
                f"vision tower weights in {where} are incomplete: missing {missing}, "
                f"shape mismatches {mismatched}"
            )
        tower.load_state_dict(state, strict=True, assign=True)
        return tower.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixels.to(self.dtype))
        hidden = self.pre_norm(hidden)
        return self.selected_tokens(self.encoder(hidden))
