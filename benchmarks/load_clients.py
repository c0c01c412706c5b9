"""Many loopback clients at once against `vilaserve serve`: nothing hangs, nothing fails.

Starts `vilaserve serve` (the W4A16 demo model unless `--model-path`), then `--clients`
concurrent clients each send `--requests` chat completions through the OpenAI-compatible API,
half with a picture, half streamed, each bounded by `--timeout` seconds. Reports how many
completed, were refused with 429, failed otherwise, or hung (no answer within the timeout), the
latency percentiles, and each process's peak RSS.

    python benchmarks/load_clients.py --clients 64

Writes benchmarks/results/load_clients.{json,png}.

    python benchmarks/load_clients.py --attacks --clients 8

Issue 23's attacks while the clients run (see attacks.py), on `vilaserve serve` with API keys (a
0600 file) and so an internal token: the clients loop over chat completions (half with a
picture, half streamed, `--max-tokens` each) for a quiet baseline, then through each attack in
turn (a control: one busy process and no request; an empty prompt, relay poison once a second
for 30 s, a 20 MB prompt, JSON expansion, 1,000 connections trickling their heads at the API for
60 s, `kill -9` of the worker), then a quiet window after. Per window: the clients' latency p50
/ p99 against the baseline (target: at most 2x), requests lost (failed or hung) and refused (503
during the worker's restart), each process's peak RSS, what the attacking client got, and the
recovery time after the kill.
Writes benchmarks/results/load_clients_attacks.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from serve_load import cpu_description, make_png_b64, percentile

RESULTS = Path(__file__).resolve().parent / "results"


def start_serve(
    model_path: str | None, api_port: int
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    command = [sys.executable, "-m", "vilaserve.entrypoints.cli", "serve", "--api-port",
               str(api_port), "--controller-port", str(api_port + 1), "--worker-port",
               str(api_port + 2)]  # fmt: skip
    if model_path is None:
        from vilaserve.entrypoints.offline.demo import build_demo

        model_path = str(build_demo("awq"))
    command += ["--model-path", model_path, "--precision", "W4A16"]
    log_path = Path(tempfile.gettempdir()) / "vilaserve-load-clients-serve.log"
    log = log_path.open("w")
    # A file, not a pipe: a pipe nobody reads fills up and stalls the servers' logging.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    pids: dict[str, int] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        text = log_path.read_text()
        pids = {
            m.group(1): int(m.group(2)) for m in re.finditer(r"started (\w+) \(pid (\d+)\)", text)
        }
        if "Chat:" in text:
            break
        time.sleep(0.5)
    return process, pids


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, i: int, timeout: float, image: str
) -> tuple[str, float]:
    content: Any = f"Client {i}: tell me a short story about a paper boat."
    if i % 2:
        content = [
            {"type": "text", "text": f"Client {i}: what is in this picture?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 64,
        "temperature": 0,
        "stream": i % 4 < 2,
    }

    async def send() -> int:
        if body["stream"]:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass
                return r.status_code
        return (await client.post(url + "/v1/chat/completions", json=body)).status_code

    started = time.perf_counter()
    try:
        status = await asyncio.wait_for(send(), timeout)
    except asyncio.TimeoutError:
        return "hung", time.perf_counter() - started
    except httpx.HTTPError:
        return "failed", time.perf_counter() - started
    outcome = "completed" if status == 200 else ("rejected_429" if status == 429 else "failed")
    return outcome, time.perf_counter() - started


async def load(url: str, clients: int, requests: int, timeout: float) -> list[tuple[str, float]]:
    image = make_png_b64(3)
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]

        async def client_loop(c: int) -> list[tuple[str, float]]:
            return [
                await one_request(client, url, model, c * requests + k, timeout, image)
                for k in range(requests)
            ]

        results = await asyncio.gather(*(client_loop(c) for c in range(clients)))
    return [r for per_client in results for r in per_client]


def attack_run(args: argparse.Namespace) -> None:
    from attacks import (
        Attack,
        Campaign,
        ServeStack,
        Users,
        chosen,
        demo_model,
        highest_peaks,
        plot_campaign,
        result_stem,
    )

    attacks = [
        # The control: no request, one process busy on the host for 2 s (the floor).
        Attack("control: a busy process on the host for 2 s, no request", "busy_process", 2),
        Attack("empty prompt under load (API and worker)", "empty_prompt", 20),
        Attack("relay poison (surrogate, NaN) once a second for 30 s", "relay_poison", 30),
        Attack("20 MB prompt (worker, /count_token + refresh, API)", "huge_prompt", 15),
        Attack("JSON expansion (64 MB worker, controller; 4 x 32 MB API)", "json_expansion", 1),
        Attack("slow headers: 1,000 connections for 60 s on the API", "slow_headers", 60),
        Attack("worker kill -9 under serve", "kill_worker"),
    ]
    with ServeStack(args.model_path or demo_model(), args.port) as stack:
        assert stack.target is not None
        report: dict[str, Any] = {
            "cpu": cpu_description(),
            "clients": args.clients,
            "max_tokens": args.max_tokens,
            "serve_started_s": round(stack.started_s, 1),
            "internal_token_in_children": stack.token_in_children(),
        }
        users = Users(stack.target, args.clients, mix=True, max_tokens=args.max_tokens,
                      timeout_s=args.timeout)  # fmt: skip
        report["attacker_nice"] = args.attacker_nice
        campaign = Campaign(stack, users, baseline_s=30, gap_s=5, after_s=20,
                            attacker_nice=args.attacker_nice)  # fmt: skip
        report["windows"] = campaign.run(
            chosen(attacks, args.only), say=lambda m: print(m, flush=True)
        )
        report["serve_said"] = stack.serve_lines()
        report["peak_rss_mb_any_window"] = highest_peaks(report["windows"])
    RESULTS.mkdir(exist_ok=True)
    stem = result_stem("load_clients_attacks", args.attacker_nice)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"load_clients.py --attacks: {args.clients} clients during each attack"
    if args.attacker_nice:
        title += f" (attacker at nice {args.attacker_nice})"
    plot_campaign(report["windows"], title, RESULTS / f"{stem}.png")
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the W4A16 demo model")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="per client, one after another")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request (s)")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--attacks", action="store_true", help="issue 23's attacks meanwhile")
    parser.add_argument("--max-tokens", type=int, default=32, help="--attacks: per request")
    from attacks import add_campaign_options

    add_campaign_options(parser)
    args = parser.parse_args()
    if args.attacks:
        attack_run(args)
        return
    process, pids = start_serve(args.model_path, args.port)
    try:
        started = time.perf_counter()
        results = asyncio.run(
            load(f"http://127.0.0.1:{args.port}", args.clients, args.requests, args.timeout)
        )
        wall = time.perf_counter() - started
        rss = {name: round(peak_rss_mb(pid)) for name, pid in pids.items()}
    finally:
        process.terminate()
        process.wait(60)
    counts = {k: sum(1 for o, _ in results if o == k)
              for k in ("completed", "rejected_429", "failed", "hung")}  # fmt: skip
    latencies = sorted(s for o, s in results if o == "completed")
    report = {
        "cpu": cpu_description(),
        "clients": args.clients,
        "requests": len(results),
        "wall_s": round(wall, 1),
        **counts,
        "latency_s": {
            q: round(percentile(latencies, p), 2)
            for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "peak_rss_mb": rss,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_clients.json").write_text(json.dumps(report, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(latencies, bins=30)
    ax.set(xlabel="request latency (s)", ylabel="requests",
           title=f"{args.clients} clients: {counts}")  # fmt: skip
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(RESULTS / "load_clients.png", dpi=110)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
