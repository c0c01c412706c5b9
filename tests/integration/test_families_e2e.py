"""Every layout of issue 17 served end to end by the real worker, greedy answers compared with
an independent reference: transformers' own `LlavaForConditionalGeneration` for llava-hf,
transformers' Qwen2/Llama on the spliced embeddings for NVILA, VILA1.5-3b-s2 and -40b, and
transformers' CLIP + LLaVA's rules (pad, projector) written out plainly for LLaVA-1.5.

The towers and the tiling themselves are checked against the reference's rules written out
plainly in test_vision_multiscale.py and test_intern_vit.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from servers import ServerThread, metric, start_worker
from test_worker_e2e import stream_frames

from vilaserve.adapters.offline.checkpoints import tiny_family
from vilaserve.adapters.worker.torch_vila.layout import detect_layout
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.adapters.worker.torch_vila.tiling import (
    dynamic_s2_token_count,
    dynamic_tile_token_count,
)
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN_INDEX,
    load_tokenizer,
    tokenize_with_images,
)
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.domain.shared.generation import SamplingParams

NEW_TOKENS = 10


def picture(width: int, height: int, seed: int = 0) -> bytes:
    """A noisy picture (a flat one would hide tiling and ordering mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def answer(worker: ServerThread, prompt: str, images: list[bytes]) -> str:
    body = {
        "prompt": prompt,
        "images": [base64.b64encode(png).decode() for png in images],
        "temperature": 0.0,
        "max_new_tokens": NEW_TOKENS,
        "echo": False,
    }
    frames = stream_frames(worker.url, body)
    assert frames[-1]["error_code"] == 0, frames[-1]
    return str(frames[-1]["text"])


def greedy(lm: torch.nn.Module, embeds: torch.Tensor, stop_ids: set[int]) -> list[int]:
    """transformers' model, full recompute per token: no cache of ours involved."""
    out: list[int] = []
    table = lm.get_input_embeddings()
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return out


def splice(table: torch.nn.Module, ids: list[int], blocks: list[torch.Tensor]) -> torch.Tensor:
    """Token embeddings with the k-th image placeholder replaced by blocks[k]."""
    pieces, start, k = [], 0, 0
    with torch.no_grad():
        for i, token in enumerate(ids):
            if token == IMAGE_TOKEN_INDEX:
                pieces += [table(torch.tensor(ids[start:i], dtype=torch.long)), blocks[k]]
                start, k = i + 1, k + 1
        pieces.append(table(torch.tensor(ids[start:], dtype=torch.long)))
    assert k == len(blocks)
    return torch.cat(pieces).unsqueeze(0)


def decoded_images(images: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(png)).convert("RGB") for png in images]


# --- llava-hf: transformers' own LlavaForConditionalGeneration is the reference -----------------


@pytest.fixture(scope="module", params=["conversion", "transformers5"])
def llava_hf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"llava-hf-{request.param}")
    return tiny_family.build_tiny_llava_hf(root, seed=3, key_style=request.param)


