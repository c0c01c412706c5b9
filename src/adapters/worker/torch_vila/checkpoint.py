"""Reading a VILA checkpoint directory: the root config and the LLM's safetensors.

VILA-1.5 layout: `config.json` (llm_cfg, vision_tower_cfg, mm_projector_cfg, ...), `llm/`,
`vision_tower/`, `mm_projector/`. A plain Hugging Face Llama folder also opens (text only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm


@dataclass(frozen=True)
class VilaCheckpoint:
    root: Path
    config: dict[str, Any]
    llm_dir: Path
    llm_config: dict[str, Any]
    vision_dir: Path | None
    projector_dir: Path | None

    @property
    def is_multimodal(self) -> bool:
        return self.vision_dir is not None and self.projector_dir is not None

    @classmethod
    def open(cls, root: str | Path) -> VilaCheckpoint:
        root = Path(root).expanduser()
        config_path = root / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a VILA or Llama checkpoint")
        config = read_json_object(config_path)
        llm_dir = root / "llm"
        if not llm_dir.is_dir():
            # A plain LLM folder: the checkpoint is its own `llm/`, with no vision parts.
            return cls(root, config, root, config, None, None)
        llm_config_path = llm_dir / "config.json"
        llm_config = read_json_object(llm_config_path) if llm_config_path.is_file() else None
        llm_config = llm_config or config.get("llm_cfg")
        if not llm_config:
            raise FileNotFoundError(f"{llm_config_path} not found and config.json has no llm_cfg")
        vision_dir = root / "vision_tower"
        projector_dir = root / "mm_projector"
        return cls(
            root,
            config,
            llm_dir,
            llm_config,
            vision_dir if vision_dir.is_dir() else None,
            projector_dir if projector_dir.is_dir() else None,
        )


def read_json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object, or a ValueError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def safetensors_files(directory: Path) -> list[Path]:
    """The weight shards of `directory`, tolerating the stale index of the AWQ releases.

    VILA's AWQ repositories ship the fp16 `model.safetensors.index.json` without its shards;
    when the index names files that are missing we use what is actually there, and say so
    clearly when nothing is.
    """
    index = directory / "model.safetensors.index.json"
    present = sorted(directory.glob("*.safetensors"))
    if index.is_file():
        listed = sorted(
            {directory / n for n in read_json_object(index).get("weight_map", {}).values()}
        )
        if listed and all(p.is_file() for p in listed):
            return listed
    if present:
        return present
    pickles = sorted(p.name for p in directory.glob("*.pt"))
    hint = (
        f"; it holds {', '.join(pickles)}: pass it with --quant-path and --precision W4A16"
        if pickles
        else ""
    )
    stale = " (the index names shards that do not exist)" if index.is_file() else ""
    raise FileNotFoundError(f"no safetensors weights in {directory}{stale}{hint}")


def load_state_dict(directory: Path, show_progress: bool = True) -> dict[str, torch.Tensor]:
    files = safetensors_files(directory)
    state: dict[str, torch.Tensor] = {}
    for path in tqdm(
        files,
        desc=f"loading {directory.name}",
        unit="shard",
        disable=not show_progress or len(files) < 2,
    ):
        state.update(load_file(str(path)))
    return state
