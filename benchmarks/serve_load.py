"""HTTP load against running servers: vilaserve's worker and llama.cpp's `llama-server`, same
machine, same model, same prompts, one after the other (never at once).

Each server is started here as a child process, measured, and stopped. For every concurrency c,
c clients each send one request at once (greedy, 128 new tokens) and stream the answer:

* aggregate tok/s: all tokens / wall time from the first send to the last token;
* per-stream decode tok/s: (tokens - 1) / (last token - first token), median over streams;
* TTFT p50 / p95, inter-token latency p95 (gaps between streamed tokens), peak RSS.

Scenarios beyond the sweep (vilaserve; llama-server where it applies):

* ``long_prompt``: 7 streams decode; a request with a ~1,500-token prompt arrives; the 7
  streams' inter-token latency p95 while it is prefilled, against the same run without it;
* ``image_turns``: one picture, two questions (turn 2 resends turn 1 and its answer): time to
  first token of each turn (the image cache and the prefix cache serve turn 2).

    python benchmarks/serve_load.py --model ~/.cache/vilaserve/demo/<awq build> \\
        --llama-server /path/to/llama-server --gguf /path/to/model.gguf

Writes benchmarks/results/serve_load[-<label>].{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ("a lighthouse keeper", "a lost robot", "the first snow", "a dragon who bakes",
          "a city under the sea", "an old violin", "the last train home", "a tiny moon",
          "a clockmaker", "a paper boat", "a forest at night", "a kite festival",
          "a glass garden", "a desert well", "a sleepy volcano", "a winter market")  # fmt: skip


def chatml(question: str) -> str:
    """SmolLM2's chat format (what the worker's template produces for it)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Stream:
    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


class Server:
    """A child server process; `rss_peak_mb` reads its high-water mark before it stops."""

    def __init__(self, command: list[str], url: str, ready_path: str, env: dict[str, str]):
        self.command, self.url, self.ready_path, self.env = command, url, ready_path, env
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(RESULTS / "server.log", "wb"),
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"{self.command[0]} exited; see {RESULTS / 'server.log'}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"{self.command[0]} did not become ready")

    def rss_peak_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def vilaserve_stream(
    client: httpx.AsyncClient, url: str, prompt: str, tokens: int, images: list[str]
) -> Stream:
    """The worker protocol: NUL-delimited cumulative JSON; one frame per streamed token."""
    body: dict[str, Any] = {"prompt": prompt, "temperature": 0, "max_new_tokens": tokens}
    if images:
        body["images"] = images
    stream = Stream(time.perf_counter())
    produced = 0
    async with client.stream("POST", url + "/worker_generate_stream", json=body) as r:
        buffer = b""
        async for piece in r.aiter_bytes():
            now = time.perf_counter()
            buffer += piece
            *frames, buffer = buffer.split(b"\0")
            for frame in frames:
                if not frame:
                    continue
                data = json.loads(frame)
                if data.get("error_code"):
                    stream.error = data["text"]
                    return stream
                usage = data.get("usage") or {}
                count = int(usage.get("completion_tokens", produced + 1))
                stream.token_times += [now] * (count - produced)
                produced = count
    return stream


TOKENIZER: Any = None  # set for random-vocabulary GGUFs: prompts go as ids of the same length


def as_llama_prompt(prompt: str) -> str | list[int]:
    """The text itself, or (with a random-vocabulary GGUF) as many token ids as the worker's
    tokenizer makes of it, so both servers prefill the same number of positions."""
    if TOKENIZER is None:
        return prompt
    count = len(TOKENIZER(prompt).input_ids)
    return [1] + [259 + (7919 * i + len(prompt)) % 31000 for i in range(count - 1)]