def test_llava_hf_answers_as_transformers_llava(llava_hf: Path) -> None:
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration

    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    png = picture(45, 30, seed=1)
    with start_worker(llava_hf) as worker:
        details = httpx.post(worker.url + "/model_details", json={}).json()
        got = answer(worker, prompt, [png])
    model = LlavaForConditionalGeneration.from_pretrained(llava_hf, dtype=torch.float32).eval()
    config = model.config
    tokenizer = load_tokenizer(llava_hf)
    processor = CLIPImageProcessorPil.from_pretrained(llava_hf)
    pixels = processor(decoded_images([png]), return_tensors="pt")["pixel_values"]
    # The processor's expansion: one <image> becomes image_seq_length copies of its id.
    expanded = prompt.replace("<image>", "<image>" * config.image_seq_length)
    ids = tokenizer(expanded, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert got == expected
    assert details["tokens_per_image"] == config.image_seq_length == 16


# --- LLaVA-1.5 original: tower by --vision-tower, pad, projector in the main shards --------------


@pytest.fixture(scope="module")
def llava_original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("llava-1.5")
    clip = tiny_family.build_tiny_clip(base / "clip-vit-large-patch14-336", seed=5)
    return tiny_family.build_tiny_llava(base / "llava-v1.5-7b", seed=4), clip


def expand_to_square_plainly(image: Image.Image, mean: list[float]) -> Image.Image:
    """LLaVA's `expand2square` with background int(255 * mean), written out again."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def test_llava_original_answers_as_clip_plus_llama_by_llavas_rules(
    llava_original: tuple[Path, Path],
) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

    root, clip = llava_original
    prompt = (
        "A chat between a curious human and an artificial intelligence assistant. The "
        "assistant gives helpful, detailed, and polite answers to the human's questions. "
        "USER: <image>\nWhat is it? ASSISTANT:"
    )
    png = picture(30, 50, seed=2)
    with start_worker(root, vision_tower=str(clip)) as worker:
        conv = httpx.post(worker.url + "/worker_get_conv_template", json={}).json()["conv"]
        got = answer(worker, prompt, [png])
    assert conv["name"] == "llava_v1"

    processor = CLIPImageProcessorPil.from_pretrained(clip)
    square = expand_to_square_plainly(decoded_images([png])[0], processor.image_mean)
    pixels = processor([square], return_tensors="pt")["pixel_values"]
    tower = CLIPVisionModel.from_pretrained(clip, dtype=torch.float32).eval()
    lm = LlamaForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(root.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    w = {k.removeprefix("model.mm_projector."): v.float() for k, v in state.items()}
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = torch.nn.functional.linear(features, w["0.weight"], w["0.bias"])
        block = torch.nn.functional.linear(
            torch.nn.functional.gelu(hidden), w["2.weight"], w["2.bias"]
        )[0]
    tokenizer = load_tokenizer(root)
    ids = tokenize_with_images(tokenizer, prompt)  # LLaVA's tokenizer_image_token rule
    embeds = splice(lm.get_input_embeddings(), ids, [block])
    expected = greedy(lm, embeds, {tokenizer.eos_token_id})
    assert got == tokenizer.decode(expected, skip_special_tokens=True)


def test_llava_original_without_its_tower_says_which_flag_to_use(
    llava_original: tuple[Path, Path],
) -> None:
    root, _ = llava_original
    with pytest.raises(FileNotFoundError, match=r"mm_vision_tower .* --vision-tower"):
        detect_layout(root)


# --- VILA-1.5 variants and NVILA: transformers' LLM on the spliced embeddings -------------------


@pytest.fixture(scope="module")
def family_root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    builders = {
        "vila-s2": lambda root: tiny_family.build_tiny_vila_s2(root, seed=6),
        "vila-40b": lambda root: tiny_family.build_tiny_vila_40b(root, seed=7),
        "nvila": lambda root: tiny_family.build_tiny_nvila(root, seed=8),
        "nvila-lite": lambda root: tiny_family.build_tiny_nvila(root, seed=9, lite=True),
    }
    yield builders[request.param](tmp_path_factory.mktemp(request.param))


def reference_splice(
    root: Path, prompt: str, images: list[bytes], lm: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """(the LLM as transformers runs it: `lm`, else the checkpoint's; its tokenizer; the
    prompt's embeddings with our pipeline's image features spliced where the family's rules put
    them: NVILA's real <image> token, then the embedding of "\\n")."""
    from transformers import AutoModelForCausalLM

    layout = detect_layout(root)
    assert layout.vision is not None
    if lm is None:
        lm = AutoModelForCausalLM.from_pretrained(layout.checkpoint.llm_dir, dtype=torch.float32)
        lm = lm.eval()
    table = lm.get_input_embeddings()
    tokenizer = load_tokenizer(layout.tokenizer_dir)
    hidden = int(layout.checkpoint.llm_config["hidden_size"])
    pipeline = VisionPipeline.from_layout(layout.vision, hidden, torch.float32, "cpu")
    alone = len(images) == 1
    blocks = pipeline.encode_prepared(
        [pipeline.prepare(im, alone) for im in decoded_images(images)]
    )
    if layout.image_tokens.real_token is not None:
        image_id = tokenizer.convert_tokens_to_ids(layout.image_tokens.real_token)
        ids = [IMAGE_TOKEN_INDEX if t == image_id else t for t in tokenizer(prompt)["input_ids"]]
        with torch.no_grad():
            newline = table(torch.tensor(tokenizer("\n", add_special_tokens=False)["input_ids"]))
        if layout.family == "NVILA-Lite" and alone:
            # Per tile: features, the encoder's "\n", the prompt's "\n" (reference §4.7).
            tile = pipeline.mode.tokens_per_tile
            blocks = [
                torch.cat(
                    [
                        torch.cat([b[i : i + tile], newline, newline])
                        for i in range(0, b.shape[0], tile)
                    ]
                )
                for b in blocks
            ]
        else:
            blocks = [torch.cat([b, newline]) for b in blocks]
    else:
        ids = tokenize_with_images(tokenizer, prompt)
    return lm, tokenizer, splice(table, ids, blocks)


def reference_answer(root: Path, prompt: str, images: list[bytes]) -> str:
    lm, tokenizer, embeds = reference_splice(root, prompt, images)
    stop = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])} - {None}
    return str(tokenizer.decode(greedy(lm, embeds, stop), skip_special_tokens=True))


