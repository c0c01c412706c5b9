"""What a user receives over HTTP against what the kernels deliver in-process (issue 24).

For each CPU path this machine runs (the native one `auto` picks, then each one forced with
`VILASERVE_CPU_PATH`), with the W4A16 demo model (SmolLM2-135M) and 128 new tokens, greedy:

* in-process, the reference: the same checkpoint loaded as the worker loads it, in a child
  process on that path, on its own model thread: the single-sequence decode of the one-call
  decoder (`model(cache, position, input_ids=...)`), and the engine's decode step
  (`Llama.decode_rows`) at B=1 and B=8;
* the worker over HTTP (`/worker_generate_stream`, a child process on that path): one stream
  (its decode tok/s: tokens after the first over the time between the first and the last),
  and eight at once (the sum of the eight streams' decode tok/s);
* the whole stack (`vilaserve serve`: OpenAI `/v1/completions` streaming -> controller ->
  worker), on the native path only: one stream and eight;
* llama-server on the same model's GGUF (`--llama-server`), both servers up, the same
  streams to one then the other, `--runs` pairs per level.

These shared 2-core machines drift by 20-30 % within seconds to minutes, so each ratio is
measured in pairs: the reference and the served figure back to back, `--pairs` times, with
both processes up (the idle one's threads sleep); a ratio is the median of its pairs (with
quartiles), never a best of one side over a best of the other. Ratios: HTTP c=1 over the
in-process decode, c=8 over the B=8 step, and the B=1 step over the one-call decoder.

    python benchmarks/serving_overhead.py [--paths auto,avx2,torch] [--pairs 8]
    python benchmarks/serving_overhead.py --size 3b --paths auto --llama-server PATH \\
        --gguf ~/.cache/vilaserve/bench/vila15-3b-random-q4_0.gguf
    python benchmarks/serving_overhead.py --paths auto --llama-server PATH --gguf \\
        ~/.cache/vilaserve/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Writes benchmarks/results/serving_overhead[-3b].{json,png}; `--size 3b` measures the 2.7B
VILA1.5-3B LLM shape (a random W4A16 checkpoint) with four streams instead of eight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import (
    TOPICS,
    Stream,
    chatml,
    cpu_description,
    llama_server,
    shaped_checkpoints,
    vilaserve_server,
)

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 128
MANY = 8  # the many-streams level: 8 for the demo model, 4 at the 2.7B shape (`--size 3b`)


def reference_loop(model_path: str, rounds: int) -> None:
    """Runs in the child process: the checkpoint as the worker loads it (on this process's CPU
    path, on its own model thread), then one figure per command read from stdin."""
    from batched_decode import step_seconds
    from cpu_paths import decode_ms

    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions

    options = VilaRuntimeOptions(model_path=model_path, precision="W4A16", adaptive_threads=False)
    runtime = VilaRuntime.load(options)
    model, executor = runtime.model_runner.model, runtime.executor
    executor.call(decode_ms, model, 8)  # warm-up
    print(json.dumps({"cpu_path": runtime.model_runner.compute_path}), flush=True)
    for line in sys.stdin:
        command, batch = line.split()
        if command == "decode":
            figure = 1e3 / executor.call(decode_ms, model, TOKENS)
        else:
            rows = int(batch)
            figure = rows / executor.call(step_seconds, model, rows, 32, rounds)
        print(json.dumps(round(figure, 1)), flush=True)


class Reference:
    """The in-process reference: a child process on `path` that answers decode and step
    figures on demand, so that they can be taken back to back with the served ones."""

    def __init__(self, path: str, model_path: str, rounds: int) -> None:
        env = {**os.environ, "VILASERVE_CPU_PATH": path}
        command = [sys.executable, __file__, "--reference", model_path, "--rounds", str(rounds)]
        self.child = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.cpu_path = str(json.loads(self._read())["cpu_path"])

    def _read(self) -> str:
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            raise SystemExit(f"the in-process reference failed (exit {self.child.wait()})")
        return line

    def figure(self, command: str, batch: int = 1) -> float:
        assert self.child.stdin is not None
        self.child.stdin.write(f"{command} {batch}\n")
        self.child.stdin.flush()
        return float(json.loads(self._read()))

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *_: object) -> None:
        self.child.kill()
        self.child.wait()


def paired(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Served over reference, pair by pair: the median ratio and its quartiles."""
    ratios = sorted(got / ref for ref, got in pairs if ref > 0)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "median": round(statistics.median(ratios), 3),
        "quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)],
        "pairs": [[ref, got] for ref, got in pairs],
    }


