"""Which checkpoint layout a model directory holds, decided once, from its files alone.

- VILA-1.5: root config + `llm/` (Llama) + `vision_tower/` (SigLIP, CLIP or InternViT) +
  `mm_projector/`; `s2: true` marks the multi-scale VILA1.5-3b-s2.
- NVILA: the same three folders with a Qwen2 LLM; `image_aspect_ratio` `dynamic_s2` (NVILA)
  or `dynamic` (NVILA-Lite).
- LLaVA-1.5: one folder, `LlavaLlamaForCausalLM`; LLM and projector share the root shards and
  `mm_vision_tower` names a hub id, whose local copy the user passes with `--vision-tower`.
- llava-hf: one folder, `LlavaForConditionalGeneration`; everything in the root shards.
- LLM: a bare Llama or Qwen2 folder (text only).

Everything later stages need (key renames, token placeholders, the tower's config and
weights, the projector's kind and token order) is resolved here, so a layout the worker cannot
serve is refused at this point with the config field that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vilaserve.adapters.worker.torch_vila.checkpoint import (
    VilaCheckpoint,
    read_json_object,
    safetensors_files,
)

Family = Literal["VILA-1.5", "NVILA", "NVILA-Lite", "LLaVA-1.5", "llava-hf", "LLM"]
TokenOrder = Literal["column", "row"]
KeyMap = Callable[[str], str | None]

# VILA's own defaults (llava/model/multimodal_encoder) for keys an older config may lack.
_DEFAULT_SELECT_LAYER = -2
_DEFAULT_SELECT_FEATURE = "patch"
# Every VILA-1.5 release uses "resize"; a config without the key predates the field.
_DEFAULT_ASPECT_RATIO = "resize"
# VILA's LlavaConfig defaults for NVILA's tiling (absent from the released root configs).
_DEFAULT_MIN_TILES = 1
_DEFAULT_MAX_TILES = 12
# llava-hf's strategies, in LLaVA's words: "default" drops the class token, "full" keeps it.
_HF_SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}


def _same_key(name: str) -> str | None:
    return name


@dataclass(frozen=True)
class S2Scales:
    """VILA's multi-scale settings: `s2_scales` (ascending), `s2_max_split_size` and the
    scale whose token grid every scale is resized to (`s2_resize_output_to_scale_idx`)."""

    scales: tuple[int, ...]
    max_split_size: int
    resize_index: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], default_resize_index: int) -> S2Scales:
        raw = config.get("s2_scales")
        try:
            scales = tuple(sorted(int(s) for s in str(raw).split(",")))
            split = int(config["s2_max_split_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"s2_scales {raw!r} / s2_max_split_size must be a comma list of sizes and a size"
            ) from exc
        if not scales or min(scales) <= 0 or split <= 0:
            raise ValueError(f"s2_scales {raw!r} must list positive sizes")
        index = config.get("s2_resize_output_to_scale_idx")
        return cls(scales, split, default_resize_index if index is None else int(index))


@dataclass(frozen=True)
class TowerSource:
    """A vision tower's config and where its weights are (a folder, or the root shards under a
    key prefix, as llava-hf stores them)."""

    config: Mapping[str, Any]
    weights_dir: Path
    key_prefix: str = ""
    preprocessor_config: Path | None = None
    where: str = "vision_tower"


@dataclass(frozen=True)
class ProjectorSource:
    """The projector's kind and weights: `mm_projector/` (VILA), or root shards renamed by
    `key_map` to the projector's own `layers.<i>` names (LLaVA, llava-hf)."""

    projector_type: str
    weights_dir: Path
    key_map: KeyMap | None = None
    token_order: TokenOrder = "column"


@dataclass(frozen=True)
class VisionLayout:
    tower: TowerSource
    aspect_ratio: str
    select_layer: int
    select_feature: str
    mm_hidden: int
    projector: ProjectorSource
    s2: S2Scales | None = None
    min_tiles: int = _DEFAULT_MIN_TILES
    max_tiles: int = _DEFAULT_MAX_TILES


@dataclass(frozen=True)
class ImageTokens:
    """How images sit in the prompt: `<image>` -> VILA's -200 sentinel (VILA-1.5, LLaVA), or a
    real vocabulary token that the tokenizer emits (NVILA, llava-hf); text that follows each
    image's features (NVILA's "\\n")."""

    real_token: str | None = None
    end_text: str | None = None


