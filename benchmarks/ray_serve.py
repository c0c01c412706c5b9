"""One machine's fleet two ways: Ray Serve replicas vs the controller with two workers.

On a local two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node), `vilaserve serve
--ray ADDRESS` runs with one replica, then with two; beside it, the controller mode with two
workers (`vilaserve controller`, two `vilaserve worker`, `vilaserve api`, one compute thread
each, as a Ray actor with one CPU gets). Every configuration is driven the same way, through the
OpenAI API: 1-8 concurrent streamed chat completions about distinct pictures (aggregate tok/s,
time to first token), then conversations of two turns about a picture, where turn 2 repeats
turn 1 and its answer: its time to first token with cache-aware routing (turn 2 goes to the
replica that holds the picture and the prefix) and without (`--no-cache-aware-routing`).

    python benchmarks/ray_serve.py                       # the W4A16 demo model, full sweep
    python benchmarks/ray_serve.py --model-path CKPT --precision W16A16 --levels 1,2 \\
        --tokens 8 --conversations 2 --out benchmarks/results/ray_serve_short   # a quick check

Writes `--out`.json and `--out`.png (default benchmarks/results/ray_serve).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from serve_load import cpu_description, make_png_b64, percentile

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("What is in this picture?", "Which colours do you see?", "Describe it in detail.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vilaserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "vilaserve.entrypoints.cli", *args]


@contextmanager
def children(commands: list[tuple[list[str], dict[str, str]]], log: Path) -> Iterator[None]:
    """Starts each command (with extra environment); stops them all, last first."""
    with open(log, "ab") as out:
        processes = [
            subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=out)
            for cmd, env in commands
        ]
        try:
            yield
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in reversed(processes):
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


def wait_ready(url: str, model: str, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(url + "/v1/models", timeout=5)
            if reply.is_success and any(m["id"] == model for m in reply.json()["data"]):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1.0)
    sys.exit(f"{url} did not list {model} within {timeout_s:g} s; see the log in {RESULTS}")


@dataclass
class Stream:
    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    error: str = ""


async def chat(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, Any]], tokens: int
) -> Stream:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = Stream(time.perf_counter())
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            stream.error = (await reply.aread()).decode()[:300]
            return stream
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                stream.error = event["error"]["message"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    stream.token_times.append(time.perf_counter())
                    stream.text += piece
            if event.get("usage"):
                stream.tokens = event["usage"]["completion_tokens"]
    return stream


def about_picture(seed: int, question: str) -> dict[str, Any]:
    url = "data:image/png;base64," + make_png_b64(seed)
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question},
        ],
    }


async def concurrent_streams(url: str, model: str, count: int, tokens: int, run: int) -> dict:
    async with httpx.AsyncClient(timeout=900) as client:
        started = time.perf_counter()
        streams = await asyncio.gather(
            *(
                chat(client, url, model, [about_picture(1000 * run + i, QUESTIONS[0])], tokens)
                for i in range(count)
            )
        )
    good = [s for s in streams if s.token_times and not s.error]
    if not good:
        return {"errors": [s.error for s in streams]}
    wall = max(s.token_times[-1] for s in good) - started
    ttfts = [s.token_times[0] - s.sent for s in good]
    return {
        "streams": len(good),
        "tokens": sum(s.tokens for s in good),
        "aggregate_tok_s": round(sum(s.tokens for s in good) / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "errors": [s.error for s in streams if s.error],
    }


async def second_turns(url: str, model: str, conversations: int, tokens: int) -> dict:
    """Turn 1 about a new picture, then turn 2 on the same picture and prefix: turn 2's TTFT.
    Two conversations at a time, so that both replicas are in use."""
    ttfts: list[float] = []
    errors: list[str] = []
    async with httpx.AsyncClient(timeout=900) as client:

        async def conversation(i: int) -> None:
            first = about_picture(5000 + i, QUESTIONS[0])
            turn_1 = await chat(client, url, model, [first], tokens)
            history = [first, {"role": "assistant", "content": turn_1.text}]
            turn_2 = await chat(
                client, url, model, [*history, {"role": "user", "content": QUESTIONS[1]}], 1
            )
            if turn_1.error or turn_2.error or not turn_2.token_times:
                errors.append(turn_1.error or turn_2.error or "no token")
            else:
                ttfts.append(turn_2.token_times[0] - turn_2.sent)

        for start in range(0, conversations, 2):
            await asyncio.gather(
                *(conversation(i) for i in range(start, min(start + 2, conversations)))
            )
    return {
        "conversations": len(ttfts),
        "turn2_ttft_p50_s": round(percentile(ttfts, 0.5), 3),
        "turn2_ttft_mean_s": round(sum(ttfts) / len(ttfts), 3) if ttfts else None,
        "errors": errors,
    }


def warm_up(url: str, model: str, workers: int) -> None:
    """Untimed: every worker's first picture and first tokens (lazy set-up, kernel caches)."""
    asyncio.run(concurrent_streams(url, model, 2 * workers, 4, run=999))


