"""One engine decode step at batch sizes 1-16, in-process: what continuous batching can gain
on this machine's CPU path, for SmolLM2-135M's shape and the 2.7B VILA1.5-3B LLM shape.

Random weights (speed does not depend on their values), W4A16 as the worker loads it
(cpu_paths.w4a16_model). Each row sits at its own position (`Llama.decode_rows`, rows at
`--context` + 7 * row) of its own KV-cache row; the step runs on a thread of its own, as in the
worker (the model thread).

    python benchmarks/batched_decode.py [--skip-3b]

Writes benchmarks/results/batched_decode.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from cpu_paths import w4a16_model
from serve_load import cpu_description

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.device import resolve_dtype

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 2, 4, 8, 16)


def step_seconds(model: Any, batch: int, context: int, rounds: int) -> float:
    cache = model.new_cache(batch, context + 8 * batch + rounds + 2)
    rows = torch.arange(batch)
    positions = torch.tensor([context + 7 * r for r in range(batch)])
    tokens = torch.randint(0, 1000, (batch,))
    with torch.inference_mode():
        for r in range(batch):  # fill each row's cache up to its position
            model(cache.row(r), 0, input_ids=torch.randint(0, 1000, (1, int(positions[r]))))
        model.decode_rows(cache, rows, positions, tokens)
        started = time.perf_counter()
        for i in range(rounds):
            model.decode_rows(cache, rows, positions + 1 + i, tokens)
        return (time.perf_counter() - started) / rounds


def measure(size: str, context: int, rounds: int) -> dict[str, Any]:
    dtype = resolve_dtype("auto", torch.device("cpu"))
    model = w4a16_model(size, dtype)
    out: dict[str, Any] = {}
    for batch in BATCHES:
        seconds = step_seconds(model, batch, context, rounds)
        out[str(batch)] = {"step_ms": round(seconds * 1e3, 2), "tok_s": round(batch / seconds, 1)}
        print(f"{size} B={batch}: {out[str(batch)]}", flush=True)
    one = out["1"]["tok_s"]
    for batch in BATCHES:
        out[str(batch)]["x_single"] = round(out[str(batch)]["tok_s"] / one, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rounds-3b", type=int, default=4)
    parser.add_argument("--skip-3b", action="store_true")
    args = parser.parse_args()
    thread = ThreadPoolExecutor(1)  # the worker's model thread (see executor.py)
    report: dict[str, Any] = {"cpu": cpu_description(), "cpu_path": cpu_kernels.cpu_path()}
    report["small"] = thread.submit(measure, "small", args.context, args.rounds).result()
    if not args.skip_3b:
        report["3b"] = thread.submit(measure, "3b", args.context, args.rounds_3b).result()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batched_decode.json").write_text(json.dumps(report, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in ("small", "3b"):
        if size in report:
            ax.plot(BATCHES, [report[size][str(b)]["x_single"] for b in BATCHES], "o-",
                    label=f"{size} ({report[size]['1']['tok_s']} tok/s alone)")  # fmt: skip
    ax.plot(BATCHES, [min(b, 3) for b in BATCHES], ":", color="grey", label="3x target")
    ax.set(xlabel="rows per step", ylabel="aggregate tok/s / single stream", xscale="log")
    ax.set_title(f"{report['cpu'].get('Model name', '')} · {report['cpu_path']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "batched_decode.png", dpi=110)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
