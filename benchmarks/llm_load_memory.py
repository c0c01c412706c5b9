"""Peak memory of loading a 16-bit LLM: streamed tensor by tensor vs a whole state dict first.

Issue 17 asks that a large model (VILA1.5-40b's 34B LLM, InternViT-6B) loads without holding
two copies of its weights. This writes a random bf16 Llama of `--gigabytes` (sharded like the
releases), then loads it in a fresh subprocess per run, each way:

- `streamed`: what the worker does (`llm_loading.load_llm_weights`: one tensor read, copied
  into the model, dropped);
- `state dict`: what it did before (`checkpoint.load_state_dict`: every shard into one dict,
  then `load_hf_state_dict`).

and records the process's peak resident memory (`VmHWM`: this process image's own peak; Linux
carries `ru_maxrss` over from the parent across exec) and the load time, relative to the
weights' size. Writes benchmarks/results/llm_load_memory.{json,png}.

    python benchmarks/llm_load_memory.py --gigabytes 1 --runs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("streamed", "state dict")


def write_checkpoint(directory: Path, gigabytes: float) -> int:
    """A random Llama whose bf16 weights take about `gigabytes`; returns their bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((gigabytes * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="500MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def load_once(way: str, directory: Path) -> dict[str, float]:
    """Runs in the subprocess: load `directory` one `way`, report peak RSS and seconds."""
    import torch

    from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint, load_state_dict
    from vilaserve.adapters.worker.torch_vila.llama import Llama
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
    from vilaserve.adapters.worker.torch_vila.llm_loading import load_llm_weights

    checkpoint = VilaCheckpoint.open(directory)
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    model = Llama.empty(LlamaArgs.from_hf_config(checkpoint.llm_config), torch.bfloat16, "cpu")
    if way == "streamed":
        load_llm_weights(model, directory, show_progress=False)
    else:
        state = load_state_dict(directory, show_progress=False)
        model.load_hf_state_dict(state)
        del state
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    return {"peak_rss_mb": peak / 1024, "baseline_rss_mb": before / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of the bf16 weights")
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per way")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_once(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "llm"
        weights = write_checkpoint(directory, args.gigabytes)
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for _ in range(args.runs):
            for way in WAYS:  # alternating: a busy machine slows both alike
                out = subprocess.run(
                    [sys.executable, __file__, "--child", way, str(directory)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs[way].append(json.loads(out.strip().splitlines()[-1]))
    weights_mb = weights / 2**20
    summary = {
        way: {
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "peak_over_weights": max(r["peak_rss_mb"] for r in rs) / weights_mb,
            "added_over_weights": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in rs)
            / weights_mb,
            "seconds": min(r["seconds"] for r in rs),
        }
        for way, rs in runs.items()
    }
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/llm_load_memory.py", *sys.argv[1:]]),
        "cpu": platform.processor() or platform.machine(),
        "weights_mb": round(weights_mb, 1),
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llm_load_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bars = [summary[way]["added_over_weights"] for way in WAYS]
    axis.bar(WAYS, bars, color=["tab:green", "tab:gray"])
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="one copy of the weights")
    axis.set_ylabel("memory added by the load / weights")
    axis.set_title(f"Loading a {weights_mb / 1024:.1f} GiB bf16 LLM: peak resident memory")
    for index, value in enumerate(bars):
        axis.text(index, value, f"{value:.2f}x", ha="center", va="bottom")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(RESULTS / "llm_load_memory.png", dpi=120)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
