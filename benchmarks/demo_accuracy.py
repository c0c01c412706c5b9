"""Held-out accuracy of the embedded demo model: 16-bit vs W4A16 AWQ vs W4A16 round-to-nearest.

500 pictures the generator draws fresh for this benchmark (the evaluation split: image sizes,
background styles and background colours that training never saw; seed 7, which no training
or validation run uses), one question each, answered greedily by the product's own runtime
(`VilaRuntime` + the worker's `GenerateStream`, prompts built as the OpenAI API builds them).
An answer counts when it equals the expected one exactly (case, surrounding space and a final
period aside).

    python benchmarks/demo_accuracy.py            # --n 500 --seed 7; builds the demo if needed

Targets (issue 5): 16-bit >= 90 %, AWQ within 2 points of 16-bit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from vilaserve.adapters.offline.demo import shapes
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.application.chat.ask_image import AskAboutImages
from vilaserve.entrypoints.chat import checkpoint_precision
from vilaserve.entrypoints.offline.demo import build_demo

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"16bit": "16-bit", "awq": "W4A16 AWQ", "rtn": "W4A16 RTN"}


async def evaluate(
    asker: AskAboutImages, examples: list[shapes.DemoExample], images: list[bytes]
) -> tuple[dict[str, list[bool]], list[dict[str, str]]]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    misses: list[dict[str, str]] = []
    for example, image in zip(examples, images, strict=True):
        reply = await asker.answer(example.question, [image], max_new_tokens=16)
        hit = shapes.normalize_answer(reply) == example.answer
        by_kind[example.question_kind].append(hit)
        if not hit and len(misses) < 25:
            misses.append({"question": example.question, "expected": example.answer, "got": reply})
    return by_kind, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="held-out pictures")
    parser.add_argument("--seed", type=int, default=7, help="eval-split seed")
    parser.add_argument("--variants", default="16bit,awq,rtn")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    examples = list(shapes.examples("eval", args.seed, args.n))
    images = [e.png() for e in examples]
    results: dict[str, dict[str, object]] = {}
    for variant in args.variants.split(","):
        path = build_demo(variant)  # type: ignore[arg-type]
        options = VilaRuntimeOptions(model_path=str(path), precision=checkpoint_precision(path))
        runtime = VilaRuntime.load(options)
        asker = AskAboutImages(runtime.text_generator, runtime.vision_encoder)
        started = time.perf_counter()
        by_kind, misses = asyncio.run(evaluate(asker, examples, images))
        every = [hit for hits in by_kind.values() for hit in hits]
        results[variant] = {
            "label": LABELS[variant],
            "accuracy": sum(every) / len(every),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "questions_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "seconds": round(time.perf_counter() - started, 1),
            "misses": misses,
        }
        print(f"{LABELS[variant]:<12} {results[variant]['accuracy']:.1%}", flush=True)
        del runtime, asker

    print(f"\n{args.n} held-out pictures (eval split, seed {args.seed}), exact answers:")
    for result in results.values():
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in result["by_kind"].items())  # type: ignore[union-attr]
        print(f"  {result['label']:<12} {result['accuracy']:.1%}   ({kinds})")
    report = {
        "pictures": args.n,
        "split": "eval",
        "seed": args.seed,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, RESULTS / "demo_accuracy.png")


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for r in results.values() for k in r["by_kind"]})  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(results)
    for i, result in enumerate(results.values()):
        values = [result["by_kind"].get(k, 0.0) * 100 for k in kinds]  # type: ignore[union-attr]
        positions = [j + i * width for j in range(len(kinds) + 1)]
        label = f"{result['label']} ({result['accuracy']:.1%})"
        ax.bar(positions, [*values, float(result["accuracy"]) * 100], width, label=label)  # type: ignore[arg-type]
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(kinds) + 1)])
    ax.set_xticklabels([*kinds, "all"])
    ax.axhline(90, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact answers (%)")
    ax.set_title("Demo model, held-out pictures, by question kind")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
