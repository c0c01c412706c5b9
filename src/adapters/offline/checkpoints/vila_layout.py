"""Writing VILA-1.5's three-part checkpoint layout (reference doc sections 1.1, 1.2, 1.4).

`<root>/config.json` (llm_cfg, vision_tower_cfg, mm_projector_cfg and VILA1.5-3b's other
fields), `<root>/trainer_state.json`, `llm/`, `vision_tower/` (with a `preprocessor_config.json`)
and `mm_projector/`. The test fixtures' tiny random checkpoints and the embedded demo model are
both written with these pieces, so both look to a loader exactly like a real VILA release.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

VisionKind = Literal["siglip", "clip"]

# What transformers' image processors default to; SigLIP normalizes with 0.5 everywhere.
_SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def part_config(saved: dict[str, Any], folder: str) -> dict[str, Any]:
    """A sub-folder's config as the root config embeds it (VILA resolves `./<folder>`)."""
    return {**saved, "_name_or_path": f"./{folder}"}


def preprocessor_config(vision: VisionKind, image_size: int) -> dict[str, Any]:
    """`vision_tower/preprocessor_config.json`: SigLIP's squash-resize or CLIP's resize+crop."""
    common: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
    }
    if vision == "siglip":
        return {
            **common,
            "image_mean": _SIGLIP_MEAN_STD,
            "image_processor_type": "SiglipImageProcessor",
            "image_std": _SIGLIP_MEAN_STD,
            "processor_class": "SiglipProcessor",
            "size": {"height": image_size, "width": image_size},
        }
    return {
        **common,
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": _CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": _CLIP_STD,
        "size": {"shortest_edge": image_size},
    }


def projector_config(projector_type: str) -> dict[str, Any]:
    """`mm_projector/config.json` as VILA's `MultimodalProjector` saves it."""
    return {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": projector_type,
        "model_type": "v2l_projector",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }


def root_config(
    vision: VisionKind,
    llm_cfg: dict[str, Any],
    vision_tower_cfg: dict[str, Any],
    mm_projector_cfg: dict[str, Any],
) -> dict[str, Any]:
    """The root `config.json`: VILA1.5-3b's field set and values (reference section 1.2).

    `vision="siglip"` is VILA-1.5 (resize, cls_patch); `"clip"` the LLaVA-1.5-style setup
    (pad, patch). The three part configs are embedded with their `_name_or_path`.
    """
    return {
        "_name_or_path": "./vlm",
        "architectures": ["LlavaLlamaModel"],
        "drop_path_rate": 0.0,
        "hidden_size": int(llm_cfg["hidden_size"]),
        "image_aspect_ratio": "resize" if vision == "siglip" else "pad",
        "interpolate_mode": "linear",
        "llm_cfg": part_config(llm_cfg, "llm"),
        "mm_hidden_size": int(vision_tower_cfg["hidden_size"]),
        "mm_projector_cfg": part_config(mm_projector_cfg, "mm_projector"),
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "cls_patch" if vision == "siglip" else "patch",
        "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16",
        "model_type": "llava_llama",
        "num_video_frames": 8,
        "resume_path": "./vlm",
        "s2": False,
        "s2_max_split_size": 336,
        "s2_scales": "336,672,1008",
        "soft_ce_std": 1.0,
        "transformers_version": "4.36.2",
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": True,
        "vision_resolution": -1,
        "vision_tower_cfg": part_config(vision_tower_cfg, "vision_tower"),
    }


def trainer_state(global_step: int = 1) -> dict[str, Any]:
    """`trainer_state.json` (irrelevant for serving, present in every release)."""
    return {
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": 1.0,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [],
        "max_steps": global_step,
        "num_train_epochs": 1,
        "total_flos": 0,
        "trial_name": None,
        "trial_params": None,
    }


def write_root(root: Path, config: dict[str, Any], global_step: int = 1) -> None:
    write_json(root / "config.json", config)
    write_json(root / "trainer_state.json", trainer_state(global_step))