@dataclass(frozen=True)
class ModelLayout:
    family: Family
    checkpoint: VilaCheckpoint
    tokenizer_dir: Path
    vision: VisionLayout | None
    image_tokens: ImageTokens = field(default_factory=ImageTokens)
    llm_key_map: KeyMap = _same_key
    template: str | None = None  # the conversation template this family was trained with

    @property
    def root(self) -> Path:
        return self.checkpoint.root

    def describe(self) -> dict[str, Any]:
        """The fields of the one log line that says what was found."""
        vision = self.vision
        out: dict[str, Any] = {"family": self.family, "llm": self.llm_model_type}
        if vision is None:
            return out | {"tower": None, "projector": None}
        tower = vision_tower_name(vision.tower.config)
        if vision.s2 is not None:
            scales = ",".join(str(s) for s in vision.s2.scales)
            tower += f" x S2[{scales}]"
        return out | {
            "tower": tower,
            "image_mode": vision.aspect_ratio,
            "projector": f"{vision.projector.projector_type} ({vision.projector.token_order}-major)"
            if "downsample" in vision.projector.projector_type
            else vision.projector.projector_type,
            "image_placeholder": self.image_tokens.real_token or "-200",
        }

    @property
    def llm_model_type(self) -> str:
        return str(self.checkpoint.llm_config.get("model_type", "llama"))


def vision_tower_name(config: Mapping[str, Any]) -> str:
    architectures = config.get("architectures") or []
    return str(architectures[0] if architectures else config.get("model_type", "?"))


def detect_layout(
    model_path: str | Path, vision_tower: str | Path | None = None, need_vision: bool = True
) -> ModelLayout:
    """The layout of `model_path`; `vision_tower` is a local folder for LLaVA-1.5's tower (its
    config names a hub id); `need_vision=False` (the quantizer) lets a LLaVA-1.5 folder open
    without it. Raises ValueError / FileNotFoundError naming the field or file."""
    root = Path(model_path).expanduser()
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a VILA, LLaVA or LLM checkpoint")
    config = read_json_object(config_path)
    architectures = [str(a) for a in config.get("architectures") or []]
    if "LlavaForConditionalGeneration" in architectures or config.get("model_type") == "llava":
        return _llava_hf(root, config)
    if (root / "llm").is_dir():
        return _three_part(root, config)
    if "LlavaLlamaForCausalLM" in architectures or "mm_vision_tower" in config:
        return _llava_original(root, config, vision_tower, need_vision)
    checkpoint = VilaCheckpoint.open(root)
    return ModelLayout("LLM", checkpoint, checkpoint.llm_dir, None)


# --- VILA-1.5 and NVILA: root config + llm/ + vision_tower/ + mm_projector/ ---------------------


def _three_part(root: Path, config: Mapping[str, Any]) -> ModelLayout:
    checkpoint = VilaCheckpoint.open(root)
    vision = vision_layout_of(root, config) if checkpoint.is_multimodal else None
    if not _is_nvila(config, checkpoint.llm_config):
        return ModelLayout("VILA-1.5", checkpoint, checkpoint.llm_dir, vision)
    return ModelLayout(
        "NVILA-Lite" if config.get("image_aspect_ratio") == "dynamic" else "NVILA",
        checkpoint,
        checkpoint.llm_dir,
        vision,
        # NVILA's `<image>` is an added vocabulary token, and its image encoder appends the
        # embedding of "\n" after every image (reference §0.4-0.5, §4.9).
        ImageTokens(real_token="<image>", end_text="\n"),
    )


def vision_layout_of(root: Path, config: Mapping[str, Any]) -> VisionLayout | None:
    """The vision side of a three-part checkpoint (None without `vision_tower/`)."""
    vision_dir, projector_dir = root / "vision_tower", root / "mm_projector"
    if not (vision_dir.is_dir() and projector_dir.is_dir()):
        return None
    aspect = str(config.get("image_aspect_ratio", _DEFAULT_ASPECT_RATIO))
    dynamic_s2 = bool(config.get("dynamic_s2")) or aspect == "dynamic_s2"
    if dynamic_s2 and aspect != "dynamic_s2":
        raise ValueError(
            f"{root}/config.json: dynamic_s2 is true but image_aspect_ratio is {aspect!r} "
            "(NVILA's dynamic S2 tiles with image_aspect_ratio 'dynamic_s2')"
        )
    s2: S2Scales | None = None
    if dynamic_s2:
        # NVILA resizes every scale to the last scale's grid (-1) unless the config says.
        s2 = S2Scales.from_config(config, default_resize_index=-1)
    elif config.get("s2"):
        s2 = S2Scales.from_config(config, default_resize_index=0)
    llm_config = config.get("llm_cfg")
    nvila = _is_nvila(config, llm_config if isinstance(llm_config, Mapping) else {})
    return VisionLayout(
        tower=_tower_source(vision_dir),
        aspect_ratio=aspect,
        select_layer=int(config.get("mm_vision_select_layer", _DEFAULT_SELECT_LAYER)),
        select_feature=str(config.get("mm_vision_select_feature", _DEFAULT_SELECT_FEATURE)),
        mm_hidden=int(config.get("mm_hidden_size") or 0),
        projector=ProjectorSource(
            _read_projector_type(projector_dir),
            projector_dir,
            # VILA reordered mlp_downsample's tokens at the NVILA release (reference §0.2):
            # VILA-1.5 weights were trained column-major, NVILA's row-major.
            token_order="row" if nvila else "column",
        ),
        s2=s2,
        min_tiles=int(config.get("min_tiles") or _DEFAULT_MIN_TILES),
        max_tiles=int(config.get("max_tiles") or _DEFAULT_MAX_TILES),
    )


