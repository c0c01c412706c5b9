"""Builders for tiny, random, but structurally exact VILA-1.5 checkpoints.

There is no model hub in the test environment, so every artefact a worker loads (tokenizer, LLM,
vision tower, projector, configs) is made here from scratch. The layout follows VILA-1.5's
"three-part" checkpoint (reference doc section 1.1/1.2) so the loaders under test see what they
would see on a real `Efficient-Large-Model/VILA1.5-3b` download, only with toy sizes.

The test fixtures build them, and `vilaserve build-tiny` writes one for `make run`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from vilaserve.adapters.offline.checkpoints import vila_layout

# "llama" and "chatml" are byte-level BPE (Llama-3 / Yi style byte handling); "sentencepiece" is
# a Llama-2-style Metaspace BPE with <0xNN> byte fallback, the tokenizer VILA1.5-3b/13b ship.
TokenizerKind = Literal["llama", "chatml", "sentencepiece"]
VisionKind = vila_layout.VisionKind

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Llama ids 0/1/2 for unk/bos/eos, so vicuna-style code that hard-codes "eos id 2" still works.
_BASE_SPECIALS = (UNK, BOS, EOS)
_CHATML_SPECIALS = (IM_START, IM_END)

TOKENIZER_VOCAB_SIZE = 768
MODEL_MAX_LENGTH = 512

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)

# The hermes-2 template rendered as a jinja chat template, for the chatml tokenizer kind.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text: the words tests and templates use (so prompts become short multi-char tokens)
# plus unicode that is rare enough that BPE never merges it into whole characters. Emoji and
# CJK therefore stay split over several byte-level tokens, which is exactly the case the
# incremental detokenizer has to get right.
_ENGLISH = f"""
{VICUNA_SYSTEM} USER: <image>
What is it? ASSISTANT: It is a picture of a cat sitting on a red mat.</s>
USER: Describe the image in detail. ASSISTANT: The image shows a small dog in a green field,
with trees and a blue sky. There are two birds flying over the house near the river.
<|im_start|>system
Answer the questions.<|im_end|><|im_start|>user
<image>
What color is the box?<|im_end|><|im_start|>assistant
The box is red, and the ball next to it is yellow.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be, or not to be, that is the question. All that glitters is not gold.
Please answer the question about the picture: how many people are in the room, and what
are they doing? They are reading books, writing letters and talking about the weather.
    Indented code:   x = 1;  y = 2;  print(x + y)
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, dates 2024-10-31, times 12:30.
"""
_UNICODE = """
Café, naïve, façade, résumé, Straße, Ærøskøbing, señor, Zürich, Ελληνικά, русский.
日本語のテキスト。中文文本。한국어 텍스트.
Emoji: 😀 🐱 🚀 👍🏽 ❤️ 🎉
"""
_CORPUS = [line for line in (_ENGLISH + _UNICODE).splitlines() if line.strip()]


def _specials(kind: TokenizerKind) -> tuple[str, ...]:
    return _BASE_SPECIALS + (_CHATML_SPECIALS if kind == "chatml" else ())


def _bos_post_processor(tok: Tokenizer) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )


def _train_backend_tokenizer(kind: TokenizerKind, add_bos: bool) -> Tokenizer:
    if kind == "sentencepiece":
        return _train_sentencepiece_style(add_bos)
    return _train_byte_level(kind, add_bos)


def _train_byte_level(kind: TokenizerKind, add_bos: bool) -> Tokenizer:
    """A real byte-level BPE (GPT-2/Llama-3 style), trained on the inline corpus."""
    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False: decode(encode(s)) must be byte-identical to s, no phantom space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = _specials(kind)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        # The full byte alphabet guarantees that any string (any unicode) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so min_frequency admits the common English words as merges.
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    if add_bos:
        tok.post_processor = _bos_post_processor(tok)
    return tok


def _train_sentencepiece_style(add_bos: bool) -> Tokenizer:
    """Llama-2's HF tokenizer.json pipeline: Metaspace, BPE with byte fallback, `Strip` decoder.

    The alphabet is limited to ASCII and Latin-1 letters so that emoji, CJK and newlines go
    through `<0xNN>` byte tokens, as they do in the real 32000-token Llama vocabulary.
    """
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + list("éèêëàâäïîôöüûùçñßæøåÆØÅ▁")
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - 256,
        min_frequency=2,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in _BASE_SPECIALS],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    trainer_tok = Tokenizer(models.BPE(unk_token=UNK))
    # split=True while training keeps merges inside words, like SentencePiece's pieces.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    trainer_tok.train_from_iterator(_CORPUS * 3, trainer=trainer)

    # Llama's layout: specials 0..2, then the 256 byte tokens at 3..258, then learned pieces.
    learned = json.loads(trainer_tok.to_str())
    old_vocab: dict[str, int] = learned["model"]["vocab"]
    vocab: dict[str, int] = {name: i for i, name in enumerate(_BASE_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(old_vocab.items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["model"]["merges"]
    ]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _BASE_SPECIALS])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            # Drops the space the pre-tokenizer prepended: a lone token decodes without its
            # leading space, which is what makes naive per-token streaming glue words together.
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    if add_bos:
        tok.post_processor = _bos_post_processor(tok)
    return tok


def build_tokenizer(out_dir: Path, kind: TokenizerKind = "llama", *, add_bos: bool = True) -> Path:
    """Train and save a small BPE tokenizer (~760 ids) loadable by `AutoTokenizer`.

    `kind`: "llama" (byte-level, `<s>`/`</s>`), "chatml" (byte-level plus `<|im_start|>` and
    `<|im_end|>` and a hermes-2 chat template) or "sentencepiece" (Llama-2-style Metaspace with
    `<0xNN>` byte fallback). `add_bos=False` makes a tokenizer that adds no BOS (Qwen-style).

    Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`. Returns
    `out_dir`. ids: `<unk>`=0, `<s>`=1, `</s>`=2, and for chatml `<|im_start|>`=3,
    `<|im_end|>`=4.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_backend_tokenizer(kind, add_bos)
    tok.save(str(out_dir / "tokenizer.json"))

    added_tokens_decoder = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in _specials(kind)
    }
    config: dict[str, Any] = {
        # The generic class loads tokenizer.json verbatim. v5's LlamaTokenizer hard-codes a
        # Metaspace pipeline, so naming it over a ByteLevel tokenizer.json only earns a warning
        # and a fallback to TokenizersBackend.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        # Kept for fidelity with real checkpoints and for v4 readers; transformers v5 ignores
        # both flags when tokenizer.json exists (its post-processor alone decides on BOS).
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "added_tokens_decoder": added_tokens_decoder,
    }
    special_map: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    if kind == "chatml":
        config["chat_template"] = CHATML_TEMPLATE
        config["additional_special_tokens"] = list(_CHATML_SPECIALS)
        special_map["additional_special_tokens"] = list(_CHATML_SPECIALS)
    vila_layout.write_json(out_dir / "tokenizer_config.json", config)
    vila_layout.write_json(out_dir / "special_tokens_map.json", special_map)
    return out_dir


def build_tiny_vila(
    root: Path,
    vision: VisionKind = "siglip",
    seed: int = 0,
    *,
    tokenizer_kind: TokenizerKind = "llama",
    llm_hidden_size: int = 64,
    llm_layers: int = 2,
    vision_hidden_size: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    init_std: float = 0.02,
    max_shard_size: str = "200KB",
) -> Path:
    """Write a random VILA-1.5 checkpoint (root config.json, llm/, vision_tower/, mm_projector/).

    `vision="siglip"` mirrors VILA1.5-3b (SigLIP, `mlp_downsample`, resize, cls_patch);
    `vision="clip"` mirrors the LLaVA-1.5-style CLIP setup (`mlp2x_gelu`, pad, patch).
    Deterministic for a given `seed`. Returns `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    llm_dir = build_tokenizer(root / "llm", tokenizer_kind)
    llm_cfg = _build_llm(llm_dir, gen, llm_hidden_size, llm_layers, init_std, max_shard_size)
    vision_cfg = _build_vision_tower(
        root / "vision_tower", vision, gen, vision_hidden_size, image_size, patch_size, init_std
    )
    projector_cfg = _build_projector(
        root / "mm_projector", vision, gen, vision_hidden_size, llm_hidden_size, init_std
    )

    # Field set and values of VILA1.5-3b's root config (reference section 1.2).
    vila_layout.write_root(
        root, vila_layout.root_config(vision, llm_cfg, vision_cfg, projector_cfg)
    )
    return root


