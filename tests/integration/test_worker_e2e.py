"""The real worker (torch adapters, uvicorn) on tiny checkpoints, driven over loopback HTTP
exactly as TinyChat's web server and FastChat's OpenAI server drive it."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from servers import ServerThread, metric, start_worker
from transformers import LlamaForCausalLM

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png, make_png_b64
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.image_processing import decode_image
from vilaserve.adapters.worker.torch_vila.tokenization import (
    IMAGE_TOKEN_INDEX,
    load_tokenizer,
    tokenize_with_images,
)
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline

JSON = {"content-type": "application/json"}

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def siglip_worker(tiny_vila_siglip: Path) -> Iterator[ServerThread]:
    with start_worker(tiny_vila_siglip) as server:
        yield server


def stream_frames(url: str, body: dict, timeout: float = 60) -> list[dict]:
    """TinyChat's gradio client: POST, then split the byte stream on NUL."""
    frames: list[dict] = []
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=timeout) as r:
        buffer = b""
        for piece in r.iter_bytes():
            buffer += piece
            *complete, buffer = buffer.split(b"\0")
            frames += [json.loads(c) for c in complete if c]
    return frames


def reference_greedy(checkpoint: Path, prompt: str, png: bytes | None, n: int) -> str:
    """Greedy decoding with transformers' own Llama on the spliced embeddings."""
    ckpt = VilaCheckpoint.open(checkpoint)
    tokenizer = load_tokenizer(ckpt.llm_dir)
    hf = LlamaForCausalLM.from_pretrained(ckpt.llm_dir, dtype=torch.float32).eval()
    ids = tokenize_with_images(tokenizer, prompt)
    embed = hf.get_input_embeddings()
    pieces = []
    if png is not None:
        vision = VisionPipeline.from_checkpoint(ckpt.root, ckpt.config, torch.float32, "cpu")
        image = vision.encode([decode_image(png, 10**8)])[0]
    start = 0
    for i, token in enumerate(ids):
        if token == IMAGE_TOKEN_INDEX:
            pieces += [embed(torch.tensor(ids[start:i])), image]
            start = i + 1
    pieces.append(embed(torch.tensor(ids[start:])))
    embeds = torch.cat(pieces).unsqueeze(0)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(inputs_embeds=embeds).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_tinychat_web_server_flow(siglip_worker: ServerThread, tiny_vila_siglip: Path) -> None:
    prompt = f"{VICUNA} USER: <image>\nWhat is it? ASSISTANT:"
    png = make_png(40, 30, "red")
    body = {
        "model": "tiny-vila",
        "prompt": prompt,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "stop": "</s>",
        "images": [base64.b64encode(png).decode()],
    }
    frames = stream_frames(siglip_worker.url, body)
    assert frames and all(f["error_code"] == 0 for f in frames)
    assert all(f["text"].startswith(prompt) for f in frames)  # echoed, stripped by length
    texts = [f["text"] for f in frames]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
    answer = frames[-1]["text"][len(prompt) :]
    assert answer == reference_greedy(tiny_vila_siglip, prompt, png, 12)
    assert frames[-1]["finish_reason"] in ("stop", "length")
    usage = frames[-1]["usage"]
    details = httpx.post(siglip_worker.url + "/model_details", json={}).json()
    count = httpx.post(siglip_worker.url + "/count_token", json={"prompt": prompt}).json()
    assert usage["prompt_tokens"] == count["count"]
    assert details["tokens_per_image"] == 4  # 16 SigLIP patches merged 2x2, from the config
    assert details["cpu_path"] == cpu_kernels.cpu_path()  # the kernels this worker runs on


def test_fastchat_openai_server_flow(siglip_worker: ServerThread) -> None:
    url = siglip_worker.url
    conv = httpx.post(url + "/worker_get_conv_template", json={"model": "m"}).json()["conv"]
    context = httpx.post(url + "/model_details", json={"model": "m"}).json()["context_length"]
    assert context == 512
    prompt = conv["system_message"] + " USER: $$<image>$$<image>\nDescribe it. ASSISTANT:"
    count = httpx.post(url + "/count_token", json={"model": "m", "prompt": prompt}).json()
    assert count["error_code"] == 0 and 0 < count["count"] < context
    body = {
        "model": "m",
        "prompt": prompt,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_new_tokens": min(16, context - count["count"]),
        "echo": False,
        "stop_token_ids": conv["stop_token_ids"],
        "stop": list({"</s>", *(conv["stop_str"] or [])}),
        "seed": 7,
        "images": ["data:image/png;base64," + make_png_b64(32, 32, "blue")],
    }
    first = stream_frames(url, body)
    again = stream_frames(url, body)
    assert first[-1]["error_code"] == 0
    assert not first[-1]["text"].startswith(conv["system_message"])  # echo false: answer only
    assert first[-1]["text"] == again[-1]["text"]  # the seed makes sampling reproducible
    single = httpx.post(url + "/worker_generate", json=body, timeout=60).json()
    assert single["text"] == first[-1]["text"]