def _is_nvila(config: Mapping[str, Any], llm_config: Mapping[str, Any]) -> bool:
    """NVILA tiles pictures (`dynamic_s2` / `dynamic`) and is the family with a Qwen2 LLM."""
    aspect = config.get("image_aspect_ratio")
    return aspect in ("dynamic_s2", "dynamic") or llm_config.get("model_type") == "qwen2"


def _tower_source(folder: Path) -> TowerSource:
    """A tower in a folder of its own: its config, weights and preprocessor config."""
    processor = folder / "preprocessor_config.json"
    return TowerSource(
        read_json_object(folder / "config.json"),
        folder,
        preprocessor_config=processor if processor.is_file() else None,
        where=str(folder),
    )


def _read_projector_type(directory: Path) -> str:
    config_path = directory / "config.json"
    config = read_json_object(config_path)
    projector_type = config.get("mm_projector_type")
    if not isinstance(projector_type, str):
        raise ValueError(f"{config_path} has no string field 'mm_projector_type'")
    return projector_type


# --- LLaVA-1.5 original: one folder, tower by hub id --------------------------------------------

# Keys of LLaVA's LlavaLlamaForCausalLM that are not the LLM's: the projector is read apart, the
# tower (present only in some re-saves) comes from --vision-tower, the resampler/newline unused.
_LLAVA_NOT_LLM = ("model.mm_projector.", "model.vision_tower.", "model.vision_resampler.")
_LLAVA_UNUSED = ("model.image_newline",)


def _llava_llm_key(name: str) -> str | None:
    if name.startswith(_LLAVA_NOT_LLM) or name in _LLAVA_UNUSED:
        return None
    return name


def _llava_projector_key(name: str) -> str | None:
    prefix = "model.mm_projector."
    return "layers." + name.removeprefix(prefix) if name.startswith(prefix) else None


def _llava_original(
    root: Path, config: Mapping[str, Any], vision_tower: str | Path | None, need_vision: bool
) -> ModelLayout:
    checkpoint = VilaCheckpoint(root, dict(config), root, dict(config), None, None)
    tower_name = config.get("mm_vision_tower")
    if not tower_name:
        return ModelLayout("LLM", checkpoint, root, None, llm_key_map=_llava_llm_key)
    vision = None
    try:
        tower_dir = _llava_tower_dir(root, str(tower_name), vision_tower)
    except FileNotFoundError:
        if need_vision:
            raise
    else:
        vision = _llava_vision(root, config, tower_dir)
    return ModelLayout(
        "LLaVA-1.5", checkpoint, root, vision, llm_key_map=_llava_llm_key, template="llava_v1"
    )


def _llava_vision(root: Path, config: Mapping[str, Any], tower_dir: Path) -> VisionLayout:
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(
            f"{root}/config.json: mm_patch_merge_type {config['mm_patch_merge_type']!r} is "
            "LLaVA-NeXT's any-resolution layout; only 'flat' (LLaVA-1.5) is supported"
        )
    return VisionLayout(
        tower=_tower_source(tower_dir),
        aspect_ratio=str(config.get("image_aspect_ratio", "square")),
        select_layer=int(config.get("mm_vision_select_layer", _DEFAULT_SELECT_LAYER)),
        select_feature=str(config.get("mm_vision_select_feature", _DEFAULT_SELECT_FEATURE)),
        mm_hidden=int(config.get("mm_hidden_size") or 0),
        projector=ProjectorSource(
            str(config.get("mm_projector_type", "linear")), root, _llava_projector_key
        ),
    )


