"""The vision tower in W8A8: the AVX2 kernel against its own arithmetic in fp32, the layers
against fp32, SmoothQuant's smoothing (a no-op in exact arithmetic, a gain in 7 bits), the
calibration tool and the worker's `--quantize-vision-tower w8a8`."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from vilaserve.adapters.offline.vision_smoothing import calibrate_vision_smoothing
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.adapters.worker.torch_vila.vision_transformer import VisionConfig, VisionTransformer
from vilaserve.adapters.worker.torch_vila.vision_w8a8 import (
    SMOOTHING_FILE,
    W8A8Linear,
    quantize_vision_tower,
    smooth,
    smoothing_groups,
)

FP32 = cpu_kernels.fp32_kernels()
needs_kernel = pytest.mark.skipif(
    FP32 is None or not FP32.has_w8a8, reason="the W8A8 GEMM is built for AVX2 only"
)
# 7-bit activations per token (step max|x| / 63) and 8-bit weights per channel: on Gaussian data
# ~1.8 % of the largest output; a wrong layout or scale is ~100 %.
W8A8_REL_TOL = 4e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp(min=1e-12)  # an all-zero want needs an exact zero
    return float((got.float() - want.float()).abs().max() / scale)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_kernel_computes_the_layers_own_arithmetic(dtype: torch.dtype, bias: bool) -> None:
    """Every row count that leaves a tail of the kernel's 4-row blocks, a silent row and a row
    of tiny values: the kernel equals the fp32 reference of the same rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=bias)
    layer = W8A8Linear(linear)
    assert layer.on_kernel
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, 96)
        x[0] = 0.0
        if rows > 1:
            x[1] *= 1e-20
        x = x.to(dtype)
        with torch.inference_mode():
            got = layer(x)
        want = layer.reference(x)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        assert rel_err(got, want) < tol, rows
        assert torch.equal(got[0].float(), linear.bias.to(dtype).float() if bias else got[0] * 0)


@pytest.mark.parametrize("on_kernel", [True, False], ids=["kernel", "reference"])
def test_the_layer_is_within_its_bound_of_fp32(on_kernel: bool) -> None:
    if on_kernel and (FP32 is None or not FP32.has_w8a8):
        pytest.skip("the W8A8 GEMM is built for AVX2 only")
    torch.manual_seed(1)
    linear = nn.Linear(256, 128)
    layer = W8A8Linear(linear)
    if not on_kernel:
        layer._kernels = None
    x = torch.randn(7, 3, 256)
    with torch.inference_mode():
        got, want = layer(x), linear(x)
    assert got.shape == want.shape
    assert rel_err(got, want) < W8A8_REL_TOL
    assert cosine(got, want) > 0.999


def tiny_tower(outlier: float = 1.0) -> VisionTransformer:
    config = VisionConfig(
        kind="siglip", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_channels=3, image_size=32, patch_size=8,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(2)
    tower = VisionTransformer(config).eval().requires_grad_(False)
    for param in tower.parameters():
        nn.init.normal_(param, 0.0, 0.05)
    for layer in tower.encoder.layers:
        for norm in (layer.layer_norm1, layer.layer_norm2):
            norm.weight.fill_(1.0)
            norm.weight[3] = outlier  # one channel far larger than the rest, as in real ViTs
    return tower


def test_smoothing_changes_nothing_in_exact_arithmetic() -> None:
    tower = tiny_tower(outlier=30.0)
    pixels = torch.randn(2, 3, 32, 32)
    before = tower.encoder(tower.embeddings(pixels))
    groups = smoothing_groups(tower)
    assert sorted(groups) == [f"layers.{i}.{p}" for i in range(2) for p in ("attention", "mlp")]
    for norm, _ in groups.values():
        smooth(norm, groups_linears(groups, norm), torch.rand(64) * 4 + 0.25)
    after = tower.encoder(tower.embeddings(pixels))
    assert rel_err(after, before) < 1e-5


def groups_linears(groups: dict, norm: nn.Module) -> list[nn.Linear]:  # type: ignore[type-arg]
    return next(linears for n, linears in groups.values() if n is norm)


def test_smoothing_brings_an_outlier_channel_back_within_the_8_bit_bound() -> None:
    """With one activation channel 30x the others, per-token 7-bit rounding flattens the rest;
    SmoothQuant's factors (alpha 0.5) from the maxima move it into the weights."""
    pixels = torch.randn(4, 3, 32, 32)
    reference = tiny_tower(outlier=30.0)
    want = reference.encoder(reference.embeddings(pixels))

    def w8a8_error(smoothing: bool) -> float:
        tower = tiny_tower(outlier=30.0)
        factors = None
        if smoothing:
            maxima: dict[str, torch.Tensor] = {}
            groups = smoothing_groups(tower)
            hooks = [
                norm.register_forward_hook(
                    lambda _m, _i, out, name=name: maxima.__setitem__(
                        name, out.abs().flatten(0, -2).amax(0)
                    )
                )
                for name, (norm, _) in groups.items()
            ]
            tower.encoder(tower.embeddings(pixels))
            for hook in hooks:
                hook.remove()
            factors = {}
            for name, (_norm, linears) in groups.items():
                w_max = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)
                factors[name] = (maxima[name] ** 0.5 / w_max**0.5).clamp(min=1e-5)
        assert quantize_vision_tower(tower, factors) == 12
        with torch.inference_mode():
            got = tower.encoder(tower.embeddings(pixels))
        return rel_err(got, want)

    plain, smoothed = w8a8_error(False), w8a8_error(True)
    assert smoothed < 0.5 * plain, (plain, smoothed)


