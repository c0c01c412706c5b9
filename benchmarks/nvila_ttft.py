"""Time to first token at the NVILA-8B shape on this CPU, as it is: a picture at dynamic S2's
largest tiling (3,073 positions) and its prefill, part by part, from measured layers.

NVILA-8B (vila-family-layouts.md): a Qwen2-7B-class LLM (hidden 3584, 28 layers, 28 heads / 4
KV heads, ffn 18944, q/k/v biases), SigLIP-so400m at 448 px (32 x 32 patches; VILA reads the
second-to-last layer, so 26 layers run), dynamic S2 with scales 448 / 896 / 1344 and the
2x2 `mlp_downsample` projector on 3 x 1152 = 3456-wide features (256 positions per 448 tile).
At the 12-tile maximum a 4:3 picture takes 12 x 256 + 1 = 3,073 positions; the tower then runs
1 + 4 + 12 = 17 tiles of 448 px (one per tile of each scale).

A full random 8B checkpoint would not fit this machine's time budget, so the parts are measured
on a few layers of the real shapes (random weights, W4A16 g128 for the LLM as the worker loads
it, fp32 or `--quantize-vision-tower w8a8` for the tower) and scaled by the layer and tile
counts: every layer of each is the same computation.

    python benchmarks/nvila_ttft.py --threads 2

Writes benchmarks/results/nvila_ttft.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
POSITIONS = 3073
TILES = 17  # 448 px tower passes: 1 (448) + 4 (896) + 12 (the largest dynamic tiling)
LLM_LAYERS, TOWER_LAYERS = 28, 26


def llm_seconds(layers: int, repeats: int) -> dict[str, float]:
    from decode_speed import rtn_quantize
    from prefill_speed import best_seconds

    from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
    from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
    from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

    args = LlamaArgs(
        vocab_size=1024, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=8192,
        qkv_bias=True, model_type="qwen2",
    )  # fmt: skip
    model = Llama.empty(args, torch.bfloat16, "cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    weights = {
        f"model.layers.{i}.{n}": rtn_quantize(
            model.get_submodule(f"model.layers.{i}.{n}").weight, 128
        )
        for i in range(layers)
        for n in DECODER_LINEARS
    }
    quantize_model_linears(model, weights, torch.float32, "cpu")
    model.fuse_projections(fuse_w4a16)
    put_on_cpu_path(model)
    model = model.float()
    ids = torch.randint(0, args.vocab_size, (1, POSITIONS))
    cache = model.new_cache(1, POSITIONS + 1)
    with torch.inference_mode():
        seconds = best_seconds(lambda: model(cache, 0, input_ids=ids), repeats)
    return {"measured_layers": layers, "seconds": seconds * LLM_LAYERS / layers}


def tower_seconds(layers: int, repeats: int) -> dict[str, Any]:
    from prefill_speed import best_seconds

    from vilaserve.adapters.worker.torch_vila.vision_transformer import (
        VisionConfig,
        VisionTransformer,
    )
    from vilaserve.adapters.worker.torch_vila.vision_w8a8 import quantize_vision_tower

    config = VisionConfig(
        kind="siglip", hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
        num_attention_heads=16, num_channels=3, image_size=448, patch_size=14,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    )  # fmt: skip
    tower = VisionTransformer(config).eval().requires_grad_(False)
    pixels = torch.randn(1, 3, 448, 448)
    out: dict[str, Any] = {"measured_layers": layers}
    with torch.inference_mode():
        run = lambda: tower.encoder(tower.embeddings(pixels))  # noqa: E731
        out["fp32"] = best_seconds(run, repeats) * TOWER_LAYERS / layers * TILES
        quantize_vision_tower(tower, None)
        out["w8a8"] = best_seconds(run, repeats) * TOWER_LAYERS / layers * TILES
    return out


def projector_seconds(repeats: int) -> float:
    """mlp_downsample's two linears (13,824 -> 3584 -> 3584) over the image positions, fp32."""
    from prefill_speed import best_seconds

    first, second = torch.nn.Linear(4 * 3456, 3584), torch.nn.Linear(3584, 3584)
    x = torch.randn(POSITIONS - 1, 4 * 3456)
    with torch.inference_mode():
        return best_seconds(lambda: second(torch.nn.functional.gelu(first(x))), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="layers measured of each model")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "nvila_ttft"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefill_speed import cpu_description

    from vilaserve.adapters.worker import cpu_kernels

    report: dict[str, Any] = {
        "cpu": cpu_description(),
        "cpu_path": cpu_kernels.cpu_path(),
        "threads": args.threads,
        "positions": POSITIONS,
        "tower_tiles": TILES,
    }
    report["tower_s"] = tower_seconds(args.layers, args.repeats)
    print("tower", report["tower_s"], flush=True)
    report["projector_s"] = projector_seconds(args.repeats)
    print("projector", report["projector_s"], flush=True)
    report["prefill_s"] = llm_seconds(args.layers, args.repeats)
    print("prefill", report["prefill_s"], flush=True)
    for tower in ("fp32", "w8a8"):
        report[f"ttft_s_{tower}_tower"] = (
            report["tower_s"][tower] + report["projector_s"] + report["prefill_s"]["seconds"]
        )
    print({k: round(v, 1) for k, v in report.items() if k.startswith("ttft")})
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