async def llama_stream(
    client: httpx.AsyncClient, url: str, prompt: str, tokens: int, images: list[str]
) -> Stream:
    """llama-server's /completion with SSE; one event per token; EOS ignored (128 tokens)."""
    body = {
        "prompt": as_llama_prompt(prompt),
        "n_predict": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "cache_prompt": True,
    }
    stream = Stream(time.perf_counter())
    async with client.stream("POST", url + "/completion", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("content") or data.get("tokens"):
                stream.token_times.append(time.perf_counter())
            if data.get("stop"):
                break
    return stream


STREAMERS = {"vilaserve": vilaserve_stream, "llama.cpp": llama_stream}


async def run_clients(
    kind: str, url: str, prompts: list[str], tokens: int, images: list[str], delays: list[float]
) -> tuple[list[Stream], float]:
    streamer = STREAMERS[kind]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(i: int) -> Stream:
            await asyncio.sleep(delays[i])
            return await streamer(client, url, prompts[i], tokens, images)

        started = time.perf_counter()
        streams = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return list(streams), started


def summarise(streams: list[Stream], started: float) -> dict[str, Any]:
    good = [s for s in streams if s.token_times and not s.error]
    errors = [s.error for s in streams if s.error]
    if not good:
        return {"errors": errors}
    total = sum(len(s.token_times) for s in good)
    wall = max(s.token_times[-1] for s in good) - started
    per_stream = [
        (len(s.token_times) - 1) / (s.token_times[-1] - s.token_times[0])
        for s in good
        if len(s.token_times) > 1 and s.token_times[-1] > s.token_times[0]
    ]
    ttfts = [s.ttft for s in good]
    gaps = [g for s in good for g in s.gaps]
    return {
        "streams": len(good),
        "tokens": total,
        "aggregate_tok_s": round(total / wall, 1),
        "per_stream_decode_tok_s": round(statistics.median(per_stream), 1) if per_stream else None,
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "itl_p95_ms": round(percentile(gaps, 0.95) * 1e3, 1),
        "errors": errors,
    }


def make_png_b64(seed: int) -> str:
    from PIL import Image

    image = Image.new("RGB", (384, 384), ((seed * 70) % 256, (seed * 30) % 256, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


RUNS = iter(range(10**6))  # every run's prompts are new: no prefix cache helps a sweep


def sweep(kind: str, url: str, levels: list[int], tokens: int, image: bool) -> dict[str, Any]:
    out = {}
    for c in levels:
        run = next(RUNS)
        prompts = [
            chatml(f"Run {run}, reader {i}. "
                   + ("<image>\nWhat is in this picture? " if image else "")
                   + f"Tell me a long story about {TOPICS[i % len(TOPICS)]}.")
            for i in range(c)
        ]  # fmt: skip
        images = [make_png_b64(1)] if image else []
        streams, started = asyncio.run(run_clients(kind, url, prompts, tokens, images, [0.0] * c))
        out[str(c)] = summarise(streams, started)
        print(f"{kind} {'image' if image else 'text'} c={c}: {out[str(c)]}", flush=True)
    return out


def long_prompt_scenario(kind: str, url: str, tokens: int, long_tokens: int) -> dict[str, Any]:
    """7 streams decode; an 8th request with a long prompt arrives a moment later."""
    filler = " ".join(f"The {TOPICS[i % len(TOPICS)]} was mentioned once more." for i in range(400))
    words = filler.split()
    # ~1.3 tokens per word for this filler (SmolLM2's tokenizer); trimmed to about long_tokens
    long_prompt = chatml(" ".join(words[: int(long_tokens / 1.3)]) + " Summarise this.")
    results = {}
    for name, extra, delays in (
        ("without", [], [0.0] * 7),
        ("with", [long_prompt], [0.0] * 7 + [0.5]),
    ):
        run = next(RUNS)
        base = [chatml(f"Run {run}. Tell me a long story about {TOPICS[i]}.") for i in range(7)]
        prompts = [*base, *extra]
        streams, _started = asyncio.run(run_clients(kind, url, prompts, tokens, [], delays))
        running = streams[:7]
        gaps = [g for s in running for g in s.gaps]
        results[name] = {
            "itl_p95_ms": round(percentile(gaps, 0.95) * 1e3, 1),
            "itl_max_ms": round(max(gaps) * 1e3, 1) if gaps else None,
        }
        if name == "with" and streams[7].token_times:
            results[name]["long_prompt_ttft_s"] = round(streams[7].ttft - 0.5, 3)
    results["ratio"] = round(results["with"]["itl_p95_ms"] / results["without"]["itl_p95_ms"], 2)
    print(f"{kind} long prompt: {results}", flush=True)
    return results


def image_turns(url: str) -> dict[str, Any]:
    """Turn 1 asks about a new picture; turn 2 resends it with turn 1's question and answer."""
    image = make_png_b64(7)
    first_prompt = chatml("<image>\nDescribe this picture.")

    async def turn(prompt: str) -> Stream:
        async with httpx.AsyncClient(timeout=600) as client:
            return await vilaserve_stream(client, url, prompt, 32, [image])

    first = asyncio.run(turn(first_prompt))
    answer = httpx.post(
        url + "/worker_generate",
        json={"prompt": first_prompt, "images": [image], "temperature": 0, "max_new_tokens": 32,
              "echo": False},
    ).json()["text"]  # fmt: skip
    second_prompt = first_prompt + answer + "<|im_end|>\n" + chatml("What colour is it?")[0:]
    second = asyncio.run(turn(second_prompt))
    result = {
        "turn1_ttft_s": round(first.ttft, 3),
        "turn2_ttft_s": round(second.ttft, 3),
        "ratio": round(second.ttft / first.ttft, 3),
    }
    print(f"image turns: {result}", flush=True)
    return result


def transformers_generate(model_dir: str, tokens: int) -> dict[str, Any]:
    """transformers' own `generate`, one stream, greedy, bf16 and fp32: the LLM of the served
    checkpoint (its 16-bit sibling for the demo; random weights of the same shape when the
    served LLM is 4-bit, which transformers cannot run without AutoAWQ)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    llm = Path(model_dir) / "llm"
    sixteen = Path(str(model_dir).replace("/awq/", "/16bit/")) / "llm"
    tokenizer = AutoTokenizer.from_pretrained(llm)
    ids = tokenizer(chatml("Tell me a long story about a lighthouse keeper."), return_tensors="pt")
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        if (sixteen / "config.json").is_file() and "quantization_config" not in json.loads(
            (sixteen / "config.json").read_text()
        ):
            model = LlamaForCausalLM.from_pretrained(sixteen, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(llm)
            config.quantization_config = None
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
            model = model.to_empty(device="cpu").to(dtype)
            for param in model.parameters():
                torch.nn.init.normal_(param, 0.0, 0.02)
        model.eval()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=2, do_sample=False)  # warm-up
            started = time.perf_counter()
            generated = model.generate(
                **ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
            seconds = time.perf_counter() - started
        count = generated.shape[1] - ids["input_ids"].shape[1]
        out[str(dtype).removeprefix("torch.")] = round(count / seconds, 2)
        print(f"transformers generate {dtype}: {out[str(dtype).removeprefix('torch.')]} tok/s")
        del model
    return out


def shaped_checkpoints() -> tuple[str, Path]:
    from vilaserve.adapters.offline.checkpoints.shaped_vila import (
        build_shaped_vila,
        write_q4_0_gguf,
    )

    home = Path.home() / ".cache" / "vilaserve" / "bench"
    root, gguf_path = home / "vila15-3b-random", home / "vila15-3b-random-q4_0.gguf"
    if not (root / "config.json").is_file():
        build_shaped_vila(root)
    if not gguf_path.is_file():
        write_q4_0_gguf(gguf_path)
    return str(root), gguf_path


def vilaserve_server(model: str, port: int, concurrency: int, extra: list[str]) -> Server:
    command = [
        sys.executable, "-m", "vilaserve.entrypoints.worker.main", "--model-path", model,
        "--precision", "W4A16", "--port", str(port), "--no-register", "--log-format", "text",
        "--limit-model-concurrency", str(concurrency), *extra,
    ]  # fmt: skip
    return Server(command, f"http://127.0.0.1:{port}", "/health", dict(os.environ))


def llama_server(binary: str, gguf: str, port: int, slots: int, threads: int, ctx: int) -> Server:
    command = [
        binary, "-m", gguf, "--port", str(port), "-np", str(slots), "-t", str(threads),
        "-c", str(ctx * slots), "--no-webui",
    ]  # fmt: skip
    return Server(command, f"http://127.0.0.1:{port}", "/health", dict(os.environ))


def cpu_description() -> dict[str, str]:
    info = {"machine": platform.machine()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)"):
            info[key.strip()] = value.strip()
        if key.strip() == "Flags":
            flags = value.split()
            info["simd"] = " ".join(f for f in flags if f.startswith(("avx", "fma", "f16c")))
    return info


def plot(report: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, sweeps in report["sweeps"].items():
        for mode, results in sweeps.items():
            levels = [int(c) for c in results if "aggregate_tok_s" in results[c]]
            label = f"{kind} ({mode})"
            axes[0].plot(levels, [results[str(c)]["aggregate_tok_s"] for c in levels], "o-",
                         label=label)  # fmt: skip
            axes[1].plot(levels, [results[str(c)]["ttft_p95_s"] for c in levels], "o-",
                         label=label)  # fmt: skip
    axes[0].set(
        xlabel="concurrent streams", ylabel="aggregate tok/s", xscale="log", title="throughput"
    )
    axes[1].set(
        xlabel="concurrent streams", ylabel="TTFT p95 (s)", xscale="log", title="first token"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['label']}: {report['cpu'].get('Model name', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="a W4A16 VILA checkpoint directory, or `3b`: random weights at VILA1.5-3B's shape "
        "(built once under ~/.cache/vilaserve/bench, with a Q4_0 GGUF of its LLM for --gguf)",
    )
    parser.add_argument("--label", default="demo")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--gguf", default=None, help="the same LLM for llama-server")
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=2048, help="llama-server context per slot")
    parser.add_argument("--no-images", action="store_true")
    parser.add_argument("--hf-tokens", type=int, default=32, help="transformers generate tokens")
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--worker-args", default="", help="extra worker flags")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    if args.model == "3b":
        args.model, gguf_path = shaped_checkpoints()
        args.gguf = args.gguf or str(gguf_path)
        global TOKENIZER
        from transformers import AutoTokenizer

        TOKENIZER = AutoTokenizer.from_pretrained(Path(args.model) / "llm")
    top = max(levels)
    RESULTS.mkdir(exist_ok=True)
    report: dict[str, Any] = {
        "label": args.label,
        "cpu": cpu_description(),
        "threads": args.threads,
        "tokens": args.tokens,
        "sweeps": {},
    }
    with vilaserve_server(args.model, 21102, top, args.worker_args.split()) as server:
        details = httpx.post(server.url + "/model_details").json()
        report["vilaserve_model_details"] = details
        sweeps = {"text": sweep("vilaserve", server.url, levels, args.tokens, image=False)}
        if not args.no_images and details.get("multimodal"):
            sweeps["image"] = sweep("vilaserve", server.url, levels, args.tokens, image=True)
        report["sweeps"]["vilaserve"] = sweeps
        report["long_prompt"] = {
            "vilaserve": long_prompt_scenario(
                "vilaserve", server.url, args.tokens * 2, args.long_tokens
            )
        }
        if details.get("multimodal"):
            report["image_turns"] = image_turns(server.url)
        report["vilaserve_peak_rss_mb"] = round(server.rss_peak_mb())
    if args.llama_server and args.gguf:
        report["sweeps"]["llama.cpp"] = {"text": {}}
        rss = 0.0
        for c in levels:
            with llama_server(
                args.llama_server, args.gguf, 21103, c, args.threads, args.ctx
            ) as srv:
                report["sweeps"]["llama.cpp"]["text"].update(
                    sweep("llama.cpp", srv.url, [c], args.tokens, image=False)
                )
                if c == levels[-1] or c == 8:
                    rss = max(rss, srv.rss_peak_mb())
        with llama_server(args.llama_server, args.gguf, 21103, 8, args.threads, args.ctx) as srv:
            report["long_prompt"]["llama.cpp"] = long_prompt_scenario(
                "llama.cpp", srv.url, args.tokens * 2, args.long_tokens
            )
        report["llama_cpp_peak_rss_mb"] = round(rss)
    report["transformers_generate_tok_s"] = transformers_generate(args.model, args.hf_tokens)
    suffix = "" if args.label == "demo" else f"-{args.label}"
    (RESULTS / f"serve_load{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / f"serve_load{suffix}.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
