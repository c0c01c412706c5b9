"""Pictures -> LLM-space embeddings: an image mode (tiling), a vision tower, a projector.

Built from a `VisionLayout` (layout.py), so every family's geometry comes from its configs:
VILA-1.5 (196 positions), its S2 and InternViT variants, NVILA's tiling, LLaVA's 576.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from vilaserve.adapters.worker.torch_vila.checkpoint import safetensors_files
from vilaserve.adapters.worker.torch_vila.image_modes import (
    DynamicS2Mode,
    DynamicTilesMode,
    ImageMode,
    PreparedImage,
    SingleTileMode,
    squash_config,
)
from vilaserve.adapters.worker.torch_vila.image_processing import (
    ImagePreprocessor,
    ImageProcessorConfig,
)
from vilaserve.adapters.worker.torch_vila.layout import ProjectorSource, VisionLayout
from vilaserve.adapters.worker.torch_vila.projector import (
    MultimodalProjector,
    build_projector,
    load_projector,
)
from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower


@dataclass(frozen=True)
class TimedEncoding:
    """`VisionPipeline.encode_prepared`'s result, with the seconds its two model parts took."""

    embeddings: list[torch.Tensor]
    tower_s: float
    projector_s: float


class VisionPipeline:
    """`prepare` each picture (any thread), then `encode_prepared` a batch on the model thread:
    one tower call for every tile of every picture, then per-picture assembly."""

    def __init__(
        self,
        mode: ImageMode,
        tower: nn.Module,
        projector: MultimodalProjector,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.mode = mode
        self.tower = tower
        self.projector = projector
        self.dtype = dtype
        self.device = torch.device(device)
        self.tokens_per_image = mode.max_positions()

    @classmethod
    def from_layout(
        cls,
        vision: VisionLayout,
        llm_hidden: int,
        dtype: torch.dtype,
        device: torch.device | str,
        end_embedding: torch.Tensor | None = None,
    ) -> VisionPipeline:
        """`end_embedding`: LLM embedding rows that follow every picture (NVILA's "\\n")."""
        tower = _load_tower(vision, dtype, device)
        processor = _processor_config(vision, tower)
        aspect = vision.aspect_ratio
        dynamic = aspect in ("dynamic_s2", "dynamic")
        tile_side = int(tower.image_size)
        if vision.s2 is not None and not dynamic:
            # Fixed S2: the processor makes the largest scale; the tower cuts it into tiles.
            from vilaserve.adapters.worker.torch_vila.s2 import S2Tower

            processor = squash_config(processor, max(vision.s2.scales))
            tower = S2Tower(
                tower, vision.s2.scales, vision.s2.max_split_size, vision.s2.resize_index
            )
            tile_side = int(tower.image_size)
        scales = len(vision.s2.scales) if vision.s2 is not None and aspect == "dynamic_s2" else 1
        features_width = int(tower.hidden_size) * scales
        mm_hidden = vision.mm_hidden or features_width
        if mm_hidden != features_width:
            raise ValueError(
                f"mm_hidden_size {mm_hidden} differs from the vision features' width "
                f"{features_width} (tower {tower.hidden_size} x {scales} scale(s))"
            )
        preprocessor = ImagePreprocessor(processor, "resize" if dynamic else aspect)
        if preprocessor.output_size != (tile_side, tile_side):
            raise ValueError(
                f"{vision.tower.where}: the image preprocessor produces "
                f"{preprocessor.output_size} but the vision tower expects {tile_side}x{tile_side}"
            )
        projector = _load_projector(vision.projector, mm_hidden, llm_hidden, dtype, device)
        tower_tokens = int(tower.output_tokens())
        per_tile = projector.output_tokens(tower_tokens)
        mode: ImageMode
        if aspect == "dynamic_s2":
            assert vision.s2 is not None  # layout.py sets it for dynamic_s2
            mode = DynamicS2Mode(
                preprocessor,
                vision.s2.scales,
                vision.s2.resize_index,
                vision.max_tiles,
                per_tile,
                end_embedding,
            )
        elif aspect == "dynamic":
            mode = DynamicTilesMode(
                preprocessor, vision.min_tiles, vision.max_tiles, per_tile, end_embedding
            )
        else:
            mode = SingleTileMode(preprocessor, per_tile, end_embedding)
        return cls(mode, tower, projector, dtype, device)

    @classmethod
    def from_checkpoint(
        cls,
        root: Path,
        root_config: Mapping[str, Any],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> VisionPipeline:
        """A three-part checkpoint's pipeline from its root config (which may be edited)."""
        from vilaserve.adapters.worker.torch_vila.layout import vision_layout_of

        vision = vision_layout_of(Path(root), root_config)
        if vision is None:
            raise ValueError(f"{root}: no vision_tower/ and mm_projector/ folders")
        return cls.from_layout(vision, _llm_hidden_size(root_config), dtype, device)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings `encode` returns (the LLM hidden size)."""
        return self.projector.hidden

    @property
    def preprocessing_tag(self) -> str:
        return self.mode.tag

    def prepare(self, image: Image.Image, alone: bool = True) -> PreparedImage:
        """CPU-only step, split out so callers can run it off the accelerator's thread."""
        return self.mode.prepare(image, alone)

    def encode_prepared(self, items: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Per picture [positions, hidden] in the pipeline dtype."""
        return self.encode_timed(items).embeddings

    def encode_timed(self, items: Sequence[PreparedImage]) -> TimedEncoding:
        """`encode_prepared`, timing the tower (the pixels' copy to the device included) and
        the projector (with the per-picture assembly around it) apart."""
        if not items:
            return TimedEncoding([], 0.0, 0.0)
        started = time.perf_counter()
        with torch.inference_mode():
            pixels = torch.cat([item.pixels for item in items])
            pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
            features = self.tower(pixels).split([item.tiles for item in items])
            self._finish_kernels()
            towered = time.perf_counter()
            encoded = self.mode.assemble(features, items, self.projector)
        embeddings = [e.to(self.dtype) for e in encoded]
        self._finish_kernels()
        return TimedEncoding(embeddings, towered - started, time.perf_counter() - towered)

    def _finish_kernels(self) -> None:
        # CUDA runs kernels after their launch: without this wait the clock would time the
        # launches, and the projector would be charged with the tower's work. On a CPU the
        # work is done when the call returns.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, positions, hidden] for pictures that take the same positions (one request)."""
        alone = len(images) == 1
        encoded = self.encode_prepared([self.prepare(image, alone) for image in images])
        if not encoded:
            return torch.empty(
                (0, self.tokens_per_image, self.hidden_size), dtype=self.dtype, device=self.device
            )
        return torch.stack(encoded)


def _llm_hidden_size(root_config: Mapping[str, Any]) -> int:
    if "hidden_size" in root_config:
        return int(root_config["hidden_size"])
    llm_cfg = root_config.get("llm_cfg")
    if isinstance(llm_cfg, Mapping) and "hidden_size" in llm_cfg:
        return int(llm_cfg["hidden_size"])
    raise ValueError("root config has neither 'hidden_size' nor 'llm_cfg.hidden_size'")


def _load_tower(vision: VisionLayout, dtype: torch.dtype, device: torch.device | str) -> Any:
    source = vision.tower
    from vilaserve.adapters.worker.torch_vila.intern_vit import InternVitTower, is_intern_vit

    if is_intern_vit(source.config):
        return InternVitTower.from_pretrained(
            source.weights_dir, vision.select_layer, vision.select_feature, dtype, device
        )
    return VisionTower.from_source(
        source, vision.select_layer, vision.select_feature, dtype, device
    )


def _processor_config(vision: VisionLayout, tower: Any) -> ImageProcessorConfig:
    from vilaserve.adapters.worker.torch_vila.intern_vit import (
        intern_vit_preprocessor_config,
        is_intern_vit,
    )

    if is_intern_vit(vision.tower.config):
        # VILA builds InternViT's preprocessing in code, whatever file sits beside it (§3.4).
        return intern_vit_preprocessor_config(int(tower.image_size))
    path = vision.tower.preprocessor_config
    if path is None:
        raise FileNotFoundError(
            f"{vision.tower.where}: no preprocessor_config.json for the vision tower"
        )
    return ImageProcessorConfig.from_json(path)


def _load_projector(
    source: ProjectorSource,
    mm_hidden: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> MultimodalProjector:
    if source.key_map is None:
        return load_projector(
            source.weights_dir, mm_hidden, hidden, dtype, device, token_order=source.token_order
        )
    # LLaVA keeps the projector among the LLM's shards: take only its tensors, renamed.
    with torch.device("meta"):
        projector = build_projector(
            source.projector_type, mm_hidden, hidden, token_order=source.token_order
        )
    expected = projector.state_dict()
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(source.weights_dir):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                key = source.key_map(name)
                if key is not None:
                    state[key] = weights.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source.weights_dir}: the projector weights do not match a "
            f"{source.projector_type!r} projector (mm_hidden={mm_hidden}, hidden={hidden}): "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}"
        )
    projector.load_state_dict(state, strict=True, assign=True)
    return projector.eval()
