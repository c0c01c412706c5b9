"""The demo model's vision side: a small SigLIP tower and VILA's `mlp_downsample` projector.

Sized for a 2-core CPU: 128 px pictures cut into 16 px patches give an 8 x 8 grid, which the
projector merges 2 x 2 into 16 LLM positions per image. The tower has 5 layers of width 192;
as in VILA1.5-3b the LLM reads `hidden_states[-2]`, so 4 of them run and the last one (and the
post-layernorm) never do. Training therefore stores only what runs (`TRAINED_PREFIXES`), and
`full_tower_state` fills the never-run parts deterministically when the checkpoint is built.

The modules are the product's own (`VisionTower`, `build_projector`, `ImagePreprocessor`), so
the features seen in training are computed by exactly the code that serves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.demo.build_cache import WEIGHTS_FILE
from vilaserve.adapters.worker.torch_vila.image_processing import (
    ImagePreprocessor,
    ImageProcessorConfig,
)
from vilaserve.adapters.worker.torch_vila.projector import MultimodalProjector, build_projector
from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower

IMAGE_SIZE = 128
PATCH_SIZE = 16
VISION_HIDDEN = 192
VISION_LAYERS = 5
VISION_HEADS = 3
VISION_MLP = 768
SELECT_LAYER = -2  # VILA1.5-3b's value: the last layer's output is never used
SELECT_FEATURE = "cls_patch"  # SigLIP has no class token: keep every patch
PROJECTOR_TYPE = "mlp_downsample"

# Key prefixes of the committed file: the tower's running part and the projector.
TOWER_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "mm_projector."


def siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_MLP,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        vision_use_head=False,  # the pooling head is never used by VILA
        architectures=["SiglipVisionModel"],
    )


# What the recipe trains with: VILA's `pad` (pictures centred on a square of the mean colour
# before the resize), so a square in a wide frame stays a square (`resize` would hand the tower
# a rectangle). Weights record theirs in their provenance; earlier ones were trained with
# `resize` (`weights_aspect_ratio`).
ASPECT_RATIO = "pad"


def preprocessor(aspect_ratio: str = ASPECT_RATIO) -> ImagePreprocessor:
    """The serving preprocessor (128 x 128 bicubic, normalize to [-1, 1])."""
    config = ImageProcessorConfig.from_dict(vila_layout.preprocessor_config("siglip", IMAGE_SIZE))
    return ImagePreprocessor(config, aspect_ratio)


def weights_aspect_ratio(weights: Path = WEIGHTS_FILE) -> str:
    """The aspect-ratio step the weights were trained with, from their provenance file."""
    provenance = weights.with_suffix(".json")
    if not provenance.is_file():
        return ASPECT_RATIO
    return str(json.loads(provenance.read_text()).get("image_aspect_ratio", "resize"))


class DemoVision(nn.Module):
    """Pixels [N, 3, 128, 128] -> LLM-space image embeddings [N, 16, llm_hidden]."""

    def __init__(self, tower: VisionTower, projector: MultimodalProjector) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixels))

    @property
    def tokens_per_image(self) -> int:
        return self.projector.output_tokens(self.tower.output_tokens())

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything that runs, under the committed file's key names, in bf16."""
        state = {TOWER_PREFIX + k: v for k, v in self.tower.state_dict().items()}
        state |= {PROJECTOR_PREFIX + k: v for k, v in self.projector.state_dict().items()}
        return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        tower = _strip(state, TOWER_PREFIX)
        projector = _strip(state, PROJECTOR_PREFIX)
        self.tower.load_state_dict(tower, strict=True)
        self.projector.load_state_dict(projector, strict=True)


def sincos_positions(side: int, width: int) -> torch.Tensor:
    """2D sine-cosine position codes [side * side, width] (row-major grid, as MAE uses):
    half the channels encode the row, half the column, at geometric frequencies."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(side, dtype=torch.float64)
    angles = coords[:, None] * frequencies[None, :]  # [side, quarter]
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # [side, width / 2]
    rows = code[:, None, :].expand(side, side, -1)
    cols = code[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, width).float()


def new_demo_vision(llm_hidden: int, seed: int) -> DemoVision:
    """A freshly initialised tower and projector, from `seed`: transformers' SigLIP init, except
    the position embedding, which starts as 2D sine-cosine codes. Its default (a small random
    table) leaves where a patch is almost invisible next to what it shows, and a tower trained
    from scratch on a few ten thousand pictures then never learns where things are."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(siglip_config())
    with torch.no_grad():
        table = model.embeddings.position_embedding.weight
        table.copy_(sincos_positions(IMAGE_SIZE // PATCH_SIZE, VISION_HIDDEN))
    tower = VisionTower(model, SELECT_LAYER, SELECT_FEATURE)
    projector = build_projector(PROJECTOR_TYPE, VISION_HIDDEN, llm_hidden)
    return DemoVision(tower, projector).float()


def save_weights(vision: DemoVision, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vision.trained_state(), str(path), metadata={"format": "pt"})


def load_weights(path: Path = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"demo vision weights {path} are missing (train-demo-vision)")
    return load_file(str(path))


def full_tower_state(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A complete `SiglipVisionModel` state: the trained layers, plus the layer and norm that
    `mm_vision_select_layer = -2` never runs, filled with a fixed-seed init so that the built
    checkpoint is reproducible byte for byte."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model = SiglipVisionModel(siglip_config())
        state = {
            k: torch.randn(v.shape, generator=generator) * 0.02
            for k, v in model.state_dict().items()
        }
    for name in state:
        if "norm" in name:
            state[name] = (
                torch.ones_like(state[name]) if name.endswith("weight") else state[name] * 0
            )
    tower = _strip(trained, TOWER_PREFIX)
    unknown = sorted(tower.keys() - state.keys())
    if unknown:
        raise ValueError(f"demo vision weights have keys the SigLIP tower lacks: {unknown[:5]}")
    state |= tower
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def projector_state(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v.to(torch.bfloat16).contiguous() for k, v in _strip(trained, PROJECTOR_PREFIX).items()
    }


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
