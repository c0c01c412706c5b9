"""The tiny-VILA fixture builder, and the tokenization module exercised on its real tokenizers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vilaserve.adapters.offline.checkpoints.tiny_vila import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    build_tiny_vila,
    build_tokenizer,
    make_png,
    make_png_b64,
    tokens_per_image,
)
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    IncrementalDetokenizer,
    TokenizerNotFound,
    load_tokenizer,
    stop_token_ids,
    tokenize_with_images,
)

ROUND_TRIP_TEXTS = [
    "What is it? The cat is on the mat.",
    "  leading spaces,   inner   runs\n\nblank lines\n\ttab\t and trailing  ",
    "Café naïve façade — Straße 😀🐱🚀 日本語のテキスト 中文 👍🏽 ❤️ 한국어",
    "\n",
    "",
]

UNICODE_TEXT = "Emoji 😀 then 🐱🚀🦀, CJK 日本語のテキスト。漢字, accents Ærøskøbing ❤️ 👍🏽!"
SPACEY_TEXT = "  a  b   c\n\n\n  indented\tline \n trailing   \n\n"


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "chatml", "chatml")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "sp", "sentencepiece")


@pytest.fixture(scope="module")
def no_bos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "nobos", "chatml", add_bos=False)


@pytest.fixture(scope="module")
def llama_tok(tiny_vila_siglip: Path) -> Any:
    return load_tokenizer(tiny_vila_siglip / "llm")


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            t = f.get_tensor(key)
            out[key] = (tuple(t.shape), t.dtype)
        return out


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_layout_and_root_config(vision: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(f"tiny_vila_{vision}")
    for rel in [
        "config.json",
        "trainer_state.json",
        "llm/config.json",
        "llm/generation_config.json",
        "llm/model.safetensors.index.json",
        "llm/tokenizer.json",
        "llm/tokenizer_config.json",
        "llm/special_tokens_map.json",
        "vision_tower/config.json",
        "vision_tower/model.safetensors",
        "vision_tower/preprocessor_config.json",
        "mm_projector/config.json",
        "mm_projector/model.safetensors",
    ]:
        assert (root / rel).is_file(), rel

    cfg = _read_json(root / "config.json")
    siglip = vision == "siglip"
    assert cfg["architectures"] == ["LlavaLlamaModel"]
    assert cfg["model_type"] == "llava_llama"
    assert cfg["image_aspect_ratio"] == ("resize" if siglip else "pad")
    assert cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == ("cls_patch" if siglip else "patch")
    assert cfg["mm_use_im_start_end"] is False
    assert cfg["mm_use_im_patch_token"] is False
    assert cfg["model_dtype"] == "torch.bfloat16"
    assert cfg["num_video_frames"] == 8
    assert cfg["hidden_size"] == cfg["llm_cfg"]["hidden_size"] == 64
    assert cfg["mm_hidden_size"] == cfg["vision_tower_cfg"]["hidden_size"] == 32
    assert cfg["llm_cfg"]["_name_or_path"] == "./llm"
    assert cfg["llm_cfg"]["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vision_tower_cfg"]["architectures"] == [
        "SiglipVisionModel" if siglip else "CLIPVisionModel"
    ]
    projector_type = "mlp_downsample" if siglip else "mlp2x_gelu"
    assert cfg["mm_projector_cfg"]["mm_projector_type"] == projector_type
    assert _read_json(root / "mm_projector/config.json") == {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": projector_type,
        "model_type": "v2l_projector",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }

    llm_cfg = _read_json(root / "llm/config.json")
    tok_cfg = _read_json(root / "llm/tokenizer_config.json")
    assert llm_cfg["vocab_size"] == len(load_tokenizer(root / "llm"))
    assert (llm_cfg["num_hidden_layers"], llm_cfg["num_attention_heads"]) == (2, 4)
    assert (llm_cfg["num_key_value_heads"], llm_cfg["intermediate_size"]) == (2, 128)
    assert llm_cfg["max_position_embeddings"] == tok_cfg["model_max_length"] == 512
    assert (llm_cfg["bos_token_id"], llm_cfg["eos_token_id"]) == (1, 2)


def test_llm_shards_and_index(tiny_vila_siglip: Path) -> None:
    llm = tiny_vila_siglip / "llm"
    index = _read_json(llm / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert sorted(p.name for p in llm.glob("model-*.safetensors")) == shards
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for shard in shards:
        tensors = _tensor_shapes(llm / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        stored.update(tensors)
    assert set(stored) == set(index["weight_map"])
    assert {dtype for _, dtype in stored.values()} == {torch.bfloat16}
    vocab = len(load_tokenizer(llm))
    assert stored["model.embed_tokens.weight"][0] == (vocab, 64)
    assert stored["model.layers.0.self_attn.k_proj.weight"][0] == (32, 64)  # 2 KV heads x 16
    assert "lm_head.weight" in stored  # untied, as in Llama-2/Vicuna


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_projector_weights(vision: str, request: pytest.FixtureRequest) -> None:
    root: Path = request.getfixturevalue(f"tiny_vila_{vision}")
    shapes = {k: s for k, (s, _) in _tensor_shapes(root / "mm_projector/model.safetensors").items()}
    if vision == "siglip":
        assert shapes == {
            "layers.1.weight": (128,),
            "layers.1.bias": (128,),
            "layers.2.weight": (64, 128),
            "layers.2.bias": (64,),
            "layers.4.weight": (64, 64),
            "layers.4.bias": (64,),
        }
    else:
        assert shapes == {
            "layers.0.weight": (64, 32),
            "layers.0.bias": (64,),
            "layers.2.weight": (64, 64),
            "layers.2.bias": (64,),
        }


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_vision_tower_and_processor_load(vision: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModel

    root: Path = request.getfixturevalue(f"tiny_vila_{vision}")
    tower = AutoModel.from_pretrained(root / "vision_tower")
    assert type(tower).__name__ == (
        "SiglipVisionModel" if vision == "siglip" else "CLIPVisionModel"
    )
    pre = _read_json(root / "vision_tower/preprocessor_config.json")
    if vision == "siglip":
        assert pre["image_processor_type"] == "SiglipImageProcessor"
        assert pre["size"] == {"height": 32, "width": 32}
        assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    else:
        assert pre["image_processor_type"] == "CLIPImageProcessor"
        assert pre["size"] == {"shortest_edge": 32}
        assert pre["crop_size"] == {"height": 32, "width": 32}
    assert pre["resample"] == 3
    pixels = torch.zeros(1, 3, 32, 32, dtype=tower.dtype)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # embeddings + 3 layers
    assert hidden[-2].shape == (1, 16 if vision == "siglip" else 17, 32)
    assert tokens_per_image(vision) == (4 if vision == "siglip" else 16)  # type: ignore[arg-type]


def test_llm_generates_varied_tokens(tiny_vila_siglip: Path) -> None:
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(tiny_vila_siglip / "llm")
    model = LlamaForCausalLM.from_pretrained(tiny_vila_siglip / "llm")
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([tok("USER: What is it? ASSISTANT:")["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) > 3, new  # random but not stuck on one token


def test_build_is_deterministic_per_seed(tiny_vila_siglip: Path, tmp_path: Path) -> None:
    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    again = build_tiny_vila(tmp_path / "again", "siglip", seed=0)
    assert digests(again) == digests(tiny_vila_siglip)
    other = build_tiny_vila(tmp_path / "other", "siglip", seed=5)
    changed = {k for k, v in digests(other).items() if digests(tiny_vila_siglip)[k] != v}
    assert "mm_projector/model.safetensors" in changed
    assert "llm/tokenizer.json" not in changed  # the tokenizer does not depend on the seed


def test_png_helpers() -> None:
    data = make_png(40, 20, (0, 0, 255, 128), mode="RGBA")
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.size, img.mode) == ("PNG", (40, 20), "RGBA")
    assert img.getpixel((3, 3)) == (0, 0, 255, 128)
    b64 = make_png_b64(8, 8, "green")
    assert base64.b64decode(b64) == make_png(8, 8, "green")


# --- tokenizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "chatml", "sentencepiece", "no_bos"])
def test_tokenizer_loads_and_round_trips(
    kind: str,
    tiny_vila_siglip: Path,
    chatml_dir: Path,
    sentencepiece_dir: Path,
    no_bos_dir: Path,
) -> None:
    folder = {
        "llama": tiny_vila_siglip / "llm",
        "chatml": chatml_dir,
        "sentencepiece": sentencepiece_dir,
        "no_bos": no_bos_dir,
    }[kind]
    tok = load_tokenizer(folder)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == (BOS, EOS, 1, 2)
    assert 512 <= len(tok) <= 1000
    for text in ROUND_TRIP_TEXTS:
        ids = tok(text)["input_ids"]
        assert (ids[:1] == [1]) is (kind != "no_bos")
        decoded = tok.decode(ids, skip_special_tokens=True)
        if kind == "sentencepiece":
            # The Strip decoder eats one leading space (Llama-2 fast-tokenizer behaviour).
            assert decoded == (text[1:] if text.startswith(" ") else text)
        else:
            assert decoded == text
    # Multi-byte characters really are split over several tokens.
    assert len(tok("😀", add_special_tokens=False)["input_ids"]) > 1
    assert len(tok("漢字", add_special_tokens=False)["input_ids"]) > 2  # CJK unseen in training


def test_chatml_special_tokens_and_template(chatml_dir: Path) -> None:
    tok = load_tokenizer(chatml_dir)
    start, end = tok.convert_tokens_to_ids([IM_START, IM_END])
    ids = tok(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == start and ids[-1] == end
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"
    assert stop_token_ids(tok, [end]) == frozenset({2, end})


def test_load_tokenizer_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerNotFound, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerNotFound, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


# --- tokenize_with_images --------------------------------------------------------------------


def _enc(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_image_first_prompt(llama_tok: Any) -> None:
    ids = tokenize_with_images(llama_tok, "<image>\nWhat is it?")
    assert ids == [1, IMAGE_TOKEN_INDEX, *_enc(llama_tok, "\nWhat is it?")]


def test_two_images(llama_tok: Any) -> None:
    prompt = "USER: <image>\nfirst <image>\nsecond ASSISTANT:"
    ids = tokenize_with_images(llama_tok, prompt)
    chunks = prompt.split(IMAGE_TOKEN)
    expected = [1, *_enc(llama_tok, chunks[0]), IMAGE_TOKEN_INDEX]
    expected += [*_enc(llama_tok, chunks[1]), IMAGE_TOKEN_INDEX, *_enc(llama_tok, chunks[2])]
    assert ids == expected
    assert ids.count(1) == 1  # only the first chunk's BOS survives


def test_adjacent_and_trailing_images_add_no_stray_tokens(llama_tok: Any) -> None:
    assert tokenize_with_images(llama_tok, "<image><image>") == [
        1,
        IMAGE_TOKEN_INDEX,
        IMAGE_TOKEN_INDEX,
    ]
    assert tokenize_with_images(llama_tok, "hi<image>") == [
        1,
        *_enc(llama_tok, "hi"),
        IMAGE_TOKEN_INDEX,
    ]
    assert tokenize_with_images(llama_tok, "") == [1]


def test_no_image_matches_plain_tokenization(llama_tok: Any) -> None:
    text = "A chat between a curious user. USER: hello ASSISTANT:"
    assert tokenize_with_images(llama_tok, text) == llama_tok(text)["input_ids"]


def test_tokenizer_without_bos(no_bos_dir: Path) -> None:
    tok = load_tokenizer(no_bos_dir)
    ids = tokenize_with_images(tok, "<image>\nWhat is it?<image>")
    assert ids == [IMAGE_TOKEN_INDEX, *_enc(tok, "\nWhat is it?"), IMAGE_TOKEN_INDEX]


def test_sentencepiece_chunks_are_tokenized_separately(sentencepiece_dir: Path) -> None:
    tok = load_tokenizer(sentencepiece_dir)
    ids = tokenize_with_images(tok, "USER: <image>\nWhat is it?")
    # As in VILA, the chunk after the image gets its own Metaspace prefix ("▁").
    assert ids == [1, *_enc(tok, "USER: "), IMAGE_TOKEN_INDEX, *_enc(tok, "\nWhat is it?")]


# --- IncrementalDetokenizer ------------------------------------------------------------------


class _RecordingTokenizer:
    """Forwards to a tokenizer (and to its Rust backend, which the detokenizer calls directly)
    and remembers the longest id list either was asked to decode, and how many calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.longest_decode = 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def backend_tokenizer(self) -> Any:
        return _RecordingBackend(self, self._inner.backend_tokenizer)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.longest_decode = max(self.longest_decode, len(ids))
        self.calls += 1
        return str(self._inner.decode(ids, **kwargs))