def _llava_tower_dir(root: Path, tower_name: str, flag: str | Path | None) -> Path:
    """`--vision-tower` if given; else `mm_vision_tower` when it is a local folder (absolute or
    beside the checkpoint). A hub id is refused with what to do, as nothing is downloaded."""
    if flag is not None:
        path = Path(flag).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--vision-tower {path}: no config.json there")
        return path
    for candidate in (Path(tower_name).expanduser(), root / tower_name):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{root}/config.json: mm_vision_tower {tower_name!r} is not a local folder; "
        f"download that vision tower and pass its folder with --vision-tower"
    )


# --- llava-hf: LlavaForConditionalGeneration ----------------------------------------------------

# (on-disk prefix, our prefix): conversion-era files first, then what transformers 5 saves.
_HF_LLM_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
_HF_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
_HF_PROJECTOR = {"linear_1": "layers.0", "linear_2": "layers.2"}


def _hf_llm_key(name: str) -> str | None:
    for prefix, ours in _HF_LLM_PREFIXES:
        if name.startswith(prefix):
            return ours + name.removeprefix(prefix)
    return None


def _hf_projector_key(name: str) -> str | None:
    for prefix in ("multi_modal_projector.", "model.multi_modal_projector."):
        if name.startswith(prefix):
            layer, _, rest = name.removeprefix(prefix).partition(".")
            return f"{_HF_PROJECTOR[layer]}.{rest}" if layer in _HF_PROJECTOR else None
    return None


def _llava_hf(root: Path, config: Mapping[str, Any]) -> ModelLayout:
    text = config.get("text_config")
    vision_config = config.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision_config, Mapping):
        raise ValueError(f"{root}/config.json: llava needs text_config and vision_config objects")
    llm_config = _filled_text_config(text, root)
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(
            f"{root}/config.json: vision_feature_layer {layer!r}: a list of layers (features "
            "concatenated over layers) is not supported; one layer index is"
        )
    strategy = str(config.get("vision_feature_select_strategy", "default"))
    if strategy not in _HF_SELECT_FEATURE:
        raise ValueError(
            f"{root}/config.json: vision_feature_select_strategy {strategy!r} "
            f"(supported: {', '.join(_HF_SELECT_FEATURE)})"
        )
    act = str(config.get("projector_hidden_act", "gelu"))
    if act != "gelu" or config.get("multimodal_projector_bias", True) is not True:
        raise ValueError(
            f"{root}/config.json: projector_hidden_act {act!r} / multimodal_projector_bias: "
            "only LLaVA-1.5's gelu projector with biases is supported"
        )
    tower_config = dict(vision_config)
    tower_config.setdefault("model_type", "clip_vision_model")
    processor = root / "preprocessor_config.json"
    # The prefix actually present decides how tower keys are stripped.
    prefix = _present_prefix(root, _HF_TOWER_PREFIXES)
    vision = VisionLayout(
        tower=TowerSource(
            tower_config,
            root,
            key_prefix=prefix,
            preprocessor_config=processor if processor.is_file() else None,
            where=f"{root} ({prefix}*)",
        ),
        # llava-hf's processor resizes the short side and centre-crops; no padding (§0.6).
        aspect_ratio="square",
        select_layer=layer,
        select_feature=_HF_SELECT_FEATURE[strategy],
        mm_hidden=int(tower_config.get("hidden_size") or 0),
        projector=ProjectorSource("mlp2x_gelu", root, _hf_projector_key),
    )
    checkpoint = VilaCheckpoint(root, dict(config), root, llm_config, None, None)
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    if image_token_id is None:
        raise ValueError(f"{root}/config.json: image_token_index is missing")
    return ModelLayout(
        "llava-hf",
        checkpoint,
        root,
        vision,
        ImageTokens(real_token="<image>"),
        llm_key_map=_hf_llm_key,
        template="llava_v1",
    )


def _filled_text_config(text: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """llava-hf stores only the text config's non-default fields (the 7b: 7 of them), so the
    rest come from transformers' own LlamaConfig defaults."""
    model_type = str(text.get("model_type", "llama"))
    if model_type != "llama":
        raise ValueError(
            f"{root}/config.json: text_config.model_type {model_type!r}: only Llama LLMs are "
            "supported in llava checkpoints"
        )
    from transformers import LlamaConfig

    filled = LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}).to_dict()
    filled["model_type"] = "llama"
    return filled


def _present_prefix(root: Path, prefixes: tuple[str, ...]) -> str:
    from safetensors import safe_open

    for path in safetensors_files(root):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                for prefix in prefixes:
                    # Hub files nest the tower under `vision_model.`; transformers 5 saves
                    # CLIP without that level (`vision_tower.embeddings...`).
                    if name.startswith((prefix + "vision_model.", prefix + "embeddings.")):
                        return prefix
    raise ValueError(f"{root}: no vision tower weights (keys {' or '.join(prefixes)}*)")
