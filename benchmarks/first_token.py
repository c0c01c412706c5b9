"""Time to first token on a picture at the VILA1.5-3B shape, part by part, before and after the
prefill GEMM and the W8A8 vision tower, beside the bound the machine's GEMM peaks set.

One 640x480 JPEG (matplotlib's sample photo, resized) and a 20-token question, one stream, the
random-weight VILA1.5-3B-shaped W4A16 checkpoint (SigLIP-so400m at 384 px, mlp_downsample, the
2.7B Llama) loaded as the worker loads it. Each configuration runs in its own process; the
parts are the worker's own (`ImageTimings` from the vision encoder, then the prefill forward
and the first sample, as the engine's step runs them):

* ``before``: the 16-bit-activation prefill (`keep_16_bit_prefill`) and the fp32 tower;
* ``prefill_gemm``: the W4A8 prefill GEMM, fp32 tower (the default now);
* ``w8a8_tower``: the W4A8 prefill GEMM and `--quantize-vision-tower w8a8`.

The bound: the multiply-adds of tower, projector and prefill, each over the peak of the GEMM
it can run on here (int8: our W4A8 GEMM at 512 rows; fp32: PyTorch's GEMM), from
prefill_speed.py's measurement.

    python benchmarks/first_token.py --threads 2

Writes benchmarks/results/first_token.{json,png}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("before", "prefill_gemm", "w8a8_tower")
QUESTION = (
    "Describe in detail what the person in this photograph is wearing and what the "
    "background shows."
)


def picture() -> bytes:
    import matplotlib
    from PIL import Image

    sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(sample).convert("RGB").resize((640, 480))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def child(config: str, model_path: str, repeats: int) -> None:

    from vilaserve.adapters.worker.awq.qlinear import keep_16_bit_prefill
    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
    from vilaserve.domain.shared.generation import SamplingParams

    options = VilaRuntimeOptions(
        model_path=model_path,
        precision="W4A16",
        adaptive_threads=False,
        kv_slots=1,
        image_cache_mb=0,
        vision_quantization="w8a8" if config == "w8a8_tower" else "none",
    )
    runtime = VilaRuntime.load(options)
    runner, encoder = runtime.model_runner, runtime.vision_encoder
    assert encoder is not None
    model = runner.model
    if config == "before":
        keep_16_bit_prefill(model)
    template = runner.conversation_template
    user, assistant = template.roles
    prompt = template.render([(user, f"<image>\n{QUESTION}"), (assistant, None)])
    jpeg = picture()
    rows = []
    for _ in range(repeats):
        started = time.perf_counter()
        features = asyncio.run(encoder.encode([jpeg]))
        encoded = time.perf_counter()
        prepared = runner.prepare(prompt, features, SamplingParams(max_new_tokens=1))
        length = len(prepared.keys)

        prefill_s, sample_s = runtime.executor.call(
            prefill_and_sample, model, runner.cache.row(0), prepared, length
        )
        timings = features.timings
        rows.append(
            {
                "ttft_s": time.perf_counter() - started,
                "image_decode_s": timings.decode_s,
                "vision_tower_s": timings.tower_s,
                "projector_s": timings.projector_s,
                "encode_wall_s": encoded - started,
                "prefill_s": prefill_s,
                "first_sample_s": sample_s,
                "prompt_positions": length,
            }
        )
    best = min(rows, key=lambda r: r["ttft_s"])
    print(json.dumps({"config": config, "path": runner.compute_path, "best": best, "runs": rows}))
    runtime.executor.shutdown()


def prefill_and_sample(model: Any, cache_row: Any, prepared: Any, length: int) -> Any:
    """The engine's step for a whole prompt: the forward, then the greedy pick (seconds each)."""
    import torch

    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(cache_row, 0, inputs_embeds=prepared.embeddings(model, 0, length))
        forwarded = time.perf_counter()
        logits[:, -1].argmax(dim=-1).tolist()
        return forwarded - started, time.perf_counter() - forwarded


