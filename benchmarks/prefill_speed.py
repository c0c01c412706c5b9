"""Prefill speed at the VILA1.5-3B LLM shape (2.7B Llama, W4A16 g128) against llama.cpp, on
every CPU path this machine runs, beside the bound the machine's GEMM peak sets.

Ours: the random-weight VILA1.5-3B-shaped checkpoint loaded as the worker loads it
(`VilaRuntime`, W4A16, q/k/v and gate/up fused, int8 token table), one prompt of N tokens in
one forward (the engine's default step budget is 2,048 positions), time to the first token's
logits, best of `--repeats`, in a child process per path (`VILASERVE_CPU_PATH`).
llama.cpp: `llama-bench -p N` on the same-shape Q4_0 GGUF, same threads, in the same run.
The bound: multiply-adds per prompt token (weights, plus attention over the prompt) over the
GEMM peak measured here: our W4A8 GEMM at 512 rows (int8 products) and PyTorch's fp32 GEMM.

    python benchmarks/prefill_speed.py --threads 2 \\
        --llama-bench ~/.cache/vilaserve/llama.cpp/llama-bench \\
        --gguf ~/.cache/vilaserve/bench/vila15-3b-random-q4_0.gguf

Writes benchmarks/results/prefill_speed.{json,png}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (16, 64, 256, 1024, 2048)
# PyTorch's own kernels (the torch path) take minutes per long prompt on a CPU without bf16.
TORCH_MAX_LENGTH = 256


def child(args: argparse.Namespace, lengths: list[int]) -> None:
    """Runs in the child: loads the checkpoint on this process's path and, length by length,
    times our prefill and llama-bench's back to back (alternating which goes first), so each
    ratio compares two runs a few seconds apart. Prints one JSON line."""
    import torch

    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions

    options = VilaRuntimeOptions(
        model_path=args.model, precision="W4A16", adaptive_threads=False, kv_slots=1
    )
    runtime = VilaRuntime.load(options)
    runner = runtime.model_runner
    model = runner.model

    def ours_tok_s(length: int) -> float:
        ids = torch.randint(3, model.args.vocab_size, (1, length))
        best = float("inf")
        for _ in range(args.repeats):
            with torch.inference_mode():
                started = time.perf_counter()
                model(runner.cache.row(0), 0, input_ids=ids)
                best = min(best, time.perf_counter() - started)
        return length / best

    def theirs_tok_s(length: int) -> float | None:
        if not (args.llama_bench and args.gguf):
            return None
        return float(
            llama_bench(args.llama_bench, args.gguf, args.threads, [length], 1)["tok_s"][
                str(length)
            ]
        )

    def on_model_thread() -> dict[str, Any]:
        ours_tok_s(16)  # warm-up: kernel builds, first-touch of buffers
        pairs: dict[str, list[tuple[float, float | None]]] = {}
        for length in lengths:
            for index in range(args.rounds):
                if index % 2 == 0:
                    mine = ours_tok_s(length)
                    theirs = theirs_tok_s(length)
                else:
                    theirs = theirs_tok_s(length)
                    mine = ours_tok_s(length)
                pairs.setdefault(str(length), []).append((mine, theirs))
            print(length, pairs[str(length)], file=sys.stderr, flush=True)
        return pairs

    pairs = runtime.executor.call(on_model_thread)
    print(
        json.dumps(
            {"path": runner.compute_path, "threads": torch.get_num_threads(), "pairs": pairs}
        )
    )
    runtime.executor.shutdown()


def ours(path: str, lengths: list[int], args: argparse.Namespace) -> Any:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if path != "auto":
        env["VILASERVE_CPU_PATH"] = path
    command = [sys.executable, __file__, "--child", "--model", args.model,
               "--lengths", ",".join(map(str, lengths)), "--repeats", str(args.repeats),
               "--rounds", str(args.rounds), "--threads", str(args.threads)]  # fmt: skip
    if args.llama_bench and args.gguf:
        command += ["--llama-bench", args.llama_bench, "--gguf", args.gguf]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def llama_bench(
    binary: str, gguf: str, threads: int, lengths: list[int], repeats: int = 2
) -> dict[str, Any]:
    command = [binary, "-m", gguf, "-t", str(threads), "-p", ",".join(map(str, lengths)),
               "-n", "0", "-r", str(repeats)]  # fmt: skip
    result = subprocess.run([*command, "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    return {
        "command": " ".join(command),
        "build_commit": rows[0].get("build_commit"),
        "tok_s": {str(r["n_prompt"]): r["avg_ts"] for r in rows if r["n_gen"] == 0},
    }


def write_report(report: dict[str, Any], out: Path, plot: Any) -> None:
    """`out`.json holds the figures, `out`.png their plot (`plot(report, path)`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def best_seconds(fn: Any, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls, after one untimed call (builds, first touch)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def gemm_peaks(threads: int) -> dict[str, float]:
    """GMAC/s of the two GEMMs a prefill can run on here, at a size where they are at speed."""
    import torch

    from vilaserve.adapters.worker import cpu_kernels
    from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
    from vilaserve.adapters.worker.cpu_kernels import packing

    torch.set_num_threads(threads)
    best = best_seconds

    n = k = 2560
    m = 512
    peaks: dict[str, float] = {}
    a, b = torch.randn(m, k), torch.randn(k, n)
    peaks["fp32_gemm_gmac_s"] = m * n * k / best(lambda: torch.mm(a, b)) / 1e9
    kernels = cpu_kernels.fp32_kernels()
    if kernels is not None and kernels.has_gemm:
        w = QuantizedWeight(
            torch.randint(0, 16, (n, k), dtype=torch.uint8),
            torch.rand(n, k // 128) * 0.01,
            torch.randint(0, 16, (n, k // 128), dtype=torch.uint8),
            128,
            None,
        )
        packed = packing.pack_for_kernel(w)
        out = torch.empty(m, n)
        seconds = best(lambda: kernels.gemm(a, packed, n, 128, out))
        peaks["w4a8_gemm_gmac_s"] = m * n * k / seconds / 1e9
    return peaks


def macs_per_token(config: dict[str, Any], length: int) -> float:
    """Multiply-adds per prompt token: every decoder weight once, attention over the causal
    prompt (half of it on average) for scores and values; the head runs for one token only."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = hidden // heads
    weights = hidden * (hidden + 2 * kv_heads * head_dim) + hidden * hidden + 3 * hidden * inter
    attention = 2 * heads * head_dim * (length + 1) / 2
    return float(layers * (weights + attention))


def cpu_description() -> dict[str, str]:
    info: dict[str, str] = {}
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)"):
            info[key.strip()] = value.strip()
        if key.strip() == "Flags":
            info["simd"] = " ".join(
                f for f in value.split() if f.startswith(("avx", "fma", "f16c"))
            )
    return info


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    theirs = report.get("llama_cpp", {}).get("tok_s", {})
    for name, row in report["paths"].items():
        lengths = sorted(int(n) for n in row["tok_s"])
        left.plot(lengths, [row["tok_s"][str(n)] for n in lengths], "o-", label=f"vilaserve {name}")
        ratios = row.get("over_llama_cpp") or {}
        if ratios:
            shared = sorted(int(n) for n in ratios)
            right.plot(shared, [ratios[str(n)] for n in shared], "o-", label=name)
    if theirs:
        lengths = sorted(int(n) for n in theirs)
        left.plot(lengths, [theirs[str(n)] for n in lengths], "s--", label="llama.cpp Q4_0")
        right.axhline(1.5, color="grey", linestyle=":", label="target 1.5x")
    for name, bound in report["bound_tok_s"].items():
        lengths = sorted(int(n) for n in bound)
        left.plot(lengths, [bound[str(n)] for n in lengths], ":", label=f"bound ({name})")
    left.set(xscale="log", xlabel="prompt tokens", ylabel="prefill tok/s", title="prefill, 2.7B")
    right.set(xscale="log", xlabel="prompt tokens", ylabel="vilaserve / llama.cpp",
              title="against llama-bench -p")  # fmt: skip
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(f"{report['cpu'].get('Model name', '?')}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="VILA1.5-3B-shaped W4A16 checkpoint")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=1, help="our runs per pair (best)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs per length (ours, theirs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--paths", default=None, help="comma-separated (default: all here)")
    parser.add_argument("--llama-bench", default=None)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--out", default=str(RESULTS / "prefill_speed"))
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.child:
        child(args, lengths)
        return
    model = args.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve_load import shaped_checkpoints

        model, gguf = shaped_checkpoints()
        args.model, args.gguf = model, args.gguf or str(gguf)
    config = json.loads((Path(model) / "llm" / "config.json").read_text())
    from tqdm import tqdm

    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "threads": args.threads,
        "model": model,
        "lengths": lengths,
        "paths": {},
    }
    from serving_overhead import runnable_paths

    paths = args.paths.split(",") if args.paths else runnable_paths()
    # The machine's speed drifts by tens of percent over minutes (a shared host): each length
    # is timed as pairs (ours, llama-bench) a few seconds apart, alternating which goes first;
    # the figures are the medians over the pairs, the ratio the median of the pairs' ratios.
    for path in tqdm(paths, desc="vilaserve paths"):
        wanted = [n for n in lengths if path != "torch" or n <= TORCH_MAX_LENGTH]
        result = ours(path, wanted, args)
        name = path if path != "auto" else f"auto ({result['path']})"
        row: dict[str, Any] = {"pairs": result["pairs"], "tok_s": {}, "over_llama_cpp": {}}
        theirs_median: dict[str, float] = {}
        for n, pairs in result["pairs"].items():
            row["tok_s"][n] = statistics.median(mine for mine, _ in pairs)
            if all(theirs is not None for _, theirs in pairs):
                row["over_llama_cpp"][n] = statistics.median(
                    mine / theirs for mine, theirs in pairs
                )
                theirs_median[n] = statistics.median(theirs for _, theirs in pairs)
        report["paths"][name] = row
        if theirs_median and (path == "auto" or "llama_cpp" not in report):
            report["llama_cpp"] = {"build_commit": "see llama-bench", "tok_s": theirs_median}
        print(name, {n: round(v, 1) for n, v in row["tok_s"].items()},
              {n: round(v, 2) for n, v in row["over_llama_cpp"].items()})  # fmt: skip
    report["gemm_peaks"] = peaks = gemm_peaks(args.threads)
    report["bound_tok_s"] = {
        name.removesuffix("_gmac_s"): {
            str(n): gmac * 1e9 / macs_per_token(config, n) for n in lengths
        }
        for name, gmac in peaks.items()
    }
    print("GEMM peaks (GMAC/s):", {k: round(v, 1) for k, v in peaks.items()})
    write_report(report, Path(args.out), plot)


if __name__ == "__main__":
    main()
