"""Tiny random LLaVA-1.5 checkpoints in both released layouts (reference doc section 6).

- `build_tiny_llava`: `liuhaotian/llava-v1.5-7b`, one folder holding the Llama, the projector
  under `model.mm_projector.{0,2}` and no vision tensors (the tower comes from the hub id in
  `mm_vision_tower`), plus `mm_projector.bin`.
- `build_tiny_clip`: what that hub id (`openai/clip-vit-large-patch14-336`) holds: a full CLIP.
- `build_tiny_llava_hf`: `llava-hf/llava-1.5-7b-hf`, transformers' `LlavaForConditionalGeneration`
  with the weight names of the Hub files or of what transformers 5 itself saves.

Sizes are toy (image 32 / patch 8 stands for 336 / 14), names and structure are real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer

from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.checkpoints.tiny_vila import (
    BOS,
    EOS,
    MODEL_MAX_LENGTH,
    UNK,
    _randomize,
    build_tokenizer,
)

KeyStyle = Literal["conversion", "transformers5"]

CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"

INIT_STD = 0.02
IMAGE_SIZE = 32
PATCH_SIZE = 8
CLIP_VISION_HIDDEN = 32
LLM_HIDDEN = 64
# convert_llava_weights_to_hf.py pads the embedding matrices to a multiple of 64 (§6.2).
VOCAB_PAD_MULTIPLE = 64

# Written for these fixtures in the style of the llava-hf processors' templates: images first,
# then the text, `USER: <image>\n{q} ASSISTANT:`, no system prompt (§6.2's example prompt).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """A random full `CLIPModel` folder shaped like `openai/clip-vit-large-patch14-336`.

    `config.json` (`model_type "clip"`, text and vision configs), `model.safetensors` with
    `vision_model.*`, `text_model.*`, the projections and `logit_scale` (float32, as the hub),
    and the hub's legacy-format `preprocessor_config.json`. The CLIP text tokenizer files are
    not written: nothing in LLaVA reads them. Returns `directory`.
    """
    from transformers import CLIPConfig, CLIPModel

    directory.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": 128,
            "hidden_size": CLIP_VISION_HIDDEN,
            "intermediate_size": 2 * CLIP_VISION_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "projection_dim": 16,
            # CLIP's bos/eos are its last two ids (49406/49407 of 49408).
            "bos_token_id": 126,
            "eos_token_id": 127,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": CLIP_VISION_HIDDEN,
            "intermediate_size": 2 * CLIP_VISION_HIDDEN,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "projection_dim": 16,
        },
        projection_dim=16,
        architectures=["CLIPModel"],
    )
    model = CLIPModel(config)
    _randomize(model, torch.Generator().manual_seed(seed), INIT_STD)
    model.save_pretrained(directory, safe_serialization=True)
    # The hub file predates image processors: bare ints, read as shortest edge / square crop.
    vila_layout.write_json(
        directory / "preprocessor_config.json",
        {
            "crop_size": IMAGE_SIZE,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": vila_layout.preprocessor_config("clip", IMAGE_SIZE)["image_mean"],
            "image_std": vila_layout.preprocessor_config("clip", IMAGE_SIZE)["image_std"],
            "resample": 3,
            "size": IMAGE_SIZE,
        },
    )
    return directory


def build_tiny_llava(root: Path, seed: int = 0) -> Path:
    """A random `liuhaotian/llava-v1.5-7b`-shaped folder (§6.1). Returns `root`.

    Tokenizer at the root (Llama-2 SentencePiece style), `model-0000{1,2}-of-00002.safetensors`
    + index with Llama names and `model.mm_projector.{0,2}.*` (fp16), no vision tensors, and
    `mm_projector.bin` with the projector alone. `mm_hidden_size` matches `build_tiny_clip`.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    build_tokenizer(root, "sentencepiece")
    _set_tokenizer_fields(root, pad_token=UNK)  # LLaVA pads with <unk> (special_tokens_map)
    vocab_size = len(AutoTokenizer.from_pretrained(root, local_files_only=True))

    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=LLM_HIDDEN,
        intermediate_size=2 * LLM_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(llama)
    _randomize(model, gen, INIT_STD)
    tensors = {name: t.to(torch.float16) for name, t in model.state_dict().items()}
    projector = {
        "model.mm_projector.0.weight": _randn(gen, LLM_HIDDEN, CLIP_VISION_HIDDEN),
        "model.mm_projector.0.bias": _randn(gen, LLM_HIDDEN),
        "model.mm_projector.2.weight": _randn(gen, LLM_HIDDEN, LLM_HIDDEN),
        "model.mm_projector.2.bias": _randn(gen, LLM_HIDDEN),
    }
    projector = {name: t.to(torch.float16) for name, t in projector.items()}
    _save_two_shards(root, {**tensors, **projector})
    # LLaVA's pretraining stage saves the projector alone, under the full model's names.
    torch.save(projector, root / "mm_projector.bin")

    vila_layout.write_json(root / "config.json", _llava_config(vocab_size))
    vila_layout.write_json(
        root / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "transformers_version": "4.31.0",
        },
    )
    return root