def test_stop_string_cuts_the_answer(siglip_worker: ServerThread) -> None:
    prompt = "USER: tell me about the cat ASSISTANT:"
    base = {"prompt": prompt, "temperature": 0, "max_new_tokens": 24, "echo": False}
    full = stream_frames(siglip_worker.url, base)[-1]["text"]
    assert len(full) > 4
    stop = full[2:4]
    cut = stream_frames(siglip_worker.url, {**base, "stop": [stop]})
    assert cut[-1]["text"] == full[: full.index(stop)]
    assert cut[-1]["finish_reason"] == "stop"
    assert all(stop not in f["text"] for f in cut)


def test_bad_input_is_refused_clearly_and_the_worker_keeps_serving(
    siglip_worker: ServerThread,
) -> None:
    url = siglip_worker.url
    cases = [
        (b"{oops", 40001, "not valid JSON"),
        (json.dumps({"images": []}).encode(), 40001, "'prompt' is required"),
        (json.dumps({"prompt": "<image>", "images": ["@@@"]}).encode(), 40001, "base64"),
        (json.dumps({"prompt": "<image>", "images": []}).encode(), 40001, "placeholders"),
        (json.dumps({"prompt": "q", "top_p": 0}).encode(), 40302, "top_p"),
        (json.dumps({"prompt": "q", "max_new_tokens": -4}).encode(), 40302, "max_new_tokens"),
    ]
    for raw, code, message in cases:
        response = httpx.post(url + "/worker_generate_stream", content=raw, headers=JSON)
        assert response.status_code == 400
        frame = json.loads(response.content.rstrip(b"\0"))
        assert frame["error_code"] == code and message in frame["text"], frame
    not_image = {"prompt": "<image>", "images": [base64.b64encode(b"GIF? no").decode()]}
    assert stream_frames(url, not_image)[-1]["error_code"] == 40001
    too_long = {"prompt": "the cat " * 400, "max_new_tokens": 4}
    frame = stream_frames(url, too_long)[-1]
    assert frame["error_code"] == 40303 and "context" in frame["text"]
    ok = stream_frames(url, {"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3})
    assert ok[-1]["error_code"] == 0


def test_status_answers_while_generations_run(siglip_worker: ServerThread) -> None:
    body = {
        "prompt": "USER: <image>\nhi ASSISTANT:",
        "images": [make_png_b64(32, 32, "green")],
        "max_new_tokens": 200,
        "temperature": 0.9,
        "stop_token_ids": [-1],
    }
    results: list[list[dict]] = []

    def one() -> None:
        results.append(stream_frames(siglip_worker.url, body))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    slowest = 0.0
    seen_queue = 0
    for _ in range(10):
        started = time.perf_counter()
        status = httpx.post(siglip_worker.url + "/worker_get_status").json()
        slowest = max(slowest, time.perf_counter() - started)
        seen_queue = max(seen_queue, status["queue_length"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert seen_queue >= 1
    assert slowest < 0.5  # generations run off the event loop
    assert len(results) == 3 and all(r[-1]["error_code"] == 0 for r in results)


def test_clip_checkpoint_with_mlp2x_gelu_serves(tiny_vila_clip: Path) -> None:
    with start_worker(tiny_vila_clip) as server:
        prompt = "USER: <image>\nWhat is it? ASSISTANT:"
        png = make_png(20, 44, "yellow", mode="RGBA")
        body = {
            "prompt": prompt,
            "images": [base64.b64encode(png).decode()],
            "temperature": 0,
            "max_new_tokens": 8,
            "echo": False,
        }
        frames = stream_frames(server.url, body)
        assert frames[-1]["error_code"] == 0
        assert frames[-1]["text"] == reference_greedy(tiny_vila_clip, prompt, png, 8)
        details = httpx.post(server.url + "/model_details", json={}).json()
        assert details["tokens_per_image"] == 16  # CLIP drops the CLS token, no merge


# ignore_eos: a random tiny model can sample its end-of-sequence token within a few steps, and
# these requests must still be running when the test looks (or when the others are refused).
LONG = {"max_new_tokens": 400, "temperature": 0.9, "stop_token_ids": [-1], "ignore_eos": True}


def test_a_client_that_disconnects_frees_its_sequence(siglip_worker: ServerThread) -> None:
    body = {"prompt": "USER: hi ASSISTANT:", **LONG}
    with httpx.stream("POST", siglip_worker.url + "/worker_generate_stream", json=body) as r:
        chunks = r.iter_bytes()
        next(chunks)
        next(chunks)
        assert metric(siglip_worker.url, "vllm:num_requests_running") == 1
    # The connection is closed: the sequence leaves the batch, its cache row is free.
    deadline = time.monotonic() + 5
    while metric(siglip_worker.url, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metric(siglip_worker.url, "vllm:num_requests_running") == 0
    assert metric(siglip_worker.url, "vllm:kv_cache_usage_perc") == 0
    status = httpx.post(siglip_worker.url + "/worker_get_status").json()
    assert status["queue_length"] == 0


def test_overload_beyond_the_queue_is_refused_at_once(tiny_vila_siglip: Path) -> None:
    with start_worker(tiny_vila_siglip, limit_model_concurrency=1, max_queue_length=0) as worker:
        answers: list[tuple[int, int, str, float, str | None]] = []

        def ask(i: int) -> None:
            started = time.perf_counter()
            body = {"prompt": f"USER: hi {i} ASSISTANT:", **LONG}
            url = worker.url + "/worker_generate_stream"
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                raw = r.read()
            last = json.loads(raw.rstrip(b"\0").split(b"\0")[-1])
            answers.append(
                (
                    r.status_code,
                    last["error_code"],
                    last["text"],
                    time.perf_counter() - started,
                    r.headers.get("retry-after"),
                )
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    refused = [a for a in answers if a[1] == 42903]
    served = [a for a in answers if a[1] == 0]
    assert refused and served and len(refused) + len(served) == 4
    assert all(status == 429 and retry == "1" for status, _, _, _, retry in refused)
    assert all("busy" in text for _, _, text, _, _ in refused)
    assert max(a[3] for a in refused) < min(a[3] for a in served)  # refused at once


def test_a_non_streaming_client_that_gives_up_stops_its_generation(
    siglip_worker: ServerThread,
) -> None:
    url = siglip_worker.url
    body = {"prompt": "USER: hi ASSISTANT:", **LONG, "max_new_tokens": 1000, "seed": 3}
    full = httpx.post(url + "/worker_generate", json=body, timeout=60).json()
    whole = full["usage"]["completion_tokens"]
    assert whole > 300  # the context's worth: long enough to give up in the middle
    before = metric(url, "vllm:generation_tokens_total")
    started = time.perf_counter()
    httpx.post(url + "/worker_generate", json=body, timeout=60)
    seconds_whole = time.perf_counter() - started
    generated_whole = metric(url, "vllm:generation_tokens_total") - before
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/worker_generate", json=body, timeout=seconds_whole / 5)
    deadline = time.monotonic() + 5
    while metric(url, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metric(url, "vllm:num_requests_running") == 0
    generated = metric(url, "vllm:generation_tokens_total") - before - generated_whole
    assert generated < whole / 2  # stopped early, not run to the end for nobody
    assert httpx.post(url + "/worker_get_status").json()["queue_length"] == 0


def test_turn_two_about_one_picture_reuses_its_prefix_and_encoding(
    siglip_worker: ServerThread,
) -> None:
    url = siglip_worker.url
    image = make_png_b64(48, 40, "purple")
    turn1 = "USER: <image>\nWhat is this? ASSISTANT:"
    params = {"temperature": 0, "max_new_tokens": 8}
    first = stream_frames(url, {"prompt": turn1, "images": [image], **params})[-1]
    hits = metric(url, "vllm:prefix_cache_hits_total"), metric(url, "vllm:mm_cache_hits_total")
    turn2 = f"{first['text']}</s>USER: And its color? ASSISTANT:"
    second = stream_frames(url, {"prompt": turn2, "images": [image], **params})[-1]
    assert second["error_code"] == 0
    reused = metric(url, "vllm:prefix_cache_hits_total") - hits[0]
    per_image = httpx.post(url + "/model_details").json()["tokens_per_image"]
    assert reused >= per_image + 5  # the image's positions, the text around it, the answer
    assert metric(url, "vllm:mm_cache_hits_total") == hits[1] + 1


def test_the_parts_of_each_first_token_are_on_metrics(siglip_worker: ServerThread) -> None:
    url = siglip_worker.url
    name = "vilaserve:first_token_part_seconds"
    parts = ("queue", "image_decode", "vision_tower", "projector", "prefill", "first_sample")

    def sample(kind: str, part: str) -> float:
        return metric(url, f'{name}_{kind}{{part="{part}"}}')

    before = {part: (sample("count", part), sample("sum", part)) for part in parts}
    body = {
        "prompt": "USER: <image>\nWhat is this? ASSISTANT:",
        "images": [make_png_b64(44, 36, "teal")],  # a picture no other test sends: encoded
        "temperature": 0,
        "max_new_tokens": 4,
    }
    assert stream_frames(url, body)[-1]["error_code"] == 0
    for part, (count, total) in before.items():
        assert sample("count", part) == count + 1, part  # once for the request, not per token
        if part != "queue":  # nothing else ran: its wait may round to nothing
            assert sample("sum", part) > total, part