class _RecordingBackend:
    def __init__(self, recorder: _RecordingTokenizer, inner: Any) -> None:
        self._recorder, self._inner = recorder, inner

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self._recorder.longest_decode = max(self._recorder.longest_decode, len(ids))
        self._recorder.calls += 1
        return str(self._inner.decode(ids, **kwargs))


def _stream(tok: Any, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def _all_tokenizers(tiny_vila_siglip: Path, chatml_dir: Path, sentencepiece_dir: Path) -> list[Any]:
    return [load_tokenizer(d) for d in (tiny_vila_siglip / "llm", chatml_dir, sentencepiece_dir)]


@pytest.mark.parametrize("text", [UNICODE_TEXT, SPACEY_TEXT, ROUND_TRIP_TEXTS[0] * 3])
def test_detokenizer_matches_decode_on_text(
    text: str, tiny_vila_siglip: Path, chatml_dir: Path, sentencepiece_dir: Path
) -> None:
    for tok in _all_tokenizers(tiny_vila_siglip, chatml_dir, sentencepiece_dir):
        ids = tok(text)["input_ids"]  # includes BOS: a special token the stream must skip
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces), pieces  # never half a character


def test_detokenizer_holds_incomplete_characters(llama_tok: Any) -> None:
    ids = _enc(llama_tok, "😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(llama_tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "😀"
    assert detok.flush() == ""


def test_detokenizer_keeps_sentencepiece_spaces(sentencepiece_dir: Path) -> None:
    tok = load_tokenizer(sentencepiece_dir)
    ids = _enc(tok, "What is it? The cat")
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "What is it? The cat"
    # Naive per-token decoding would lose the spaces that start "▁is", "▁it?" ...
    assert "".join(tok.decode([i]) for i in ids) != "What is it? The cat"


def test_detokenizer_skips_special_tokens_mid_stream(chatml_dir: Path) -> None:
    tok = load_tokenizer(chatml_dir)
    ids = tok("a<|im_end|> b</s>c 😀")["input_ids"]
    assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True) == "a bc 😀"