def build_tiny_llava_hf(root: Path, seed: int = 0, *, key_style: KeyStyle = "conversion") -> Path:
    """A random `llava-hf/llava-1.5-7b-hf`-shaped folder (§6.2-6.3). Returns `root`.

    `key_style="conversion"`: the Hub files' names (`language_model.model.*`,
    `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`).
    `key_style="transformers5"`: what transformers 5.x `save_pretrained` writes, which is the
    same except that the CLIP tower has no `vision_model.` level (`vision_tower.embeddings.*`).
    Both load with `LlavaForConditionalGeneration.from_pretrained`.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if key_style not in ("conversion", "transformers5"):
        raise ValueError(f"key_style must be 'conversion' or 'transformers5', not {key_style!r}")
    root.mkdir(parents=True, exist_ok=True)
    image_id, pad_id, tokenizer_size = _llava_hf_tokenizer(root)

    text = LlamaConfig(
        vocab_size=math.ceil(tokenizer_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE,
        hidden_size=LLM_HIDDEN,
        intermediate_size=2 * LLM_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=CLIP_VISION_HIDDEN,
        intermediate_size=2 * CLIP_VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=16,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        architectures=["LlavaForConditionalGeneration"],
    )
    model = LlavaForConditionalGeneration(config)
    _randomize(model, torch.Generator().manual_seed(seed), INIT_STD)
    model = model.to(torch.float16)
    model.save_pretrained(root, max_shard_size="100KB", safe_serialization=True)

    saved = json.loads((root / "config.json").read_text(encoding="utf-8"))
    saved["pad_token_id"] = pad_id  # the Hub config keeps it at the top level too
    saved.setdefault("torch_dtype", "float16")
    vila_layout.write_json(root / "config.json", saved)
    if key_style == "conversion":
        _rename_vision_keys(root)
    _write_llava_hf_processor(root)
    return root


# --- internals -------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD


def _llava_config(vocab_size: int) -> dict[str, Any]:
    """The original root config's field set (§6.1), with toy Llama dims."""
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": LLM_HIDDEN,
        "image_aspect_ratio": "pad",
        "initializer_range": INIT_STD,
        "intermediate_size": 2 * LLM_HIDDEN,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "mm_hidden_size": CLIP_VISION_HIDDEN,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": CLIP_HUB_ID,
        "model_type": "llava_llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
    }


def _save_two_shards(root: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`model-0000{1,2}-of-00002.safetensors` + index, split in save order at half the bytes."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    running = 0
    for name, tensor in tensors.items():
        shards[0 if running < total // 2 else 1][name] = tensor.contiguous()
        running += tensor.numel() * tensor.element_size()
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    vila_layout.write_json(
        root / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _set_tokenizer_fields(root: Path, **fields: Any) -> None:
    """Override fields in both tokenizer_config.json and special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = root / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(fields)
        vila_layout.write_json(path, data)


def _llava_hf_tokenizer(root: Path) -> tuple[int, int, int]:
    """The Llama-2 tokenizer plus `<image>` and `<pad>` after the base vocabulary, as the
    conversion adds them. Returns (image id, pad id, tokenizer length)."""
    build_tokenizer(root, "sentencepiece")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    for token in (IMAGE_TOKEN, PAD_TOKEN):
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tok.save(str(root / "tokenizer.json"))

    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token in (IMAGE_TOKEN, PAD_TOKEN):
        config["added_tokens_decoder"][str(tok.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config["pad_token"] = PAD_TOKEN
    config["processor_class"] = "LlavaProcessor"
    vila_layout.write_json(root / "tokenizer_config.json", config)
    vila_layout.write_json(
        root / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD_TOKEN, "unk_token": UNK},
    )
    size = tok.get_vocab_size(with_added_tokens=True)
    return tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(PAD_TOKEN), size


def _rename_vision_keys(root: Path) -> None:
    """transformers 5 names -> the Hub's: `vision_tower.X` becomes `vision_tower.vision_model.X`.

    The language model and projector names are already the Hub's: transformers 5 reverses its
    load-time renaming (`_checkpoint_conversion_mapping`) when saving.
    """

    def hub_name(name: str) -> str:
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        return name

    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for file_name in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(root / file_name))
        renamed = {hub_name(name): tensor for name, tensor in tensors.items()}
        save_file(renamed, str(root / file_name), metadata={"format": "pt"})
    index["weight_map"] = {
        hub_name(name): file_name for name, file_name in sorted(index["weight_map"].items())
    }
    vila_layout.write_json(index_path, index)


def _write_llava_hf_processor(root: Path) -> None:
    """preprocessor_config.json, processor_config.json and chat_template.json (§6.2)."""
    processor = vila_layout.preprocessor_config("clip", IMAGE_SIZE)
    processor.pop("feature_extractor_type")
    processor["processor_class"] = "LlavaProcessor"
    vila_layout.write_json(root / "preprocessor_config.json", processor)
    vila_layout.write_json(
        root / "processor_config.json",
        {
            "image_token": IMAGE_TOKEN,
            "num_additional_image_tokens": 1,
            "patch_size": PATCH_SIZE,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default",
        },
    )
    vila_layout.write_json(root / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})
