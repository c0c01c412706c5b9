"""The vision tower in W8A8 against the 16-bit (here fp32) tower: time per picture and accuracy.

* time: the VILA1.5-3B-shaped tower (SigLIP-so400m, 384 px, random weights) on one 384 px tile
  and on S2's 384 + 768 (5 tiles), fp32 against `--quantize-vision-tower w8a8`, best of
  `--repeats`;
* accuracy: cosine similarity and relative error of the projected features (what the LLM
  reads) of the W8A8 tower against the fp32 one, on real photographs (matplotlib's sample
  pictures, never used for calibration), without and with SmoothQuant's smoothing calibrated
  on other pictures (the demo's training drawings): for the 3B-shaped tower (random weights:
  arithmetic only) and for the demo model's trained tower (also on 200 of its held-out
  pictures). The demo's answer accuracy with the W8A8 tower: `demo_accuracy.py --variants
  awq,awq-w8a8`.

    python benchmarks/tower_w8a8.py --threads 2

Writes benchmarks/results/tower_w8a8.{json,png}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_PICTURES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def photographs() -> list[bytes]:
    import matplotlib
    from PIL import Image

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    out = []
    for name in SAMPLE_PICTURES:
        image = Image.open(folder / name).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def calibration_pictures(count: int) -> list[bytes]:
    from vilaserve.adapters.offline.demo import shapes

    return [e.png() for e in shapes.examples("train", 11, count)]


def load_pipeline(model: str) -> Any:
    from vilaserve.adapters.worker.torch_vila.layout import detect_layout
    from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline

    layout = detect_layout(model, vision_tower=None)
    assert layout.vision is not None
    hidden = int(layout.checkpoint.llm_config["hidden_size"])
    return VisionPipeline.from_layout(layout.vision, hidden, torch.float32, "cpu")


def features(pipeline: Any, pictures: list[bytes]) -> list[torch.Tensor]:
    from vilaserve.adapters.worker.torch_vila.image_processing import decode_image

    with torch.inference_mode():
        return [
            pipeline.encode_prepared([pipeline.prepare(decode_image(p, 10**8), True)])[0]
            for p in pictures
        ]


def quantized(pipeline: Any, factors: dict[str, torch.Tensor] | None) -> Any:
    from vilaserve.adapters.worker.torch_vila.vision_w8a8 import quantize_vision_tower

    copied = copy.deepcopy(pipeline)
    quantize_vision_tower(copied.tower, factors)
    return copied


def agreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    cosines = [
        float(torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0))
        for g, w in zip(got, want, strict=True)
    ]
    errors = [
        float((g - w).norm() / w.norm().clamp(min=1e-12)) for g, w in zip(got, want, strict=True)
    ]
    return {
        "cosine_min": min(cosines),
        "cosine_mean": sum(cosines) / len(cosines),
        "relative_error_mean": sum(errors) / len(errors),
    }


def accuracy(model: str, evaluation: dict[str, list[bytes]], calibration: int) -> dict[str, Any]:
    from vilaserve.adapters.offline.vision_smoothing import activation_maxima, smoothing_factors

    pipeline = load_pipeline(model)
    factors = smoothing_factors(
        pipeline, activation_maxima(pipeline, calibration_pictures(calibration))
    )
    out: dict[str, Any] = {}
    for name, pictures in evaluation.items():
        want = features(pipeline, pictures)
        out[name] = {
            "pictures": len(pictures),
            "w8a8": agreement(features(quantized(pipeline, None), pictures), want),
            "w8a8_smoothed": agreement(features(quantized(pipeline, factors), pictures), want),
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def tower_seconds(model: str, repeats: int) -> dict[str, Any]:
    from vilaserve.adapters.offline.vision_smoothing import activation_maxima, smoothing_factors

    pipeline = load_pipeline(model)
    factors = smoothing_factors(pipeline, activation_maxima(pipeline, calibration_pictures(4)))
    side = int(pipeline.tower.image_size)
    out: dict[str, Any] = {}
    for name, subject in (("fp32", pipeline), ("w8a8", quantized(pipeline, factors))):
        for tiles, label in ((1, f"{side}px"), (5, f"S2 {side}+{2 * side}px")):
            pixels = torch.randn(tiles, 3, side, side)
            best = float("inf")
            with torch.inference_mode():
                subject.tower(pixels[:1])  # warm-up
                for _ in range(repeats):
                    started = time.perf_counter()
                    subject.tower(pixels)
                    best = min(best, time.perf_counter() - started)
            out.setdefault(label, {})[name] = best
            print(f"tower {name:5} {label:16} {best:6.2f} s", flush=True)
    for times in out.values():
        times["speedup"] = times["fp32"] / times["w8a8"]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(report["tower_seconds"])
    for offset, name in ((-0.2, "fp32"), (0.2, "w8a8")):
        heights = [report["tower_seconds"][lab][name] for lab in labels]
        left.bar([i + offset for i in range(len(labels))], heights, 0.4, label=name)
    left.set_xticks(range(len(labels)), labels)
    left.set(ylabel="seconds per picture", title="VILA1.5-3B tower (SigLIP-so400m)")
    left.legend()
    rows = [(f"{model}\n{sub}", v) for model, subs in report["accuracy"].items()
            for sub, v in subs.items()]  # fmt: skip
    for offset, variant in ((-0.2, "w8a8"), (0.2, "w8a8_smoothed")):
        right.bar([i + offset for i in range(len(rows))],
                  [1 - v[variant]["cosine_min"] for _, v in rows], 0.4, label=variant)  # fmt: skip
    right.set_xticks(range(len(rows)), [r for r, _ in rows], fontsize=7)
    right.set(yscale="log", ylabel="1 - min cosine (projected features)", title="accuracy")
    right.legend()
    fig.suptitle(f"{report['cpu'].get('Model name', '?')}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--heldout", type=int, default=200, help="demo held-out pictures")
    parser.add_argument("--out", default=str(RESULTS / "tower_w8a8"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefill_speed import cpu_description, write_report
    from serve_load import shaped_checkpoints

    from vilaserve.adapters.offline.demo import shapes
    from vilaserve.entrypoints.offline.demo import build_demo

    shaped, _ = shaped_checkpoints()
    demo = str(build_demo("16bit"))
    photos = photographs()
    heldout = [e.png() for e in shapes.examples("eval", 7, args.heldout)]
    report: dict[str, Any] = {"cpu": cpu_description(), "threads": args.threads}
    report["tower_seconds"] = tower_seconds(shaped, args.repeats)
    report["accuracy"] = {
        "VILA1.5-3B shape (random weights)": accuracy(shaped, {"photographs": photos}, 16),
        "demo model (trained)": accuracy(
            demo, {"photographs": photos, "held-out drawings": heldout}, 64
        ),
    }
    write_report(report, Path(args.out), plot)


if __name__ == "__main__":
    main()
