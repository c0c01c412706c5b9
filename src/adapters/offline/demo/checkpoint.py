"""Assembling the demo model as a VILA-1.5 directory from SmolLM2 and the committed weights.

The result has VILA1.5-3b's layout and root config fields (`vila_layout`), so the worker loads
it through exactly the code path of a real release: `llm/` (SmolLM2-135M-Instruct with its own
tokenizer and chat template), `vision_tower/` (SigLIP, `preprocessor_config.json`) and
`mm_projector/` (`mlp_downsample`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import SiglipVisionModel

from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.demo.vision_model import (
    ASPECT_RATIO,
    IMAGE_SIZE,
    PROJECTOR_TYPE,
    full_tower_state,
    projector_state,
    siglip_config,
)

# The demo answers in a few words; a 2048-position context keeps the KV cache small on CPU
# (VILA stores its training context under this name too).
CONTEXT_LENGTH = 2048
LLM_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def write_demo_checkpoint(
    target: Path,
    llm_hf_dir: Path,
    trained: dict[str, torch.Tensor],
    training_steps: int,
    aspect_ratio: str = ASPECT_RATIO,
) -> Path:
    """Writes the 16-bit demo checkpoint to `target` (built aside, renamed into place last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        llm_cfg = _write_llm(staging / "llm", Path(llm_hf_dir))
        vision_cfg = _write_vision_tower(staging / "vision_tower", trained)
        projector_cfg = _write_projector(staging / "mm_projector", trained)
        config = vila_layout.root_config("siglip", llm_cfg, vision_cfg, projector_cfg)
        config["image_aspect_ratio"] = aspect_ratio  # as the tower was trained
        vila_layout.write_root(staging, config, global_step=training_steps)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)  # an earlier, incomplete attempt
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard link when possible: the LLM weights are 270 MB and never modified in place."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _write_llm(llm_dir: Path, hf_dir: Path) -> dict[str, object]:
    llm_dir.mkdir(parents=True)
    for name in LLM_FILES:
        source = hf_dir / name
        if source.is_file() and name != "config.json":
            _link_or_copy(source, llm_dir / name)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    config["tokenizer_model_max_length"] = CONTEXT_LENGTH
    config["tokenizer_padding_side"] = "right"
    config.setdefault("torch_dtype", config.get("dtype", "float16"))
    vila_layout.write_json(llm_dir / "config.json", config)
    return config


def _write_vision_tower(out_dir: Path, trained: dict[str, torch.Tensor]) -> dict[str, object]:
    with torch.device("meta"):
        model = SiglipVisionModel(siglip_config())
    model.load_state_dict(full_tower_state(trained), strict=True, assign=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    vila_layout.write_json(
        out_dir / "preprocessor_config.json", vila_layout.preprocessor_config("siglip", IMAGE_SIZE)
    )
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    saved.setdefault("torch_dtype", "bfloat16")
    vila_layout.write_json(out_dir / "config.json", saved)
    return saved


def _write_projector(out_dir: Path, trained: dict[str, torch.Tensor]) -> dict[str, object]:
    out_dir.mkdir(parents=True)
    save_file(
        projector_state(trained), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    config = vila_layout.projector_config(PROJECTOR_TYPE)
    vila_layout.write_json(out_dir / "config.json", config)
    return config
