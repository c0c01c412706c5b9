"""Tiny random checkpoints of every layout issue 17 serves, one builder per layout.

VILA1.5-3b-s2 and VILA1.5-40b are here (they are VILA-1.5's three-part layout with other
fields, tower or tokenizer); NVILA lives in `tiny_nvila`, LLaVA-1.5 (original and llava-hf) in
`tiny_llava`, and all builders are re-exported so tests import one module. Sizes are toy, config
field names, weight names and folder structure are the releases' (reference doc
`vila-family-layouts.md`). Every builder is deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.checkpoints.tiny_llava import (
    build_tiny_clip,
    build_tiny_llava,
    build_tiny_llava_hf,
)
from vilaserve.adapters.offline.checkpoints.tiny_nvila import (
    add_vision_model_prefix,
    build_tiny_nvila,
)
from vilaserve.adapters.offline.checkpoints.tiny_vila import (
    _build_llm,
    _build_projector,
    _build_vision_tower,
    build_tokenizer,
)

__all__ = [
    "build_tiny_clip",
    "build_tiny_llava",
    "build_tiny_llava_hf",
    "build_tiny_nvila",
    "build_tiny_vila_40b",
    "build_tiny_vila_s2",
]

INIT_STD = 0.02
LLM_HIDDEN = 64
VISION_HIDDEN = 32
IMAGE_SIZE = 32
PATCH_SIZE = 8

# Stand-ins for VILA1.5-3b-s2's `s2_scales "384,768"` and `s2_max_split_size 384` (§0.1, §2.1).
S2_SCALES = (32, 64)


def build_tiny_vila_s2(root: Path, seed: int = 0) -> Path:
    """A random VILA1.5-3b-s2 checkpoint (§2.1): VILA1.5-3b's layout with two S2 scales.

    SigLIP tower at the small scale (32 px, 4x4 grid), `mm_hidden_size` = 2 x tower width,
    `mlp_downsample` over 4 x 2C channels. Returns `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    channels = VISION_HIDDEN * len(S2_SCALES)

    llm_dir = build_tokenizer(root / "llm", "sentencepiece")
    llm_cfg = _build_llm(llm_dir, gen, LLM_HIDDEN, 2, INIT_STD, "200KB")
    vision_cfg = _build_vision_tower(
        root / "vision_tower", "siglip", gen, VISION_HIDDEN, IMAGE_SIZE, PATCH_SIZE, INIT_STD
    )
    add_vision_model_prefix(root / "vision_tower")
    # The release's processor is reported at 768, the largest scale (vila-tinychat-awq §1.3);
    # VILA overrides it in code anyway (§8).
    vila_layout.write_json(
        root / "vision_tower" / "preprocessor_config.json",
        vila_layout.preprocessor_config("siglip", max(S2_SCALES)),
    )
    projector_cfg = _build_projector(
        root / "mm_projector", "siglip", gen, channels, LLM_HIDDEN, INIT_STD
    )

    config = vila_layout.root_config("siglip", llm_cfg, vision_cfg, projector_cfg)
    config.update(
        {
            "s2": True,
            "s2_scales": ",".join(str(s) for s in S2_SCALES),
            "s2_max_split_size": min(S2_SCALES),
            "mm_hidden_size": channels,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": "resize",
        }
    )
    vila_layout.write_root(root, config)
    return root


def build_tiny_vila_40b(root: Path, seed: int = 0) -> Path:
    """A random VILA1.5-40b checkpoint (§3): InternViT-6B tower, hermes-2 (ChatML) Llama.

    `vision_tower/` as `tiny_intern_vit` writes it (no preprocessor config: VILA builds
    InternViT's preprocessing in code), `mm_vision_select_layer -1`, `"patch"` features,
    `mlp_downsample` over 4C. Returns `root`.
    """
    from vilaserve.adapters.offline.checkpoints.tiny_intern_vit import write_tiny_intern_vit

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    llm_dir = build_tokenizer(root / "llm", "chatml")
    llm_cfg = _build_llm(llm_dir, gen, LLM_HIDDEN, 2, INIT_STD, "200KB")
    # Its own seed stream, derived from `seed`, so the tower does not depend on the LLM's size.
    vision_cfg = write_tiny_intern_vit(
        root / "vision_tower",
        seed=seed + 1,
        hidden_size=VISION_HIDDEN,
        num_heads=2,
        num_layers=3,
        intermediate_size=2 * VISION_HIDDEN,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    projector_cfg = _build_projector(
        root / "mm_projector", "siglip", gen, VISION_HIDDEN, LLM_HIDDEN, INIT_STD
    )

    config = vila_layout.root_config("siglip", llm_cfg, vision_cfg, projector_cfg)
    config.update(
        {
            # The release's root _name_or_path is a training name, not a usable path (§1).
            "_name_or_path": "vila1.5-34b",
            "mm_hidden_size": VISION_HIDDEN,
            "mm_vision_select_layer": -1,
            "mm_vision_select_feature": "patch",
            "image_aspect_ratio": "resize",
        }
    )
    vila_layout.write_root(root, config)
    return root
