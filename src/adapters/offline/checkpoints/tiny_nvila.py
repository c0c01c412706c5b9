"""Tiny random NVILA-8B and NVILA-Lite checkpoints (reference doc sections 4.2-4.4, 4.8-4.11).

Same three-part layout as VILA-1.5, but with what NVILA changed: a Qwen2 LLM whose tokenizer adds
no BOS and carries the media tokens as real added tokens past the LLM's rows, SigLIP-448 without
its pooling head, and a root config with the `dynamic_s2` (or Lite's `dynamic`) field set that
TRT's `NVILA_8B_CONFIG` shows. Sizes are toy: 32 px stands for 448, scales 32/64/96 for
448/896/1344.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.checkpoints.tiny_vila import (
    _CORPUS,
    _build_projector,
    _randomize,
)

# Qwen2's special tokens, then the two NVILA's training added inside the LLM vocabulary, then
# the media tokens VILA adds at load time, whose ids lie past the LLM's embedding rows (§4.9).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NVILA_BOS, NVILA_PAD = "[BOS]", "[PAD]"
MEDIA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
LLM_SPECIALS = (ENDOFTEXT, IM_START, IM_END, NVILA_BOS, NVILA_PAD)

MODEL_MAX_LENGTH = 512
BASE_VOCAB_SIZE = 640
INIT_STD = 0.02

# Stand-ins for 448 / 14 and the scales 448, 896, 1344 (§4.3).
TILE_SIZE = 32
PATCH_SIZE = 8
S2_SCALES = (32, 64, 96)
VISION_HIDDEN = 32
LLM_HIDDEN = 64

# Qwen2's pre-tokenizer split (same regex transformers' Qwen2Tokenizer uses): newlines form their
# own pieces, so "\n" is always one byte-level token.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# VILA's `chat_templates/qwen2.jinja` as VILA loads it (indentation and newlines stripped): a
# default system turn "You are a helpful assistant", then ChatML turns (§4.9).
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen2_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE in Qwen2's manner with NVILA's added tokens, saved as NVILA's `llm/` has it.

    Writes `tokenizer.json`, `vocab.json`, `merges.txt`, `added_tokens.json`,
    `tokenizer_config.json` and `special_tokens_map.json`. No BOS is added on encode; eos is
    `<|im_end|>`. The three media tokens are the last ids.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    # One at a time, so the ids follow the order NVILA's tokenizer has them in.
    for token in LLM_SPECIALS + MEDIA_TOKENS:
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tok.save(str(out_dir / "tokenizer.json"))

    learned = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = learned["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    (out_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    added = {token: tok.token_to_id(token) for token in LLM_SPECIALS + MEDIA_TOKENS}
    vila_layout.write_json(out_dir / "added_tokens.json", added)

    special = {"bos_token": NVILA_BOS, "eos_token": IM_END, "pad_token": NVILA_PAD}
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token, token_id in added.items()
        },
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **special,
    }
    vila_layout.write_json(out_dir / "tokenizer_config.json", config)
    vila_layout.write_json(
        out_dir / "special_tokens_map.json",
        {**special, "additional_special_tokens": [IM_START, IM_END]},
    )
    return out_dir


def build_tiny_nvila(root: Path, seed: int = 0, *, lite: bool = False) -> Path:
    """Write a random NVILA-8B (`lite=False`) or NVILA-Lite (`lite=True`) checkpoint.

    NVILA-8B: `dynamic_s2` over three scales, `mm_hidden_size` 3C, `mlp_downsample`.
    NVILA-Lite: `dynamic` tiling, `mm_hidden_size` C, `mlp_downsample_3x3_fix`.
    Deterministic for a given `seed`. Returns `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    # Training-run paths, as the releases store them (the Lite one is made up in that style).
    run_name = "nvila-lite-8B-dynamic-stage3" if lite else "qwen25-8B-dynamic_s2-stage3"
    run = f"runs/train/{run_name}"

    llm_cfg = _build_qwen2_llm(build_qwen2_tokenizer(root / "llm"), gen)
    vision_cfg = _build_siglip_448(root / "vision_tower", gen)
    channels = VISION_HIDDEN if lite else VISION_HIDDEN * len(S2_SCALES)
    if lite:
        projector_cfg = _build_projector_3x3(root / "mm_projector", gen, channels, LLM_HIDDEN)
    else:
        projector_cfg = _build_projector(
            root / "mm_projector", "siglip", gen, channels, LLM_HIDDEN, INIT_STD
        )

    config = vila_layout.root_config("siglip", llm_cfg, vision_cfg, projector_cfg)
    # Loaders must resolve the parts next to config.json, not through these paths (§1).
    for part in ("llm", "vision_tower", "mm_projector"):
        config[f"{part}_cfg"]["_name_or_path"] = f"{run}/model/{part}"
    config.update(
        {
            "_name_or_path": f"{run}/model",
            "resume_path": f"{run}/model",
            "chat_template": None,
            "dynamic_s2": not lite,
            "s2": False,
            "image_aspect_ratio": "dynamic" if lite else "dynamic_s2",
            "s2_scales": ",".join(str(s) for s in S2_SCALES),
            "s2_max_split_size": TILE_SIZE,
            "s2_resize_output_to_scale_idx": -1,
            "mm_hidden_size": channels,
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": True,
            "num_video_frames": 8,
            "fps": 0.0,
            "num_time_tokens": 0,
            "time_token_format": "<t{t}>",
            "time_token_ids": [],
            "transformers_version": "4.46.0",
        }
    )
    vila_layout.write_root(root, config)
    return root


def _build_qwen2_llm(llm_dir: Path, gen: torch.Generator) -> dict[str, Any]:
    """`llm/`: a Qwen2ForCausalLM whose rows stop before the media tokens (§4.9, 4.11)."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer) - len(MEDIA_TOKENS),
        hidden_size=LLM_HIDDEN,
        intermediate_size=2 * LLM_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * MODEL_MAX_LENGTH,
        max_window_layers=2,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        hidden_act="silu",
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        initializer_range=INIT_STD,
        architectures=["Qwen2ForCausalLM"],
    )
    # What VILA writes into the LLM config when it saves a trained model (TRT's NVILA_8B_CONFIG).
    config.model_max_length = MODEL_MAX_LENGTH
    config.tokenizer_model_max_length = MODEL_MAX_LENGTH
    config.tokenizer_padding_side = "right"
    model = Qwen2ForCausalLM(config)
    _randomize(model, gen, INIT_STD)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(llm_dir, max_shard_size="100KB", safe_serialization=True)

    saved = json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))
    # transformers 4.46 spellings next to v5's, as the release has them.
    saved.setdefault("torch_dtype", "bfloat16")
    saved.setdefault("rope_theta", 1e6)
    saved.setdefault("rope_scaling", None)
    vila_layout.write_json(llm_dir / "config.json", saved)
    return saved


def _build_siglip_448(out_dir: Path, gen: torch.Generator) -> dict[str, Any]:
    """`vision_tower/`: paligemma's SigLIP-so400m-448 shape, no pooling head (§4.2, 4.4)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        vision_use_head=False,
        architectures=["SiglipVisionModel"],
    )
    model = SiglipVisionModel(config)
    _randomize(model, gen, INIT_STD)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    add_vision_model_prefix(out_dir)
    vila_layout.write_json(
        out_dir / "preprocessor_config.json",
        vila_layout.preprocessor_config("siglip", TILE_SIZE),
    )
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    # Fields the paligemma SigLIP config carries (TRT's NVILA_8B_CONFIG vision_tower_cfg).
    saved.update(
        {
            "num_image_tokens": (TILE_SIZE // PATCH_SIZE) ** 2,
            "projection_dim": LLM_HIDDEN,
            "projector_hidden_act": "gelu_fast",
            "torch_dtype": "bfloat16",
            "vision_use_head": False,
        }
    )
    vila_layout.write_json(out_dir / "config.json", saved)
    return saved


def add_vision_model_prefix(tower_dir: Path) -> None:
    """Rename a SigLIP tower's weights to the releases' `vision_model.*` names.

    The releases were saved by transformers 4.x, whose `SiglipVisionModel` nests everything
    under `vision_model`; transformers 5 saves the same tensors without that level (and still
    loads either spelling).
    """
    path = tower_dir / "model.safetensors"
    renamed = {
        name if name.startswith("vision_model.") else f"vision_model.{name}": tensor
        for name, tensor in load_file(str(path)).items()
    }
    save_file(renamed, str(path), metadata={"format": "pt"})


def _build_projector_3x3(
    out_dir: Path, gen: torch.Generator, channels: int, hidden: int
) -> dict[str, Any]:
    """`mlp_downsample_3x3_fix` weights under their Sequential indices (§4.8).

    0 DownSample3x3, 1 LN(9C), 2 Linear 9C->3C, 3 GELU, 4 LN(3C), 5 Linear 3C->H, 6 GELU,
    7 Linear H->H.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    wide, mid = 9 * channels, 3 * channels

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD

    tensors = {
        "layers.1.weight": torch.ones(wide) + randn(wide),
        "layers.1.bias": randn(wide),
        "layers.2.weight": randn(mid, wide),
        "layers.2.bias": randn(mid),
        "layers.4.weight": torch.ones(mid) + randn(mid),
        "layers.4.bias": randn(mid),
        "layers.5.weight": randn(hidden, mid),
        "layers.5.bias": randn(hidden),
        "layers.7.weight": randn(hidden, hidden),
        "layers.7.bias": randn(hidden),
    }
    bf16 = {name: t.to(torch.bfloat16).contiguous() for name, t in tensors.items()}
    save_file(bf16, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = vila_layout.projector_config("mlp_downsample_3x3_fix")
    vila_layout.write_json(out_dir / "config.json", config)
    return config
