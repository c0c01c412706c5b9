"""SmoothQuant's calibration for the vision tower: per-channel smoothing factors from pictures.

For each encoder layer's two pre-norms (before q/k/v, before fc1) the largest |activation| of
each channel over the calibration pictures, max|X_j|, and the largest |weight| of each input
column over the linears that read it, max|W_j|, give s_j = max|X_j|^a / max|W_j|^(1-a) (a = 0.5
balances the two, SmoothQuant's default for most models). The worker folds them in when it loads
the tower in W8A8 (adapters/worker/torch_vila/vision_w8a8.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from vilaserve.adapters.worker.torch_vila.image_processing import decode_image
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.adapters.worker.torch_vila.vision_w8a8 import SMOOTHING_FILE, smoothing_groups

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_FACTOR = 1e-5


def activation_maxima(pipeline: VisionPipeline, pictures: Iterable[bytes]) -> dict[str, Tensor]:
    """max |x| per channel at each smoothing group's input, over every picture."""
    groups = smoothing_groups(pipeline.tower)
    if not groups:
        raise ValueError("this vision tower has no SigLIP/CLIP encoder layers to smooth")
    maxima: dict[str, Tensor] = {}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: object, _inputs: object, output: Tensor) -> None:
            seen = output.detach().abs().flatten(0, -2).amax(dim=0).float().cpu()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)

        return hook

    handles = [norm.register_forward_hook(recorder(n)) for n, (norm, _) in groups.items()]
    try:
        with torch.inference_mode():
            for data in tqdm(list(pictures), desc="calibration pictures"):
                prepared = pipeline.prepare(decode_image(data, 64_000_000), True)
                pipeline.encode_prepared([prepared])
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_factors(
    pipeline: VisionPipeline, maxima: dict[str, Tensor], alpha: float = 0.5
) -> dict[str, Tensor]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha {alpha}: expected a value between 0 and 1")
    factors = {}
    for name, (_norm, linears) in smoothing_groups(pipeline.tower).items():
        if name not in maxima:
            continue
        weight_max = torch.stack(
            [linear.weight.detach().abs().amax(dim=0).float().cpu() for linear in linears]
        ).amax(dim=0)
        s = maxima[name].clamp(min=MIN_FACTOR) ** alpha / weight_max.clamp(min=MIN_FACTOR) ** (
            1.0 - alpha
        )
        factors[name] = s.clamp(min=MIN_FACTOR).contiguous()
    return factors


def picture_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no pictures ({', '.join(PICTURE_SUFFIXES)})")
    return files


def calibrate_vision_smoothing(
    pipeline: VisionPipeline, pictures: Iterable[bytes], weights_dir: Path, alpha: float = 0.5
) -> Path:
    """Writes the tower's smoothing factors beside its weights; returns the file."""
    factors = smoothing_factors(pipeline, activation_maxima(pipeline, pictures), alpha)
    path = Path(weights_dir) / SMOOTHING_FILE
    save_file(factors, str(path), metadata={"alpha": str(alpha), "method": "smoothquant"})
    return path