def decode_rate(stream: Stream) -> float:
    times = stream.token_times
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def prompts(run: int, clients: int) -> list[str]:
    return [
        chatml(f"Run {run}, reader {i}. Tell me a long story about {TOPICS[i % len(TOPICS)]}.")
        for i in range(clients)
    ]


async def post_stream(
    url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> AsyncIterator[bytes]:
    """POSTs `body` and yields the answer's pieces as they arrive (HTTP/1.1, chunked or not).

    A plain asyncio client rather than httpx: on a 2-core machine the client shares the CPU
    with the server, and httpx spent ~0.9 ms of CPU per streamed token here (measured with
    /proc/<pid>/task/*/stat), which is taken from the model; this one spends a tenth of that.
    The same client reads both servers."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(payload)}"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    try:
        status = (await reader.readline()).split()
        if len(status) < 2 or status[1] != b"200":
            raise RuntimeError(f"HTTP {status[1:2]}: {(await reader.read())[:300]!r}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            chunked |= name.lower() == "transfer-encoding" and "chunked" in value.lower()
        if not chunked:
            while piece := await reader.read(65536):
                yield piece
            return
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    finally:
        writer.close()


async def worker_stream(url: str, text: str) -> Stream:
    """The worker protocol: one NUL-ended JSON frame per token; exactly TOKENS of them."""
    body = {"prompt": text, "temperature": 0, "max_new_tokens": TOKENS, "ignore_eos": True}
    stream = Stream(time.perf_counter())
    buffer = b""
    async for piece in post_stream(url, "/worker_generate_stream", body):
        now = time.perf_counter()
        buffer += piece
        *frames, buffer = buffer.split(b"\0")
        for frame in frames:
            data = json.loads(frame)
            if data.get("error_code"):
                stream.error = data["text"]
                return stream
            count = int(data["usage"]["completion_tokens"])
            stream.token_times += [now] * (count - len(stream.token_times))
    return stream


def all_at_once(texts: list[str], one: Any) -> list[Stream]:
    async def run() -> list[Stream]:
        return list(await asyncio.gather(*(one(t) for t in texts)))

    return asyncio.run(run())


async def sse_stream(
    url: str,
    path: str,
    body: dict[str, Any],
    has_text: Callable[[dict[str, Any]], bool],
    headers: dict[str, str] | None = None,
) -> Stream:
    """A server-sent-events stream: a token's time for each `data:` event that carries text."""
    stream = Stream(time.perf_counter())
    buffer = b""
    async for piece in post_stream(url, path, body, headers):
        now = time.perf_counter()
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: {") and has_text(json.loads(event[6:])):
                stream.token_times.append(now)
    return stream


async def llama_stream(url: str, text: str) -> Stream:
    """llama-server's /completion, one event per token; EOS ignored (exactly TOKENS)."""
    body = {"prompt": text, "n_predict": TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False}  # fmt: skip
    return await sse_stream(url, "/completion", body, lambda event: bool(event.get("content")))


def against_llama(model: str, binary: str, gguf: str, pairs: int, port: int) -> dict[str, Any]:
    """The worker and llama-server (the same model's GGUF, MANY slots, as many threads), both
    up, the same streams sent to one and then the other, `pairs` times per level: each side's
    best, and the median of the worker over llama-server pair by pair."""
    worker = vilaserve_server(model, port, MANY, [])
    peer = llama_server(binary, gguf, port + 20, MANY, os.cpu_count() or 2, 2048)
    with worker, peer:

        def ours(texts: list[str]) -> list[Stream]:
            return all_at_once(texts, lambda t: worker_stream(worker.url, t))

        def theirs(texts: list[str]) -> list[Stream]:
            return all_at_once(texts, lambda t: llama_stream(peer.url, t))

        ours(prompts(-1, 1))
        theirs(prompts(-3, 1))
        out: dict[str, Any] = {}
        for clients in (1, MANY):
            measured = []
            for run in range(pairs):
                texts = prompts(run + 100 * clients, clients)
                peer_rate = sum(decode_rate(s) for s in theirs(texts))
                our_rate = sum(decode_rate(s) for s in ours(texts))
                measured.append((round(peer_rate, 1), round(our_rate, 1)))
            out[str(clients)] = {
                "llama_server_tok_s": max(p for p, _ in measured),
                "vilaserve_tok_s": max(o for _, o in measured),
                "vilaserve_over_llama_server": paired(measured),
            }
    return out


def served_pairs(ref: Reference, once: Any, pairs: int) -> dict[str, Any]:
    """One stream against the reference's decode and MANY against its B=MANY step, each
    pair back to back, `pairs` times."""
    out: dict[str, Any] = {}
    for clients, command in ((1, "decode"), (MANY, "step")):
        measured, errors, tokens = [], [], []
        for run in range(pairs):
            reference = ref.figure(command, clients)
            streams = once(prompts(run + 100 * clients, clients))
            errors += [s.error for s in streams if s.error]
            tokens = [len(s.token_times) for s in streams]
            measured.append((reference, round(sum(decode_rate(s) for s in streams), 1)))
        out[str(clients)] = {
            "decode_tok_s": max(got for _, got in measured),  # the best run, for the plot
            "tokens": tokens,
            "errors": errors,
            "over_reference": paired(measured),
        }
    return out


def worker_http(model: str, path: str, ref: Reference, pairs: int, port: int) -> dict[str, Any]:
    server = vilaserve_server(model, port, MANY, [])
    server.env = {**server.env, "VILASERVE_CPU_PATH": path}
    url = server.url
    with server:

        def once(texts: list[str]) -> list[Stream]:
            return all_at_once(texts, lambda t: worker_stream(url, t))

        once(prompts(-1, 1))  # warm-up
        return served_pairs(ref, once, pairs)


async def api_stream(url: str, key: str, model: str, text: str) -> Stream:
    """OpenAI streaming completions: one SSE event per streamed token."""
    body = {"model": model, "prompt": text, "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    return await sse_stream(
        url,
        "/v1/completions",
        body,
        lambda event: bool(event["choices"][0].get("text")),
        {"Authorization": f"Bearer {key}"},
    )


def whole_stack(model: str, ref: Reference, pairs: int, port: int) -> dict[str, Any]:
    from attacks import ServeStack

    with ServeStack(model, port) as stack:
        target = stack.target
        assert target is not None

        def once(texts: list[str]) -> list[Stream]:
            return all_at_once(
                texts,
                lambda t: api_stream(target.api, target.api_key, target.model, t),
            )

        once(prompts(-2, 1))
        return served_pairs(ref, once, pairs)


def runnable_paths() -> list[str]:
    """`auto` (the native path), then every other path this machine can be forced onto."""
    from vilaserve.adapters.worker import cpu_kernels

    def runs_here(path: str) -> bool:
        if path == "torch":
            return True
        if path == "avx512_bf16":
            return cpu_kernels.avx512_kernels() is not None
        return cpu_kernels.fp32_kernels(path) is not None

    native = cpu_kernels.cpu_path()
    return ["auto", *(p for p in cpu_kernels.CPU_PATHS if p != native and runs_here(p))]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["paths"])
    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(15, 4.8))

    def level(part: str, c: int, key: str = "decode_tok_s") -> Any:
        return lambda p: (p.get(part) or {}).get(str(c), {}).get(key, 0.0)

    bars = [
        ("in-process decode", lambda p: p["in_process"]["decode_tok_s"]),
        ("worker HTTP c=1", level("http", 1)),
        ("whole stack c=1", level("whole_stack", 1)),
        ("llama-server c=1", level("llama_server", 1, "llama_server_tok_s")),
        (f"in-process B={MANY} step", lambda p: p["in_process"]["step_bn_tok_s"]),
        (f"worker HTTP c={MANY}", level("http", MANY)),
        (f"whole stack c={MANY}", level("whole_stack", MANY)),
        (f"llama-server c={MANY}", level("llama_server", MANY, "llama_server_tok_s")),
    ]
    width = 0.8 / len(bars)
    for i, (label, key) in enumerate(bars):
        values = [key(report["paths"][n]) for n in names]
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(names))], values, width, label=label)
    labels = [report["paths"][n]["in_process"]["cpu_path"] for n in names]
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("tokens / s (best pair)")
    shape = "2.7B VILA1.5-3B LLM" if report["size"] == "3b" else "SmolLM2-135M"
    ax.set_title(f"W4A16 {shape} shape ({report['cpu']['Model name']})")
    ax.legend(fontsize=7)

    def ratio(part: str, c: int | None, key: str = "over_reference") -> Any:
        def get(p: dict[str, Any]) -> dict[str, Any] | None:
            if c is None:
                return p["ratios"]["b1_step_over_decode"]  # type: ignore[no-any-return]
            return (p.get(part) or {}).get(str(c), {}).get(key)

        return get

    ratios = [
        ("worker HTTP c=1 / decode", ratio("http", 1)),
        (f"worker HTTP c={MANY} / B={MANY} step", ratio("http", MANY)),
        ("whole stack c=1 / decode", ratio("whole_stack", 1)),
        (f"whole stack c={MANY} / B={MANY} step", ratio("whole_stack", MANY)),
        ("B=1 step / decode", ratio("", None)),
        ("worker / llama-server c=1", ratio("llama_server", 1, "vilaserve_over_llama_server")),
        (
            f"worker / llama-server c={MANY}",
            ratio("llama_server", MANY, "vilaserve_over_llama_server"),
        ),
    ]
    width = 0.8 / len(ratios)
    for i, (label, get) in enumerate(ratios):
        found = [(x, get(report["paths"][n])) for x, n in enumerate(names)]
        found = [(x, r) for x, r in found if r]
        if not found:
            continue
        offset = (i - (len(ratios) - 1) / 2) * width
        medians = [r["median"] for _, r in found]
        spread = [
            [m - r["quartiles"][0] for m, (_, r) in zip(medians, found, strict=True)],
            [r["quartiles"][1] - m for m, (_, r) in zip(medians, found, strict=True)],
        ]
        xs = [x + offset for x, _ in found]
        ratio_ax.bar(xs, medians, width, yerr=spread, capsize=2, label=label)
    ratio_ax.axhline(0.9, color="k", linestyle="--", linewidth=0.8)
    ratio_ax.set_xticks(range(len(names)), labels)
    ratio_ax.set_ylabel("median of back-to-back pairs (bars: quartiles)")
    ratio_ax.set_title("served / in-process, and worker / llama-server")
    ratio_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default="", help="comma list; default: every runnable one")
    parser.add_argument("--pairs", type=int, default=8, help="back-to-back pairs per ratio")
    parser.add_argument("--runs", type=int, default=3, help="worker / llama-server pairs per level")
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument("--model", default=None, help="default: the W4A16 demo model")
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=40, help="engine steps timed per batch")
    parser.add_argument("--skip-stack", action="store_true", help="no whole-stack run")
    parser.add_argument("--llama-server", default=None, help="llama-server binary: also measured")
    parser.add_argument("--gguf", default=None, help="the same model's GGUF for --llama-server")
    parser.add_argument(
        "--size",
        default="small",
        choices=["small", "3b"],
        help="3b: the 2.7B VILA1.5-3B LLM shape (a random W4A16 checkpoint), c=1 and c=4",
    )
    args = parser.parse_args()
    if args.reference:
        reference_loop(args.reference, args.rounds)
        return
    from attacks import demo_model

    global MANY
    if args.size == "3b":
        MANY = 4
        model = args.model or shaped_checkpoints()[0]
    else:
        model = args.model or demo_model()
    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "size": args.size,
        "tokens": TOKENS,
        "many": MANY,
        "paths": {},
    }
    paths = args.paths.split(",") if args.paths else runnable_paths()
    for path in paths:
        entry: dict[str, Any] = {}
        with Reference(path, model, args.rounds) as ref:
            b1 = [(ref.figure("decode"), ref.figure("step", 1)) for _ in range(args.pairs)]
            http = worker_http(model, path, ref, args.pairs, args.port)
            if path == "auto" and not args.skip_stack:
                entry["whole_stack"] = whole_stack(model, ref, args.pairs, args.port + 10)
        decodes = [r for r, _ in b1] + [r for r, _ in http["1"]["over_reference"]["pairs"]]
        entry["in_process"] = {
            "cpu_path": ref.cpu_path,
            "decode_tok_s": max(decodes),
            "step_b1_tok_s": max(step for _, step in b1),
            "step_bn_tok_s": max(r for r, _ in http[str(MANY)]["over_reference"]["pairs"]),
        }
        entry["http"] = http
        entry["ratios"] = {  # medians of back-to-back pairs
            "http_c1_over_decode": http["1"]["over_reference"]["median"],
            "http_cn_over_bn_step": http[str(MANY)]["over_reference"]["median"],
            "b1_step_over_decode": paired(b1),
        }
        if "whole_stack" in entry:
            stack = entry["whole_stack"]
            stack["ratios"] = {
                "c1_over_decode": stack["1"]["over_reference"]["median"],
                "cn_over_bn_step": stack[str(MANY)]["over_reference"]["median"],
            }
        if path == "auto" and args.llama_server:
            entry["llama_server"] = against_llama(
                model, args.llama_server, args.gguf, args.runs, args.port + 30
            )
        report["paths"][path] = entry
        print(json.dumps({path: entry}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "serving_overhead" + ("-3b" if args.size == "3b" else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
