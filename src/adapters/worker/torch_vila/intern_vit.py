"""InternViT-6B, the vision tower of VILA1.5-40b, cut at the selected layer and streamed in.

The layers are transformers' own InternVL vision modules (`InternVLVisionEmbeddings`,
`InternVLVisionLayer` with `norm_type "rms_norm"`), whose math is that of VILA's InternViT
(reference §3.3): RMSNorm computed in float32, cast back, then times the weight; one qk RMSNorm
over the full q (and k) width before the head split; scale head_dim^-0.5; CLS + absolute
positions, added as they are at the native size; layer scale on both branches; exact GELU. We
use the layers only, never `InternVLVisionModel`, whose final layernorm (`use_mean_pooling
false`) must not touch `hidden_states[k]`. Two details are set by hand, see `_build_layers`.

VILA1.5-40b's tower is 5.9 B parameters (about 12 GB in bf16), so loading builds the modules on
the meta device and then reads the checkpoint one tensor at a time, renamed from InternViT's
names (§3.2) to transformers' (§3.6), cast, and assigned in place: the process never holds a
state dict beside the model, and reads nothing for the layers after the selected one.

transformers' modeling code is imported only when an InternViT tower is built: it costs seconds
of import time (issue 16) that towers of other families must not pay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from vilaserve.adapters.worker.torch_vila.checkpoint import read_json_object, safetensors_files
from vilaserve.adapters.worker.torch_vila.image_processing import ImageProcessorConfig
from vilaserve.adapters.worker.torch_vila.vision_tower import SelectedLayerTower

MODEL_TYPE = "intern_vit_6b"
ARCHITECTURE = "InternVisionModel"
# Some exports (InternVL's full model) keep the tower's keys under this prefix.
_CHECKPOINT_PREFIX = "vision_model."

# VILA's InternVisionPreprocessor normalises with the ImageNet statistics (§3.4).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NATIVE_IMAGE_SIZE = 448

# InternVisionConfig's defaults (VILA's configuration_intern_vit.py), for keys a config omits.
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_attention_heads": 25,
    "num_hidden_layers": 48,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "qk_normalization": True,
    "qkv_bias": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}

# Per-layer names: transformers' module name -> (InternViT's name, row block of InternViT's
# fused qkv or None). q, k, v are rows [0:D], [D:2D], [2D:3D] of `attn.qkv` (§3.3, §3.6).
_LAYER_SOURCES: dict[str, tuple[str, int | None]] = {
    "layernorm_before.weight": ("norm1.weight", None),
    "layernorm_after.weight": ("norm2.weight", None),
    "attention.q_proj.weight": ("attn.qkv.weight", 0),
    "attention.k_proj.weight": ("attn.qkv.weight", 1),
    "attention.v_proj.weight": ("attn.qkv.weight", 2),
    "attention.q_proj.bias": ("attn.qkv.bias", 0),
    "attention.k_proj.bias": ("attn.qkv.bias", 1),
    "attention.v_proj.bias": ("attn.qkv.bias", 2),
    "attention.q_norm.weight": ("attn.q_norm.weight", None),
    "attention.k_norm.weight": ("attn.k_norm.weight", None),
    "attention.projection_layer.weight": ("attn.proj.weight", None),
    "attention.projection_layer.bias": ("attn.proj.bias", None),
    "mlp.fc1.weight": ("mlp.fc1.weight", None),
    "mlp.fc1.bias": ("mlp.fc1.bias", None),
    "mlp.fc2.weight": ("mlp.fc2.weight", None),
    "mlp.fc2.bias": ("mlp.fc2.bias", None),
    "lambda_1": ("ls1", None),
    "lambda_2": ("ls2", None),
}
_EMBEDDING_SOURCES: dict[str, str] = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embeddings": "embeddings.position_embedding",
}


def is_intern_vit(config: Mapping[str, Any]) -> bool:
    """Whether a vision_tower/config.json describes an InternViT (VILA1.5-40b's tower)."""
    architectures = config.get("architectures") or []
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in architectures


def intern_vit_preprocessor_config(image_size: int = NATIVE_IMAGE_SIZE) -> ImageProcessorConfig:
    """VILA's InternVisionPreprocessor (§3.4) as a processor config: bicubic resize to a square,
    ToTensor's 1/255, ImageNet normalisation, no crop. VILA builds it in code (448 px) and reads
    no preprocessor_config.json, so neither do we; `image_size` is the tower's (tiny test
    towers are smaller than 448)."""
    return ImageProcessorConfig(
        do_resize=True,
        size=(image_size, image_size),
        resample=int(Image.Resampling.BICUBIC),
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        processor_type="InternVisionPreprocessor",
    )


def _positive_int(values: Mapping[str, Any], field: str, where: str) -> int:
    value = values[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {field} must be a positive integer, got {value!r}")
    return value


def _flag(values: Mapping[str, Any], field: str, where: str) -> bool:
    value = values[field]
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class InternVitConfig:
    """The fields of InternViT's config.json that shape the network."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    qk_normalization: bool
    qkv_bias: bool
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "vision tower") -> InternVitConfig:
        """From a vision_tower/config.json; a ValueError naming any field we cannot honour."""
        nested = config.get("vision_config")
        if isinstance(nested, Mapping):
            config = nested
        values = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        parsed = cls(
            hidden_size=_positive_int(values, "hidden_size", where),
            intermediate_size=_positive_int(values, "intermediate_size", where),
            num_attention_heads=_positive_int(values, "num_attention_heads", where),
            num_hidden_layers=_positive_int(values, "num_hidden_layers", where),
            image_size=_positive_int(values, "image_size", where),
            patch_size=_positive_int(values, "patch_size", where),
            qk_normalization=_flag(values, "qk_normalization", where),
            qkv_bias=_flag(values, "qkv_bias", where),
            hidden_act=str(values["hidden_act"]),
            layer_norm_eps=float(values["layer_norm_eps"]),
        )
        # InternViT's patch convolution is hard-wired to RGB, and its norms are RMSNorm whatever
        # the config says; a checkpoint declaring otherwise was not trained for this network.
        if values["num_channels"] != 3:
            raise ValueError(f"{where}: num_channels {values['num_channels']!r} is not 3")
        norm_type = config.get("norm_type", "rms_norm")
        if norm_type != "rms_norm":
            raise ValueError(f"{where}: norm_type {norm_type!r} is not supported (rms_norm only)")
        if parsed.hidden_size % parsed.num_attention_heads:
            raise ValueError(
                f"{where}: hidden_size {parsed.hidden_size} is not a multiple of "
                f"num_attention_heads {parsed.num_attention_heads}"
            )
        if parsed.image_size % parsed.patch_size:
            raise ValueError(
                f"{where}: image_size {parsed.image_size} is not a multiple of "
                f"patch_size {parsed.patch_size}"
            )
        if not parsed.layer_norm_eps > 0:
            raise ValueError(
                f"{where}: layer_norm_eps must be positive, got {parsed.layer_norm_eps}"
            )
        return parsed

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _transformers_config(config: InternVitConfig) -> Any:
    """The equivalent `InternVLVisionConfig`, with everything training-only switched off."""
    from transformers.activations import ACT2FN
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    if config.hidden_act not in ACT2FN:
        # InternViT's MLP looks its activation up in ACT2FN too, so any name there is honoured.
        raise ValueError(f"vision tower: unsupported hidden_act {config.hidden_act!r}")
    return InternVLVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        image_size=config.image_size,
        patch_size=config.patch_size,
        use_qk_norm=config.qk_normalization,
        attention_bias=config.qkv_bias,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        norm_type="rms_norm",
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        hidden_dropout_prob=0.0,
        attention_dropout=0.0,
        projection_dropout=0.0,
        # torch's fused attention: the same softmax(q k^T * scale) v, without materialising the
        # 1025 x 1025 weights per head; on a GPU it is flash attention, as VILA ran it
        # (`use_flash_attn true`).
        attn_implementation="sdpa",
    )


def _build_layers(config: InternVitConfig, count: int) -> tuple[nn.Module, nn.ModuleList]:
    """transformers' embeddings and the first `count` encoder layers."""
    from transformers.models.internvl.modeling_internvl import (
        InternVLVisionEmbeddings,
        InternVLVisionLayer,
    )

    hf_config = _transformers_config(config)
    embeddings = InternVLVisionEmbeddings(hf_config)
    layers = nn.ModuleList(InternVLVisionLayer(hf_config) for _ in range(count))
    for layer in layers:
        attention = layer.attention
        # transformers builds the qk norms with its default eps (1e-6) and ignores
        # layer_norm_eps; InternViT passes layer_norm_eps to them. Equal for the released 6B
        # config, but a config that sets another eps must get it here too.
        if config.qk_normalization:
            attention.q_norm.variance_epsilon = config.layer_norm_eps
            attention.k_norm.variance_epsilon = config.layer_norm_eps
    return embeddings, layers


@dataclass(frozen=True)
class _Source:
    """Where a checkpoint tensor goes: the tower parameters fed by its row blocks, in order
    (one for a plain tensor, q/k/v for the fused qkv), and the shape it must have."""

    targets: tuple[str, ...]
    shape: tuple[int, ...]


class InternVitTower(SelectedLayerTower):
    """Embeddings + the InternViT layers up to `select_layer`; forward returns [N, T, C]."""

    def __init__(self, config: InternVitConfig, select_layer: int, select_feature: str) -> None:
        """Builds the modules on the current default device (the meta device when loading)."""
        super().__init__(config, select_layer, select_feature, class_tokens=1)
        self.config = config
        self.embeddings, self.layers = _build_layers(config, self.layers_run)

    @classmethod
    def from_pretrained(
        cls,
        directory: Path,
        select_layer: int,
        select_feature: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> InternVitTower:
        directory = Path(directory)
        config_path = directory / "config.json"
        config = InternVitConfig.from_dict(read_json_object(config_path), where=str(config_path))
        # On the meta device nothing is allocated: each parameter's storage is the tensor
        # streamed in for it.
        with torch.device("meta"):
            tower = cls(config, select_layer, select_feature)
        tower.load_streaming(directory, dtype, device)
        return tower.eval()

    def _sources(self) -> dict[str, _Source]:
        """Checkpoint name (InternViT's, §3.2) -> the parameters it feeds, for what runs."""
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters()}
        grouped: dict[str, list[tuple[int | None, str]]] = {}
        for target, source in _EMBEDDING_SOURCES.items():
            grouped[source] = [(None, target)]
        for index in range(self.layers_run):
            for suffix, (source_suffix, block) in _LAYER_SOURCES.items():
                target = f"layers.{index}.{suffix}"
                if target in shapes:  # qk norms and qkv bias exist only when configured
                    source = f"encoder.layers.{index}.{source_suffix}"
                    grouped.setdefault(source, []).append((block, target))
        sources: dict[str, _Source] = {}
        for source, parts in grouped.items():
            parts.sort(key=lambda part: part[0] or 0)
            targets = tuple(target for _, target in parts)
            first = shapes[targets[0]]
            rows = sum(shapes[target][0] for target in targets)
            sources[source] = _Source(targets, (rows, *first[1:]) if len(parts) > 1 else first)
        if set(shapes) != {t for s in sources.values() for t in s.targets}:
            raise AssertionError("InternViT name map does not cover the tower's parameters")
        return sources

    def load_streaming(
        self, directory: Path, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        """Reads this tower's tensors from `directory`'s safetensors one at a time, cast to
        `dtype` on `device` and assigned straight into the modules. A ValueError names every
        missing or mis-shaped tensor (the tower would otherwise serve garbage); tensors of
        later layers or of other modules are never read."""
        sources = self._sources()
        loaded: set[str] = set()
        mismatched: list[str] = []
        for path in safetensors_files(Path(directory)):
            with safe_open(str(path), framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    key = name.removeprefix(_CHECKPOINT_PREFIX)
                    source = sources.get(key)
                    if source is None or key in loaded:
                        continue
                    tensor_slice = weights.get_slice(name)
                    shape = tuple(tensor_slice.get_shape())
                    if shape != source.shape:
                        mismatched.append(f"{key}: {list(shape)}, expected {list(source.shape)}")
                        continue
                    # Row blocks are read as slices, so even the fused qkv is never whole.
                    rows = shape[0] // len(source.targets)
                    for block, target in enumerate(source.targets):
                        part = (
                            tensor_slice[block * rows : (block + 1) * rows]
                            if len(source.targets) > 1
                            else weights.get_tensor(name)
                        )
                        self._assign(target, part.to(device=device, dtype=dtype))
                    loaded.add(key)
        missing = sorted(sources.keys() - loaded - {m.split(":")[0] for m in mismatched})
        if missing or mismatched:
            raise ValueError(
                f"InternViT weights in {directory} are incomplete: missing {missing}, "
                f"shape mismatches {sorted(mismatched)}"
            )

    def _assign(self, target: str, value: torch.Tensor) -> None:
        owner_name, _, leaf = target.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embeddings.projection.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # transformers' embeddings would silently interpolate the positions for another size;
        # VILA feeds only the native size, so a different one is a caller's bug.
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"InternViT expects {self.image_size}x{self.image_size} pixels, "
                f"got {tuple(pixels.shape[-2:])}"
            )
        hidden = self.embeddings(pixels.to(self.dtype))
        for layer in self.layers:
            hidden = layer(hidden)
        return self.selected_tokens(hidden)