def sweep(url: str, model: str, args: argparse.Namespace, label: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run, count in enumerate(args.levels):
        out[str(count)] = asyncio.run(concurrent_streams(url, model, count, args.tokens, run))
        print(f"{label} streams={count}: {out[str(count)]}", flush=True)
    return out


def model_flags(args: argparse.Namespace) -> list[str]:
    return ["--model-path", args.model_path, "--precision", args.precision]


def ray_configuration(
    address: str, args: argparse.Namespace, model: str, replicas: int, cache_aware: bool
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [*model_flags(args), "--ray", address, "--replicas", str(replicas)]
    flags += ["--api-port", str(port), "--log-format", "text"]
    if not cache_aware:
        flags.append("--no-cache-aware-routing")
    label = f"ray {replicas} replica{'s' * (replicas > 1)}" + (
        "" if cache_aware else " (no affinity)"
    )
    with children([(vilaserve("serve", *flags), {})], args.out.with_suffix(".log")):
        wait_ready(url, model)
        warm_up(url, model, replicas)
        result: dict[str, Any] = {}
        if not args.skip_sweep:
            result["sweep"] = sweep(url, model, args, label)
        if replicas > 1:
            result["second_turns"] = asyncio.run(
                second_turns(url, model, args.conversations, args.tokens)
            )
            print(f"{label} turn 2: {result['second_turns']}", flush=True)
    return result


def controller_configuration(args: argparse.Namespace, model: str) -> dict[str, Any]:
    controller, api = free_port(), free_port()
    workers = [free_port(), free_port()]
    env = {"VILASERVE_REGISTRATION_SECRET": secrets.token_urlsafe(16)}
    one_thread = {**env, "OMP_NUM_THREADS": "1"}  # as a Ray actor with one CPU gets
    address = f"http://127.0.0.1:{controller}"
    commands = [(vilaserve("controller", "--port", str(controller)), env)]
    for port in workers:
        worker = vilaserve(
            "worker", *model_flags(args), "--port", str(port), "--controller-address", address,
            "--worker-address", f"http://127.0.0.1:{port}",
        )  # fmt: skip
        commands.append((worker, one_thread))
    commands.append((vilaserve("api", "--controller-address", address, "--port", str(api)), {}))
    url = f"http://127.0.0.1:{api}"
    with children(commands, args.out.with_suffix(".log")):
        wait_ready(url, model)
        for port in workers:  # both registered: each answers its own status
            wait_until_up(f"http://127.0.0.1:{port}/health")
        time.sleep(2.0)  # their registrations reach the controller
        warm_up(url, model, len(workers))
        return {"sweep": sweep(url, model, args, "controller 2 workers")}


def wait_until_up(url: str, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    sys.exit(f"{url} did not answer within {timeout_s:g} s")


@contextmanager
def two_node_cluster() -> Iterator[str]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def plot(report: dict[str, Any], path: Path) -> None:
    configs = report["configurations"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, result in configs.items():
        points = sorted((int(c), r) for c, r in result.get("sweep", {}).items() if "tokens" in r)
        if not points:
            continue
        xs = [c for c, _ in points]
        axes[0].plot(xs, [r["aggregate_tok_s"] for _, r in points], marker="o", label=label)
        axes[1].plot(xs, [r["ttft_p50_s"] for _, r in points], marker="o", label=label)
    axes[0].set(xlabel="concurrent streams", ylabel="tok/s (all streams)", title="Throughput")
    axes[1].set(xlabel="concurrent streams", ylabel="s", title="Time to first token (p50)")
    turns = {k: v["second_turns"] for k, v in configs.items() if "second_turns" in v}
    names = list(turns)
    axes[2].bar(names, [t["turn2_ttft_p50_s"] for t in turns.values()], color=["C2", "C3"])
    axes[2].set(ylabel="s", title="Turn 2 time to first token (p50)")
    axes[2].tick_params(axis="x", labelsize=8)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["levels"], [str(c) for c in report["levels"]])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['model']} on {report['cpu'].get('Model name', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="checkpoint (default: the W4A16 demo model)")
    parser.add_argument("--precision", default="W4A16")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent streams, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--conversations", type=int, default=8, help="two-turn conversations")
    parser.add_argument("--skip-sweep", action="store_true", help="the turn-2 comparison only")
    parser.add_argument("--skip-controller", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_serve")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    if args.model_path is None:
        from vilaserve.entrypoints.offline.demo import build_demo

        args.model_path = str(build_demo("awq"))
    from vilaserve.domain.worker.naming import derive_model_name

    model = derive_model_name(args.model_path, args.precision, None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".log").write_bytes(b"")
    configurations: dict[str, Any] = {}
    with two_node_cluster() as address:
        configurations["ray, 1 replica"] = ray_configuration(address, args, model, 1, True)
        configurations["ray, 2 replicas"] = ray_configuration(address, args, model, 2, True)
        configurations["ray, 2 replicas, no cache-aware routing"] = ray_configuration(
            address, args, model, 2, False
        )
    if not args.skip_controller:
        configurations["controller, 2 workers"] = controller_configuration(args, model)
    report = {
        "model": model,
        "model_path": args.model_path,
        "tokens_per_stream": args.tokens,
        "levels": args.levels,
        "conversations": args.conversations,
        "cpu": cpu_description(),
        "configurations": configurations,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