def reference_prefill(
    root: Path, prompt: str, images: list[bytes], lm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's spliced embeddings and its last-position logits."""
    _, _, embeds = reference_splice(root, prompt, images, lm)
    with torch.no_grad():
        return embeds, lm(inputs_embeds=embeds).logits[0, -1]


PROMPTS = {
    "vila-s2": "A chat. USER: <image>\nWhat is it? ASSISTANT:",
    "vila-40b": "<|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n",
    "nvila": "<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\n",
    "nvila-lite": "<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize(
    "family_root", ["vila-s2", "vila-40b", "nvila", "nvila-lite"], indirect=True
)
def test_served_answers_equal_transformers_llm_on_the_spliced_embeddings(
    family_root: Path, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.params["family_root"]
    prompt = PROMPTS[name]
    png = picture(50, 30, seed=11)
    with start_worker(family_root) as worker:
        got = answer(worker, prompt, [png])
        # Two pictures in one request: NVILA squashes each to one tile (reference §4.6).
        two = prompt.replace("<image>", "<image><image>", 1)
        got_two = answer(worker, two, [png, picture(20, 40, seed=12)])
    assert got == reference_answer(family_root, prompt, [png])
    assert got_two == reference_answer(family_root, two, [png, picture(20, 40, seed=12)])


@pytest.mark.parametrize(
    ("family_root", "family", "per_image"),
    [
        # 32 px tiles of 8 px patches: 4x4 tower grid, 2x2 merge -> 4 positions.
        ("vila-s2", "VILA-1.5", 4),
        ("vila-40b", "VILA-1.5", 4),
        # NVILA: at most 12 last-scale tiles x 4 positions, then "\n".
        ("nvila", "NVILA", 12 * 4 + 1),
        # NVILA-Lite: 12 tiles + thumbnail, each 4 (3x3 merge of 4x4 padded to 6x6) + 2 "\n".
        ("nvila-lite", "NVILA-Lite", 13 * (4 + 2)),
    ],
    indirect=["family_root"],
)
def test_the_load_log_line_says_what_was_found(
    family_root: Path, family: str, per_image: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        runtime = VilaRuntime.load(VilaRuntimeOptions(str(family_root), dtype="float32"))
    try:
        loaded = [r for r in caplog.records if r.getMessage() == "model loaded"]
        assert len(loaded) == 1
        record = loaded[0].__dict__
        assert record["family"] == family
        assert record["tokens_per_image"] == per_image
        assert {"tower", "projector", "template", "image_placeholder"} <= record.keys()
        assert runtime.vision_encoder is not None
        assert runtime.vision_encoder.tokens_per_image == per_image
    finally:
        runtime.executor.shutdown()


@pytest.mark.parametrize("family_root", ["nvila", "nvila-lite"], indirect=True)
def test_nvila_positions_per_picture_follow_the_tiling_rules(
    family_root: Path, request: pytest.FixtureRequest
) -> None:
    layout = detect_layout(family_root)
    assert layout.vision is not None
    hidden = int(layout.checkpoint.llm_config["hidden_size"])
    pipeline = VisionPipeline.from_layout(layout.vision, hidden, torch.float32, "cpu")
    lite = request.node.callspec.params["family_root"] == "nvila-lite"
    for width, height in [(32, 32), (64, 32), (100, 30), (30, 90), (17, 200)]:
        image = Image.new("RGB", (width, height), "white")
        (block,) = pipeline.encode_prepared([pipeline.prepare(image, alone=True)])
        if lite:
            expected = dynamic_tile_token_count(width, height, 32, positions_per_tile=4)
        else:
            expected = dynamic_s2_token_count(width, height, 32, (32, 64, 96), 12, 4, 0)
        assert block.shape[0] == expected, (width, height)


# --- NVILA in W4A16: our quantizer's output, served, against transformers' Qwen2 holding the
# dequantized 4-bit weights --------------------------------------------------------------------


def test_nvila_w4a16_answers_as_transformers_qwen2_on_the_dequantized_weights(
    tmp_path: Path,
) -> None:
    from transformers import Qwen2ForCausalLM

    from vilaserve.adapters.worker.awq.loading import read_awq
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
    from vilaserve.entrypoints.offline.quantize import main as quantize

    source = tiny_family.build_tiny_nvila(tmp_path / "nvila", seed=8)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog.\n" * 64)
    out = tmp_path / "nvila-awq"
    quantize(
        ["--model-path", str(source), "--output", str(out), "--calib", str(calib),
         "--group-size", "32", "--seqlen", "64", "--n-samples", "64"]
    )  # fmt: skip
    prompt = PROMPTS["nvila"]
    png = picture(50, 30, seed=11)
    with start_worker(out, precision="W4A16") as worker:
        assert answer(worker, prompt, [png])  # served, with the int8 embedding table

    layout = detect_layout(out)
    args = LlamaArgs.from_hf_config(layout.checkpoint.llm_config)
    stored, plain = read_awq(layout.checkpoint.llm_dir, args)
    reference = Qwen2ForCausalLM.from_pretrained(source / "llm", dtype=torch.float32).eval()
    state = {k: v.float() for k, v in plain.items()}
    for name, weight in stored.items():
        state[f"{name}.weight"] = weight.dequantize().float()
        if weight.bias is not None:
            state[f"{name}.bias"] = weight.bias.float()
    reference.load_state_dict(state, strict=True)

    # The worker's own model and splice (16-bit embedding table, so the reference holds the
    # same rows), one prefill, against transformers on the reference's splice. Greedy text is
    # not compared: the CPU's 4-bit kernels round differently from a dequantized fp32 matmul
    # (0.3 % of the largest logit here), which flips near-ties of a random model.
    runtime = VilaRuntime.load(
        VilaRuntimeOptions(str(out), precision="W4A16", dtype="float32", embedding_bits=16)
    )
    try:
        assert runtime.vision_encoder is not None
        features = asyncio.run(runtime.vision_encoder.encode([png]))
        runner = runtime.model_runner
        prepared = runtime.executor.call(runner.prepare, prompt, features, SamplingParams())
        length = len(prepared.keys)
        model = runner.model

        def prefill() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode():
                embeds = prepared.embeddings(model, 0, length)
                return embeds, model(model.new_cache(1, length + 1), 0, inputs_embeds=embeds)[0, -1]

        embeds, ours = runtime.executor.call(prefill)
    finally:
        runtime.executor.shutdown()
    want_embeds, want = reference_prefill(out, prompt, [png], reference)
    torch.testing.assert_close(embeds[0], want_embeds[0], atol=1e-5, rtol=1e-5)
    error = float((ours - want).abs().max())
    assert error < 0.02 * float(want.abs().max())
    top2 = want.topk(2).values
    if float(top2[0] - top2[1]) > 2 * error:
        assert int(ours.argmax()) == int(want.argmax())


def test_llava_original_in_w4a16_takes_a_tinychat_pt_of_the_whole_llm(
    llava_original: tuple[Path, Path], tmp_path: Path
) -> None:
    """TinyChat quantizes LLaVA-1.5's whole LlavaLlamaForCausalLM: the `.pt` sits beside the
    16-bit folder (projector and tower still come from there)."""
    from vilaserve.entrypoints.offline.quantize import main as quantize

    root, clip = llava_original
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog.\n" * 64)
    out = tmp_path / "llava-awq"
    quantize(
        ["--model-path", str(root), "--output", str(out), "--calib", str(calib), "--no-search",
         "--group-size", "32", "--seqlen", "64", "--export-tinychat"]
    )  # fmt: skip
    (pt,) = out.glob("*-awq-v2.pt")
    with start_worker(
        root, vision_tower=str(clip), precision="W4A16", quant_path=str(pt)
    ) as worker:
        details = httpx.post(worker.url + "/model_details", json={}).json()
        assert answer(worker, "USER: <image>\nWhat is it? ASSISTANT:", [picture(40, 40)])
    assert details["tokens_per_image"] == 16


@pytest.mark.parametrize("family_root", ["nvila"], indirect=True)
def test_turn_two_about_an_nvila_picture_reuses_its_positions_and_its_encoding(
    family_root: Path,
) -> None:
    """The engine's prefix cache and the image cache work with pictures whose positions vary
    (NVILA: 4 x i x j + 1 here), as with VILA-1.5's fixed 196."""
    png = picture(50, 30, seed=11)
    positions = dynamic_s2_token_count(50, 30, 32, (32, 64, 96), 12, 4, 1)
    with start_worker(family_root) as worker:
        url = worker.url
        turn1 = PROMPTS["nvila"]
        first = answer(worker, turn1, [png])
        hits = metric(url, "vllm:prefix_cache_hits_total"), metric(url, "vllm:mm_cache_hits_total")
        turn2 = f"{turn1}{first}<|im_end|>\n<|im_start|>user\nAnd its color?<|im_end|>\n"
        second = answer(worker, turn2 + "<|im_start|>assistant\n", [png])
        reused = metric(url, "vllm:prefix_cache_hits_total") - hits[0]
        assert metric(url, "vllm:mm_cache_hits_total") == hits[1] + 1
    assert reused >= positions + 5  # the picture's positions and the text around them
    assert second == reference_answer(family_root, turn2 + "<|im_start|>assistant\n", [png])