def pictures(count: int) -> list[bytes]:
    """Smooth random pictures (gradients and blobs, not noise), as PNG bytes."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        base = torch.rand(3, 1, 1, generator=gen) * torch.linspace(0, 1, 48)[None, :, None]
        image = (base + 0.3 * torch.rand(3, 48, 48, generator=gen)).clamp(0, 1)
        array = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def test_calibration_writes_factors_the_worker_loads(
    tiny_vila_siglip: Path, tmp_path: Path
) -> None:
    """The offline tool writes one factor per channel for every smoothing group, and a runtime
    loaded with `vision_quantization="w8a8"` runs every tower linear in W8A8, its projected
    features close to the 16-bit tower's."""
    import shutil

    root = tmp_path / "VILA1.5-tiny-siglip"
    shutil.copytree(tiny_vila_siglip, root)
    plain = VilaRuntime.load(VilaRuntimeOptions(model_path=str(root), adaptive_threads=False))
    pipeline = plain.vision_encoder._pipeline  # type: ignore[union-attr]
    assert isinstance(pipeline, VisionPipeline)
    path = calibrate_vision_smoothing(pipeline, pictures(4), root / "vision_tower")
    factors = load_file(str(path))
    assert path.name == SMOOTHING_FILE
    groups = smoothing_groups(pipeline.tower)
    assert sorted(factors) == sorted(groups)
    for name, (norm, _) in groups.items():
        assert factors[name].shape == norm.weight.shape and bool((factors[name] > 0).all())
    quantized = VilaRuntime.load(
        VilaRuntimeOptions(model_path=str(root), adaptive_threads=False, vision_quantization="w8a8")
    )
    q_pipeline = quantized.vision_encoder._pipeline  # type: ignore[union-attr]
    linears = [m for m in q_pipeline.tower.modules() if isinstance(m, nn.Linear)]
    w8a8 = [m for m in q_pipeline.tower.modules() if isinstance(m, W8A8Linear)]
    assert not linears and len(w8a8) == 6 * len(groups) // 2
    picture = pictures(1)[0]
    from vilaserve.adapters.worker.torch_vila.image_processing import decode_image

    def features(p: VisionPipeline, executor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        prepared = p.prepare(decode_image(picture, 10**7), True)
        return executor.call(lambda: p.encode_prepared([prepared])[0])

    want = features(pipeline, plain.executor)
    got = features(q_pipeline, quantized.executor)
    assert got.shape == want.shape
    assert cosine(got, want) > 0.99
    assert not math.isnan(float(got.sum()))
    plain.executor.shutdown()
    quantized.executor.shutdown()


def test_the_tower_stays_16_bit_where_no_int8_gemm_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """CUDA, or a CPU path without the kernel (here the forced torch path): the fp32 reference
    would only add work, so the option warns and keeps the tower as it is."""
    from types import SimpleNamespace

    from vilaserve.adapters.worker.torch_vila.runtime import quantize_tower
    from vilaserve.adapters.worker.torch_vila.vision_w8a8 import int8_path_here

    assert not int8_path_here(torch.device("cuda"))
    monkeypatch.setenv("VILASERVE_CPU_PATH", "torch")
    assert not int8_path_here(torch.device("cpu"))
    tower = tiny_tower()
    with caplog.at_level("WARNING"):
        quantize_tower(SimpleNamespace(tower=tower), tmp_path, torch.device("cpu"))  # type: ignore[arg-type]
    assert not any(isinstance(m, W8A8Linear) for m in tower.modules())
    assert "no int8 GEMM" in caplog.text
    if FP32 is not None and FP32.has_w8a8:
        monkeypatch.setenv("VILASERVE_CPU_PATH", "auto")
        quantize_tower(SimpleNamespace(tower=tower), tmp_path, torch.device("cpu"))  # type: ignore[arg-type]
        assert sum(isinstance(m, W8A8Linear) for m in tower.modules()) == 12


def test_vilaserve_quantize_writes_the_smoothing_beside_the_tower(
    tiny_vila_siglip: Path, tmp_path: Path
) -> None:
    """`vilaserve quantize ... --smooth-vision-tower PICTURES`: the output's tower folder holds
    the factors, and the quantized checkpoint loads with the W8A8 tower from them."""
    import argparse

    from vilaserve.entrypoints.offline.quantize import add_quantize_arguments, quantize_checkpoint

    folder = tmp_path / "pictures"
    folder.mkdir()
    for index, data in enumerate(pictures(3)):
        (folder / f"{index}.png").write_bytes(data)
    calib = tmp_path / "calibration.txt"
    calib.write_text("a picture of a cat on a mat\n" * 200)
    parser = argparse.ArgumentParser()
    add_quantize_arguments(parser)
    output = tmp_path / "VILA1.5-tiny-siglip-awq"
    args = parser.parse_args(
        ["--model-path", str(tiny_vila_siglip), "--output", str(output), "--calib", str(calib),
         "--no-search", "--group-size", "32", "--smooth-vision-tower", str(folder)]
    )  # fmt: skip
    quantize_checkpoint(args, warn_little_calibration=False)
    assert (output / "vision_tower" / SMOOTHING_FILE).is_file()
    runtime = VilaRuntime.load(
        VilaRuntimeOptions(
            model_path=str(output),
            precision="W4A16",
            adaptive_threads=False,
            vision_quantization="w8a8",
        )
    )
    tower = runtime.vision_encoder._pipeline.tower  # type: ignore[union-attr]
    expected = FP32 is not None and FP32.has_w8a8
    assert any(isinstance(m, W8A8Linear) for m in tower.modules()) == expected
    runtime.executor.shutdown()
