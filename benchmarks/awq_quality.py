"""AWQ quality on a real model: WikiText-2 perplexity of SmolLM2-135M-Instruct.

Four models, one convention (see perplexity.py): the fp16 weights, round-to-nearest W4, AWQ W4
with llm-awq's search (`--recipe llm-awq`) and with ours (`--recipe vilaserve`, the default), all
at the same group size. The 4-bit models are made by `vilaserve quantize` (the product's own
path) and loaded back through its AWQ loader, with the reference dequantize kernel in fp32 so
that the figures measure the weights, not kernel rounding.
Calibration: Tiny Shakespeare (never the evaluation text).

    python benchmarks/awq_quality.py --windows 40 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perplexity import default_corpus, wikitext2_perplexity

from vilaserve.adapters.offline.gguf_import import ensure_smollm2_hf
from vilaserve.adapters.worker.awq.loading import load_awq_llm
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.runtime import load_llm
from vilaserve.adapters.worker.torch_vila.tokenization import load_tokenizer
from vilaserve.entrypoints.offline.quantize import quantize_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def forward_of(model: Llama):  # type: ignore[no-untyped-def]
    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(model.new_cache(1, ids.shape[1]), 0, input_ids=ids, last_only=False)

    return forward


def quantized(hf_dir: Path, out: Path, args: argparse.Namespace, recipe: str | None) -> Llama:
    """`recipe` None: round-to-nearest."""
    options = argparse.Namespace(
        model_path=str(hf_dir),
        output=str(out),
        w_bit=4,
        group_size=args.group_size,
        calib=str(args.calib),
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        no_search=recipe is None,
        recipe=recipe or "vilaserve",
        export_tinychat=False,
        device="cpu",
        seed=0,
    )
    quantize_checkpoint(options)
    checkpoint = VilaCheckpoint.open(out)
    return load_awq_llm(checkpoint, None, torch.float32, torch.device("cpu"), "dequant")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    corpora = default_corpus().parent
    parser.add_argument("--calib", type=Path, default=corpora / "tinyshakespeare.txt")
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    args = parser.parse_args()
    if not args.corpus.is_file():
        raise SystemExit(f"evaluation text not found: {args.corpus} (set VILASERVE_SHARED)")
    text = args.corpus.read_text()
    hf_dir = ensure_smollm2_hf()
    tokenizer = load_tokenizer(hf_dir)
    figures: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        builders = {
            "fp16": lambda: load_llm(
                VilaCheckpoint.open(hf_dir), torch.float32, torch.device("cpu")
            ),
            f"RTN W4 g{args.group_size}": lambda: quantized(hf_dir, Path(tmp) / "rtn", args, None),
            f"AWQ W4 g{args.group_size} (llm-awq)": lambda: quantized(
                hf_dir, Path(tmp) / "llm-awq", args, "llm-awq"
            ),
            f"AWQ W4 g{args.group_size} (vilaserve)": lambda: quantized(
                hf_dir, Path(tmp) / "vilaserve", args, "vilaserve"
            ),
        }
        for name, build in builders.items():
            started = time.perf_counter()
            model = build()
            built = time.perf_counter()
            figures[name] = wikitext2_perplexity(
                forward_of(model), tokenizer, text, args.window, args.windows
            )
            seconds[name] = round(built - started, 1)
            print(f"{name}: perplexity {figures[name]:.4f} (built in {seconds[name]} s)")
    fp, rtn = list(figures.values())[:2]
    closed = {
        name: (rtn - value) / (rtn - fp) if rtn != fp else float("nan")
        for name, value in list(figures.items())[2:]
    }
    print(f"\nWikiText-2 test, {args.windows} windows x {args.window} tokens, SmolLM2-135M")
    print(f"{'model':<28}{'perplexity':>12}{'gap closed':>12}")
    for name, value in figures.items():
        share = f"{closed[name]:.1%}" if name in closed else ""
        print(f"{name:<28}{value:>12.4f}{share:>12}")
    print("gap closed: share of RTN's perplexity gap to fp16 that AWQ removes (target >= 50%)")
    RESULTS.mkdir(exist_ok=True)
    report = {
        "perplexity": figures,
        "gap_closed": closed,
        "calibration": {
            "file": args.calib.name,
            "n_samples": args.n_samples,
            "seqlen": args.seqlen,
        },
        "build_seconds": seconds,
        "windows": args.windows,
        "window": args.window,
        "group_size": args.group_size,
    }
    (RESULTS / "awq_quality.json").write_text(json.dumps(report, indent=2))
    plot(figures, closed, RESULTS / "awq_quality.png")


def plot(figures: dict[str, float], closed: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    colours = ["#4c72b0", "#dd8452", "#8c8c8c", "#55a868"]
    labels = [name.replace(" (", "\n(") for name in figures]
    bars = ax.bar(labels, list(figures.values()), color=colours[: len(figures)])
    ax.bar_label(
        bars,
        labels=[
            f"{value:.3f}" + (f"\n{closed[name]:.1%} closed" if name in closed else "")
            for name, value in figures.items()
        ],
    )
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_title("SmolLM2-135M, W4: share of RTN's gap to fp16 that AWQ closes")
    low = min(figures.values())
    ax.set_ylim(low * 0.95, max(figures.values()) * 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