def tokens_per_image(vision: VisionKind, image_size: int = 32, patch_size: int = 8) -> int:
    """LLM positions one image occupies in a checkpoint built with these settings."""
    side = image_size // patch_size
    if vision == "clip":
        return side * side  # "patch" drops CLS; mlp2x_gelu keeps the token count
    half = (side + 1) // 2  # mlp_downsample zero-pads odd grids, then merges 2x2
    return half * half


def make_png(
    width: int,
    height: int,
    color: tuple[int, ...] | int | str = (255, 0, 0),
    mode: str = "RGB",
) -> bytes:
    """A solid-colour PNG, e.g. `make_png(40, 20, (0, 0, 255, 128), mode="RGBA")`."""
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def make_png_b64(
    width: int,
    height: int,
    color: tuple[int, ...] | int | str = (255, 0, 0),
    mode: str = "RGB",
) -> str:
    """`make_png` as the base64 string the gradio client puts in `images`."""
    return base64.b64encode(make_png(width, height, color, mode)).decode("ascii")


# --- internals -------------------------------------------------------------------------------


def _is_norm(name: str) -> bool:
    return any(key in name for key in ("norm", "layer_norm", "layernorm"))


@torch.no_grad()
def _randomize(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Re-initialise every parameter from `gen`, independent of transformers' init code.

    transformers' own init schemes differ across versions (and v5 may skip init for weights it
    expects to load), so owning the init is what makes the checkpoint reproducible per seed.
    Norm weights start at 1 (plus a little noise so they are not trivially identity).
    """
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        if _is_norm(name) and name.endswith("weight"):
            values += 1.0
        elif _is_norm(name) and name.endswith("bias"):
            values.zero_()
        param.copy_(values.to(param.dtype))


def _build_llm(
    llm_dir: Path,
    gen: torch.Generator,
    hidden: int,
    layers: int,
    std: float,
    max_shard_size: str,
) -> dict[str, Any]:
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=std,
        rope_theta=10000.0,
        architectures=["LlamaForCausalLM"],
    )
    # VILA stores the LLM's training context under this name (reference 1.6, truncation).
    config.tokenizer_model_max_length = MODEL_MAX_LENGTH
    config.tokenizer_padding_side = "right"
    model = LlamaForCausalLM(config)
    _randomize(model, gen, std)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Small shards force the multi-file layout (+ model.safetensors.index.json) of real repos.
    model.save_pretrained(llm_dir, max_shard_size=max_shard_size, safe_serialization=True)

    saved = json.loads((llm_dir / "config.json").read_text(encoding="utf-8"))
    # Real VILA-1.5 configs come from transformers 4.36: they carry `torch_dtype`/`rope_theta`
    # rather than v5's `dtype`/`rope_parameters`. Keep both spellings so loaders that read
    # either one work, and v5 still accepts the file.
    saved.setdefault("torch_dtype", "bfloat16")
    saved.setdefault("rope_theta", 10000.0)
    saved.setdefault("rope_scaling", None)
    vila_layout.write_json(llm_dir / "config.json", saved)
    return saved


def _build_vision_tower(
    out_dir: Path,
    vision: VisionKind,
    gen: torch.Generator,
    hidden: int,
    image_size: int,
    patch_size: int,
    std: float,
) -> dict[str, Any]:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    common: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
    }
    model: torch.nn.Module
    if vision == "siglip":
        s_cfg = SiglipVisionConfig(**common, architectures=["SiglipVisionModel"])
        model = SiglipVisionModel(s_cfg)
    else:
        c_cfg = CLIPVisionConfig(**common, projection_dim=hidden, architectures=["CLIPVisionModel"])
        model = CLIPVisionModel(c_cfg)
    _randomize(model, gen, std)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    vila_layout.write_json(
        out_dir / "preprocessor_config.json", vila_layout.preprocessor_config(vision, image_size)
    )
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    saved.setdefault("torch_dtype", "bfloat16")
    vila_layout.write_json(out_dir / "config.json", saved)
    return saved


def _build_projector(
    out_dir: Path,
    vision: VisionKind,
    gen: torch.Generator,
    channels: int,
    hidden: int,
    std: float,
) -> dict[str, Any]:
    """Projector weights under VILA's `nn.Sequential` indices (reference section 1.5)."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    tensors: dict[str, torch.Tensor]
    if vision == "siglip":
        projector_type = "mlp_downsample"
        wide = 4 * channels  # DownSampleBlock concatenates a 2x2 window along channels
        tensors = {
            "layers.1.weight": torch.ones(wide) + randn(wide),
            "layers.1.bias": randn(wide),
            "layers.2.weight": randn(hidden, wide),
            "layers.2.bias": randn(hidden),
            "layers.4.weight": randn(hidden, hidden),
            "layers.4.bias": randn(hidden),
        }
    else:
        projector_type = "mlp2x_gelu"
        tensors = {
            "layers.0.weight": randn(hidden, channels),
            "layers.0.bias": randn(hidden),
            "layers.2.weight": randn(hidden, hidden),
            "layers.2.bias": randn(hidden),
        }
    bf16 = {name: t.to(torch.bfloat16).contiguous() for name, t in tensors.items()}
    save_file(bf16, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = vila_layout.projector_config(projector_type)
    vila_layout.write_json(out_dir / "config.json", cfg)
    return cfg


def ensure_tiny_vila(target: Path) -> Path:
    """The tiny random checkpoint `make run` serves: built once under `target`, then reused."""
    if not (target / "config.json").is_file():
        build_tiny_vila(target, "siglip", seed=0)
    return target
