"""Images -> LLM-space embeddings for a VILA three-part checkpoint.

Composes the preprocessor (`vision_tower/preprocessor_config.json` + root `image_aspect_ratio`),
the truncated vision tower and the `mm_projector/`. Everything shape-related is derived from the
configs, so VILA-1.0 (576 tokens), 1.5 (196) and other geometries need no constants here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vilaserve.adapters.worker.torch_vila.image_processing import (
    ImagePreprocessor,
    ImageProcessorConfig,
)
from vilaserve.adapters.worker.torch_vila.projector import MultimodalProjector, load_projector
from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower

# VILA's own defaults (llava/model/multimodal_encoder) for keys an older config may lack.
_DEFAULT_SELECT_LAYER = -2
_DEFAULT_SELECT_FEATURE = "patch"
# Every VILA-1.5 release uses "resize"; a config without the key predates the field.
_DEFAULT_ASPECT_RATIO = "resize"


def _llm_hidden_size(root_config: Mapping[str, Any]) -> int:
    if "hidden_size" in root_config:
        return int(root_config["hidden_size"])
    llm_cfg = root_config.get("llm_cfg")
    if isinstance(llm_cfg, Mapping) and "hidden_size" in llm_cfg:
        return int(llm_cfg["hidden_size"])
    raise ValueError("root config has neither 'hidden_size' nor 'llm_cfg.hidden_size'")


class VisionPipeline:
    """Preprocess, run the tower and the projector; `encode` gives [N, tokens_per_image, H]."""

    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        tower: VisionTower,
        projector: MultimodalProjector,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        expected = (tower.image_size, tower.image_size)
        if preprocessor.output_size != expected:
            raise ValueError(
                f"the image preprocessor produces {preprocessor.output_size} but the vision "
                f"tower expects {expected}"
            )
        self.preprocessor = preprocessor
        self.tower = tower
        self.projector = projector
        self.dtype = dtype
        self.device = torch.device(device)
        if projector.mm_hidden != tower.hidden_size:
            raise ValueError(
                f"the projector expects {projector.mm_hidden}-wide features but the vision tower "
                f"emits {tower.hidden_size}"
            )
        self.tokens_per_image = projector.output_tokens(tower.output_tokens())

    @classmethod
    def from_checkpoint(
        cls,
        root: Path,
        root_config: Mapping[str, Any],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> VisionPipeline:
        root = Path(root)
        if root_config.get("s2"):
            raise ValueError(f"{root}: S2 multi-scale vision towers (s2: true) are not supported")
        tower_dir = root / "vision_tower"
        processor_config = ImageProcessorConfig.from_json(tower_dir / "preprocessor_config.json")
        preprocessor = ImagePreprocessor(
            processor_config, str(root_config.get("image_aspect_ratio", _DEFAULT_ASPECT_RATIO))
        )
        select_layer = root_config.get("mm_vision_select_layer", _DEFAULT_SELECT_LAYER)
        select_feature = root_config.get("mm_vision_select_feature", _DEFAULT_SELECT_FEATURE)
        tower = VisionTower.from_pretrained(
            tower_dir,
            select_layer=int(select_layer),
            select_feature=str(select_feature),
            dtype=dtype,
            device=device,
        )
        mm_hidden = int(root_config.get("mm_hidden_size", tower.hidden_size))
        if mm_hidden != tower.hidden_size:
            raise ValueError(
                f"{root}: mm_hidden_size {mm_hidden} differs from the vision tower's hidden size "
                f"{tower.hidden_size}"
            )
        projector = load_projector(
            root / "mm_projector", mm_hidden, _llm_hidden_size(root_config), dtype, device
        )
        return cls(preprocessor, tower, projector, dtype, device)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings `encode` returns (the LLM hidden size)."""
        return self.projector.hidden

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CPU-only step, split out so callers can run it off the accelerator's thread."""
        return self.preprocessor(images)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, tokens_per_image, hidden] in the pipeline dtype."""
        with torch.inference_mode():
            pixels = pixels.to(device=self.device, dtype=self.dtype, non_blocking=True)
            features = self.projector(self.tower(pixels))
        if features.shape[1] != self.tokens_per_image:
            # A mismatch here would silently misalign every image splice downstream.
            raise RuntimeError(
                f"vision pipeline emitted {features.shape[1]} tokens per image, "
                f"configs promise {self.tokens_per_image}"
            )
        return features.to(self.dtype)

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(
                (0, self.tokens_per_image, self.hidden_size), dtype=self.dtype, device=self.device
            )
        return self.encode_pixels(self.preprocess(images))