@pytest.mark.parametrize("seed", range(6))
def test_detokenizer_matches_decode_on_random_streams(
    seed: int, tiny_vila_siglip: Path, chatml_dir: Path, sentencepiece_dir: Path
) -> None:
    rng = random.Random(seed)
    for tok in _all_tokenizers(tiny_vila_siglip, chatml_dir, sentencepiece_dir):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 300))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_detokenizer_cost_is_per_window_not_per_sequence(llama_tok: Any) -> None:
    recorder = _RecordingTokenizer(llama_tok)
    ids = _enc(llama_tok, (ROUND_TRIP_TEXTS[0] + " " + UNICODE_TEXT + "\n") * 30)
    assert len(ids) > 1000
    pieces = _stream(recorder, ids)
    assert "".join(pieces) == llama_tok.decode(ids, skip_special_tokens=True)
    assert 0 < recorder.longest_decode <= 12
    assert recorder.calls <= 2 * len(ids) + 2  # the window, and what it emitted: no more


def test_flush_without_tokens_is_empty(llama_tok: Any) -> None:
    detok = IncrementalDetokenizer(llama_tok)
    assert detok.flush() == ""
    assert detok.push(llama_tok.bos_token_id) == ""
    assert detok.flush() == ""


def test_stop_token_ids(llama_tok: Any) -> None:
    assert stop_token_ids(llama_tok) == frozenset({2})
    assert stop_token_ids(llama_tok, (7, 2, 9)) == frozenset({2, 7, 9})