def run_config(config: str, model: str, repeats: int, threads: int) -> Any:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, __file__, "--child", config, "--model", model,
               "--repeats", str(repeats)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{config} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def tower_macs(config: dict[str, Any]) -> float:
    """SigLIP/CLIP encoder multiply-adds for one 384 px picture (all layers, scores and values
    included; VILA takes the second-to-last layer, so one layer fewer runs)."""
    width, inter = config["hidden_size"], config["intermediate_size"]
    layers = config["num_hidden_layers"] - 1
    tokens = (config["image_size"] // config["patch_size"]) ** 2
    return float(layers * tokens * (4 * width * width + 2 * width * inter + 2 * tokens * width))


def projector_macs(positions: int, llm_hidden: int, tower_width: int) -> float:
    """mlp_downsample: 2x2 neighbours concatenated (4 x width) -> hidden -> hidden."""
    return float(positions * (4 * tower_width * llm_hidden + llm_hidden * llm_hidden))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=str(RESULTS / "first_token"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.repeats)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefill_speed import cpu_description, gemm_peaks, macs_per_token, write_report
    from tqdm import tqdm

    model = args.model
    if model is None:
        from serve_load import shaped_checkpoints

        model, _ = shaped_checkpoints()
    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "threads": args.threads,
        "model": model,
        "question": QUESTION,
        "configs": {},
    }
    for config in tqdm(args.configs.split(","), desc="configurations"):
        result = run_config(config, model, args.repeats, args.threads)
        report["configs"][config] = result
        best = result["best"]
        parts = {k: round(v, 2) for k, v in best.items() if k.endswith("_s")}
        print(f"{config:13} ({result['path']}): {parts}, {best['prompt_positions']} positions")
    positions = next(iter(report["configs"].values()))["best"]["prompt_positions"]
    root = Path(model)
    llm = json.loads((root / "llm" / "config.json").read_text())
    tower = json.loads((root / "vision_tower" / "config.json").read_text())
    tower = tower.get("vision_config", tower)
    image_positions = 196  # VILA1.5-3B: 27 x 27 patches, 2 x 2 downsampled (rounded up)
    macs = {
        "vision_tower": tower_macs(tower),
        "projector": projector_macs(image_positions, llm["hidden_size"], tower["hidden_size"]),
        "prefill": positions * macs_per_token(llm, positions),
    }
    peaks = gemm_peaks(args.threads)
    fp32 = peaks["fp32_gemm_gmac_s"] * 1e9
    int8 = peaks.get("w4a8_gemm_gmac_s", peaks["fp32_gemm_gmac_s"]) * 1e9
    report["macs"] = macs
    report["gemm_peaks"] = peaks
    report["bound_s"] = {
        "fp32_everywhere": sum(macs.values()) / fp32,
        "int8_tower_and_prefill": (macs["vision_tower"] + macs["prefill"]) / int8
        + macs["projector"] / fp32,
    }
    print("GEMM peaks (GMAC/s):", {k: round(v, 1) for k, v in peaks.items()})
    print("bound (s):", {k: round(v, 2) for k, v in report["bound_s"].items()})
    write_report(report, Path(args.out), plot)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("image_decode_s", "vision_tower_s", "projector_s", "prefill_s", "first_sample_s")
    names = list(report["configs"])
    fig, ax = plt.subplots(figsize=(8, 4))
    left = [0.0] * len(names)
    for part in parts:
        values = [report["configs"][n]["best"][part] for n in names]
        ax.barh(names, values, left=left, label=part.removesuffix("_s"))
        left = [a + b for a, b in zip(left, values, strict=True)]
    for label, seconds in report["bound_s"].items():
        ax.axvline(seconds, linestyle=":", color="grey")
        ax.text(seconds, len(names) - 0.5, f" bound\n {label}", fontsize=7)
    ax.set(xlabel="seconds to first token (one picture + a 20-token question)")
    ax.set_title(f"VILA1.5-3B shape, {report['cpu'].get('Model name', '?')}, "
                 f"{report['threads']} threads")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
