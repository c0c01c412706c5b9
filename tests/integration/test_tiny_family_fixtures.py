"""The tiny checkpoints of issue 17's layouts carry the releases' field and weight names.

Every expected name, value and shape below is written out from the reference doc
(`vila-family-layouts.md` sections 2-4 and 6) and the toy sizes (tower width C = 32, LLM
hidden H = 64, image 32 / patch 8), not read back from the builders' own constants.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from vilaserve.adapters.offline.checkpoints import tiny_family

C, H = 32, 64  # tower width and LLM hidden size of every tiny layout


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the folder's safetensors files, with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                out[name] = tuple(weights.get_slice(name).get_shape())
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118
                out[name] = weights.get_tensor(name)
    return out


def file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "vila-s2": lambda root, seed: tiny_family.build_tiny_vila_s2(root, seed=seed),
    "vila-40b": lambda root, seed: tiny_family.build_tiny_vila_40b(root, seed=seed),
    "nvila": lambda root, seed: tiny_family.build_tiny_nvila(root, seed=seed),
    "nvila-lite": lambda root, seed: tiny_family.build_tiny_nvila(root, seed=seed, lite=True),
    "llava": lambda root, seed: tiny_family.build_tiny_llava(root, seed=seed),
    "clip": lambda root, seed: tiny_family.build_tiny_clip(root, seed=seed),
    "llava-hf-conversion": lambda root, seed: tiny_family.build_tiny_llava_hf(
        root, seed=seed, key_style="conversion"
    ),
    "llava-hf-transformers5": lambda root, seed: tiny_family.build_tiny_llava_hf(
        root, seed=seed, key_style="transformers5"
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("family")
    return {name: build(base / name, 0) for name, build in BUILDERS.items()}


# --- VILA1.5-3b-s2 (§2.1) ------------------------------------------------------------------------


def test_vila_s2_has_two_scales_and_a_projector_over_both(built: dict[str, Path]) -> None:
    root = built["vila-s2"]
    config = read_json(root / "config.json")
    assert config["architectures"] == ["LlavaLlamaModel"]
    assert config["model_type"] == "llava_llama"
    assert config["s2"] is True
    assert config["s2_scales"] == "32,64"
    assert config["s2_max_split_size"] == 32
    assert config["mm_hidden_size"] == 2 * C
    assert config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "cls_patch"
    assert config["image_aspect_ratio"] == "resize"
    assert config["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    assert config["vision_tower_cfg"]["architectures"] == ["SiglipVisionModel"]
    assert (config["vision_tower_cfg"]["image_size"], config["vision_tower_cfg"]["patch_size"]) == (
        32,
        8,
    )

    tower = shapes(root / "vision_tower")
    assert tower["vision_model.embeddings.patch_embedding.weight"] == (C, 3, 8, 8)
    assert tower["vision_model.embeddings.position_embedding.weight"] == (16, C)  # 4x4 grid
    assert shapes(root / "mm_projector") == {
        "layers.1.weight": (4 * 2 * C,),
        "layers.1.bias": (4 * 2 * C,),
        "layers.2.weight": (H, 4 * 2 * C),
        "layers.2.bias": (H,),
        "layers.4.weight": (H, H),
        "layers.4.bias": (H,),
    }


# --- VILA1.5-40b (§3) ----------------------------------------------------------------------------


def test_vila_40b_has_intern_vit_and_a_chatml_llama(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    root = built["vila-40b"]
    config = read_json(root / "config.json")
    assert config["mm_vision_select_layer"] == -1
    assert config["mm_vision_select_feature"] == "patch"
    assert config["image_aspect_ratio"] == "resize"
    assert config["mm_hidden_size"] == C
    assert config["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    assert config["llm_cfg"]["architectures"] == ["LlamaForCausalLM"]

    tower_config = read_json(root / "vision_tower" / "config.json")
    assert tower_config["architectures"] == ["InternVisionModel"]
    assert tower_config["model_type"] == "intern_vit_6b"
    assert config["vision_tower_cfg"]["model_type"] == "intern_vit_6b"
    tower = shapes(root / "vision_tower")
    assert tower["embeddings.position_embedding"] == (1, 17, C)  # 4x4 patches + CLS
    assert tower["encoder.layers.0.attn.qkv.weight"] == (3 * C, C)
    assert "encoder.layers.0.attn.qkv.bias" not in tower  # qkv_bias false
    assert not (root / "vision_tower" / "preprocessor_config.json").exists()

    assert shapes(root / "mm_projector")["layers.2.weight"] == (H, 4 * C)
    tokenizer = AutoTokenizer.from_pretrained(root / "llm", local_files_only=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"


# --- NVILA-8B and NVILA-Lite (§4) ----------------------------------------------------------------


def test_nvila_tokenizer_has_qwen2_and_media_tokens_past_the_llm_rows(
    built: dict[str, Path],
) -> None:
    from transformers import AutoTokenizer

    llm_dir = built["nvila"] / "llm"
    vocab_size = read_json(llm_dir / "config.json")["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    # NVILA: 151643..151647 in the LLM's 151648 rows, the media tokens after them (§4.9).
    named = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]"]
    assert tokenizer.convert_tokens_to_ids(named) == list(range(vocab_size - 5, vocab_size))
    media = ["<vila/sentinel>", "<image>", "<vila/video>"]
    assert tokenizer.convert_tokens_to_ids(media) == [vocab_size, vocab_size + 1, vocab_size + 2]
    assert len(tokenizer) == vocab_size + 3
    assert tokenizer.eos_token == "<|im_end|>"

    assert len(tokenizer("\n", add_special_tokens=False)["input_ids"]) == 1
    prompt_ids = tokenizer("What is it?")["input_ids"]
    assert max(prompt_ids) < vocab_size - 5  # no BOS (or any special) added
    assert tokenizer.decode(tokenizer("Café 😀\n日本語")["input_ids"]) == "Café 😀\n日本語"
    with_image = tokenizer("<image>What")["input_ids"]
    assert with_image[0] == vocab_size + 1

    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n<image>Hi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert read_json(llm_dir / "tokenizer_config.json")["model_max_length"] > 0
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        assert (llm_dir / name).is_file()


def test_nvila_llm_is_qwen2_with_its_key_names(built: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    llm_dir = built["nvila"] / "llm"
    config = read_json(llm_dir / "config.json")
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is False
    assert config["use_sliding_window"] is False
    assert config["rms_norm_eps"] == 1e-6
    assert config["rope_theta"] == 1e6
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)

    weights = shapes(llm_dir)
    vocab = config["vocab_size"]
    assert weights["model.embed_tokens.weight"] == (vocab, H)
    assert weights["lm_head.weight"] == (vocab, H)
    assert weights["model.layers.0.self_attn.q_proj.bias"] == (H,)  # q/k/v have biases (§4.11)
    assert weights["model.layers.0.self_attn.k_proj.bias"] == (H // 2,)  # 2 KV heads of 16
    assert "model.layers.0.self_attn.o_proj.bias" not in weights
    assert len(list(llm_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (llm_dir / "model.safetensors.index.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.bfloat16


def test_nvila_root_config_tower_and_projector(built: dict[str, Path]) -> None:
    root = built["nvila"]
    config = read_json(root / "config.json")
    expected = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "chat_template": None,
        "dynamic_s2": True,
        "s2": False,
        "image_aspect_ratio": "dynamic_s2",
        "s2_scales": "32,64,96",
        "s2_max_split_size": 32,
        "s2_resize_output_to_scale_idx": -1,
        "hidden_size": H,
        "mm_hidden_size": 3 * C,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": True,
        "model_dtype": "torch.bfloat16",
        "num_video_frames": 8,
        "fps": 0.0,
        "num_time_tokens": 0,
        "time_token_format": "<t{t}>",
        "interpolate_mode": "linear",
        "vision_resolution": -1,
    }
    assert {key: config.get(key) for key in expected} == expected
    assert config["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    assert config["llm_cfg"]["model_type"] == "qwen2"

    tower_config = read_json(root / "vision_tower" / "config.json")
    assert tower_config["vision_use_head"] is False
    assert (tower_config["image_size"], tower_config["patch_size"]) == (32, 8)
    tower = shapes(root / "vision_tower")
    assert tower["vision_model.embeddings.position_embedding.weight"] == (16, C)
    assert not any(name.startswith("vision_model.head.") for name in tower)
    processor = read_json(root / "vision_tower" / "preprocessor_config.json")
    assert processor["image_processor_type"] == "SiglipImageProcessor"
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["resample"] == 3
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]

    assert shapes(root / "mm_projector") == {
        "layers.1.weight": (4 * 3 * C,),
        "layers.1.bias": (4 * 3 * C,),
        "layers.2.weight": (H, 4 * 3 * C),
        "layers.2.bias": (H,),
        "layers.4.weight": (H, H),
        "layers.4.bias": (H,),
    }


def test_nvila_lite_has_dynamic_tiles_and_the_3x3_projector(built: dict[str, Path]) -> None:
    root = built["nvila-lite"]
    config = read_json(root / "config.json")
    assert config["image_aspect_ratio"] == "dynamic"
    assert config["dynamic_s2"] is False
    assert config["mm_hidden_size"] == C
    assert read_json(root / "mm_projector" / "config.json") == {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": "mlp_downsample_3x3_fix",
        "model_type": "v2l_projector",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }
    # §4.8: 1 LN(9C), 2 Linear 9C->3C, 4 LN(3C), 5 Linear 3C->H, 7 Linear H->H.
    assert shapes(root / "mm_projector") == {
        "layers.1.weight": (9 * C,),
        "layers.1.bias": (9 * C,),
        "layers.2.weight": (3 * C, 9 * C),
        "layers.2.bias": (3 * C,),
        "layers.4.weight": (3 * C,),
        "layers.4.bias": (3 * C,),
        "layers.5.weight": (H, 3 * C),
        "layers.5.bias": (H,),
        "layers.7.weight": (H, H),
        "layers.7.bias": (H,),
    }


# --- LLaVA-1.5 original and its CLIP (§6.1) ------------------------------------------------------


def test_llava_original_has_projector_in_shards_and_no_tower(built: dict[str, Path]) -> None:
    root = built["llava"]
    config = read_json(root / "config.json")
    expected = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": C,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "hidden_size": H,
    }
    assert {key: config.get(key) for key in expected} == expected

    index = read_json(root / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    weights = shapes(root)
    assert set(weights) == set(index["weight_map"])
    assert weights["model.mm_projector.0.weight"] == (H, C)
    assert weights["model.mm_projector.2.weight"] == (H, H)
    assert weights["model.embed_tokens.weight"] == (config["vocab_size"], H)
    assert "lm_head.weight" in weights and "model.norm.weight" in weights
    assert not any("vision" in name for name in weights)

    projector = torch.load(root / "mm_projector.bin", weights_only=True)
    stored = tensors(root)
    assert sorted(projector) == [
        "model.mm_projector.0.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.mm_projector.2.weight",
    ]
    for name, tensor in projector.items():
        assert torch.equal(tensor, stored[name])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id == 1
    assert read_json(root / "generation_config.json")["eos_token_id"] == 2


def test_clip_folder_is_a_full_clip_model(built: dict[str, Path]) -> None:
    from transformers import CLIPVisionModel

    directory = built["clip"]
    config = read_json(directory / "config.json")
    assert config["model_type"] == "clip"
    assert config["architectures"] == ["CLIPModel"]
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"]) == (32, 8)
    weights = shapes(directory)
    assert weights["vision_model.embeddings.class_embedding"] == (C,)
    assert weights["vision_model.embeddings.position_embedding.weight"] == (17, C)
    assert "text_model.embeddings.token_embedding.weight" in weights
    assert "visual_projection.weight" in weights and "logit_scale" in weights
    processor = read_json(directory / "preprocessor_config.json")
    assert (processor["size"], processor["crop_size"], processor["resample"]) == (32, 32, 3)
    assert processor["do_center_crop"] is True
    assert processor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]

    tower, info = CLIPVisionModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(
        tower.embeddings.class_embedding.detach(),
        tensors(directory)["vision_model.embeddings.class_embedding"],
    )


# --- llava-hf (§6.2-6.3) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "tower_key"),
    [
        ("conversion", "vision_tower.vision_model.embeddings.class_embedding"),
        ("transformers5", "vision_tower.embeddings.class_embedding"),
    ],
)
def test_llava_hf_key_names_and_token_ids(
    built: dict[str, Path], style: str, tower_key: str
) -> None:
    from transformers import AutoTokenizer

    root = built[f"llava-hf-{style}"]
    config = read_json(root / "config.json")
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu"
    assert config["image_seq_length"] == 16
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>")
    assert config["pad_token_id"] == tokenizer.convert_tokens_to_ids("<pad>")
    # Added right after the base vocabulary, rows padded up to a multiple of 64.
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [
        len(tokenizer) - 2,
        len(tokenizer) - 1,
    ]
    vocab = config["text_config"]["vocab_size"]
    assert vocab % 64 == 0 and len(tokenizer) <= vocab < len(tokenizer) + 64

    weights = shapes(root)
    assert weights[tower_key] == (C,)
    assert weights["language_model.model.embed_tokens.weight"] == (vocab, H)
    assert weights["language_model.lm_head.weight"] == (vocab, H)
    assert weights["multi_modal_projector.linear_1.weight"] == (H, C)
    assert weights["multi_modal_projector.linear_2.weight"] == (H, H)
    tower_names = [name for name in weights if name.startswith("vision_tower.")]
    with_level = [name for name in tower_names if name.startswith("vision_tower.vision_model.")]
    assert with_level == (tower_names if style == "conversion" else [])
    assert set(read_json(root / "model.safetensors.index.json")["weight_map"]) == set(weights)

    assert read_json(root / "processor_config.json") == {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": 8,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    }
    processor = read_json(root / "preprocessor_config.json")
    assert processor["image_processor_type"] == "CLIPImageProcessor"
    assert processor["size"] == {"shortest_edge": 32}
    assert processor["crop_size"] == {"height": 32, "width": 32}


def test_llava_hf_processor_expands_the_image_and_renders_the_template(
    built: dict[str, Path],
) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    root = built["llava-hf-conversion"]
    processor = AutoProcessor.from_pretrained(root, local_files_only=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nWhat? ASSISTANT:"
    inputs = processor(text=prompt, images=Image.new("RGB", (45, 30)), return_tensors="pt")
    image_id = read_json(root / "config.json")["image_token_index"]
    # (32 / 8)^2 + 1 CLS - 1 dropped by "default" = 16 copies (§6.2).
    assert int((inputs["input_ids"] == image_id).sum()) == 16
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


def test_llava_hf_both_key_styles_load_the_same_model_in_transformers(
    built: dict[str, Path],
) -> None:
    from transformers import LlavaForConditionalGeneration

    states = []
    for style in ("conversion", "transformers5"):
        model, info = LlavaForConditionalGeneration.from_pretrained(
            built[f"llava-hf-{style}"], output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], (style, info)
        states.append(model.state_dict())
    conversion, native = states
    assert conversion.keys() == native.keys()
    assert all(torch.equal(conversion[name], native[name]) for name in conversion)
    # Not all-equal by accident: the tower really holds the random values on disk.
    on_disk = tensors(built["llava-hf-conversion"])
    cls = next(v for k, v in conversion.items() if k.endswith("embeddings.class_embedding"))
    assert torch.equal(cls, on_disk["vision_tower.vision_model.embeddings.class_embedding"])


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_same_seed_gives_the_same_bytes(name: str, built: dict[str, Path], tmp_path: Path) -> None:
    again = BUILDERS[name](tmp_path / name, 0)
    first, second = file_bytes(built[name]), file_bytes(again)
    assert first.keys() == second.keys()
    assert [path for path in first if first[path] != second[path]] == []


def test_another_seed_gives_other_weights(built: dict[str, Path], tmp_path: Path) -> None:
    other = BUILDERS["nvila-lite"](tmp_path / "other", 1)
    for part in ("llm", "vision_tower", "mm_projector"):
        first, second = tensors(built["nvila-lite"] / part), tensors(other / part)
        assert first.keys() == second.keys()
        # Norm biases start at exactly zero for every seed; everything random must differ.
        random = [k for k in first if first[k].float().std() > 0]
        assert random and not any(torch.equal(first[k], second[k]) for k in random)
