"""Vision side of a VILA checkpoint: preprocessing, decoding, truncated tower, full pipeline.

Reference values come from transformers itself (its PIL-backend image processors, which work
without torchvision, and the untouched vision models' `hidden_states`) or from hand
computations written independently of the code under test.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vilaserve.adapters.worker.torch_vila.image_processing import (
    ImagePreprocessor,
    ImageProcessorConfig,
    decode_image,
)
from vilaserve.adapters.worker.torch_vila.projector import build_projector
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower
from vilaserve.adapters.worker.torch_vila.vision_transformer import vision_kind

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SIGLIP_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "SiglipImageProcessor",
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
CLIP_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 32},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}


def _random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _hf_processor(kind: str, config: dict[str, Any]) -> Any:
    """transformers' PIL-backend processor built from the same preprocessor_config dict."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, f"{kind}ImageProcessorPil", None)
    if cls is None:
        pytest.skip(f"transformers has no {kind}ImageProcessorPil")
    kwargs = {k: v for k, v in config.items() if k != "image_processor_type"}
    return cls(**kwargs)


def _hf_pixels(processor: Any, images: list[Image.Image]) -> torch.Tensor:
    return torch.as_tensor(
        np.asarray(processor(images=images, return_tensors="np")["pixel_values"])
    )


def _expand2square(image: Image.Image, mean: list[float]) -> Image.Image:
    """VILA's pad step, written out independently for the reference."""
    w, h = image.size
    side = max(w, h)
    color = tuple(int(255 * m) for m in mean)
    out = Image.new("RGB", (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


# --------------------------------------------------------------------------- preprocessing


def test_config_parsing_variants() -> None:
    clip_old = ImageProcessorConfig.from_dict(
        {
            "image_processor_type": "CLIPImageProcessor",
            "size": 336,
            "crop_size": 336,
            "do_center_crop": True,
        }
    )
    assert clip_old.shortest_edge == 336 and clip_old.size is None
    assert clip_old.crop_size == (336, 336)
    assert clip_old.image_mean == tuple(CLIP_MEAN)  # CLIP default statistics
    siglip_int = ImageProcessorConfig.from_dict(
        {"image_processor_type": "SiglipImageProcessor", "size": 384}
    )
    assert siglip_int.size == (384, 384) and siglip_int.output_size == (384, 384)
    assert siglip_int.image_mean == (0.5, 0.5, 0.5)
    hw = ImageProcessorConfig.from_dict({"size": {"height": 20, "width": 30}, "resample": 2})
    assert hw.output_size == (20, 30) and hw.resample == 2
    with pytest.raises(ValueError, match="fixed output size"):
        ImageProcessorConfig.from_dict({"size": {"shortest_edge": 32}})
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        ImagePreprocessor(siglip_int, "dynamic_s2")


def test_config_from_json(tmp_path: Path) -> None:
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(CLIP_PROCESSOR))
    config = ImageProcessorConfig.from_json(path)
    assert config.shortest_edge == 32 and config.crop_size == (32, 32)
    with pytest.raises(ValueError, match="cannot read"):
        ImageProcessorConfig.from_json(tmp_path / "absent.json")


def test_siglip_resize_mode_matches_transformers() -> None:
    config = ImageProcessorConfig.from_dict(SIGLIP_PROCESSOR)
    images = [_random_image(50, 70, seed=1), _random_image(17, 9, seed=2)]
    ours = ImagePreprocessor(config, "resize")(images)
    assert ours.shape == (2, 3, 32, 32) and ours.dtype == torch.float32
    # VILA: bare PIL resize (bicubic default) to the processor size, then the processor.
    squashed = [im.resize((32, 32)) for im in images]
    reference = _hf_pixels(_hf_processor("Siglip", SIGLIP_PROCESSOR), squashed)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_siglip_by_hand() -> None:
    config = ImageProcessorConfig.from_dict(SIGLIP_PROCESSOR)
    image = _random_image(40, 24, seed=3)
    ours = ImagePreprocessor(config, "resize")([image])
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    expected = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (32, 32)])
def test_clip_pad_mode_matches_transformers(size: tuple[int, int]) -> None:
    config = ImageProcessorConfig.from_dict(CLIP_PROCESSOR)
    image = _random_image(*size, seed=4)
    ours = ImagePreprocessor(config, "pad")([image])
    reference = _hf_pixels(
        _hf_processor("CLIP", CLIP_PROCESSOR), [_expand2square(image, CLIP_MEAN)]
    )
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_pad_mode_fills_with_mean_colour() -> None:
    config = ImageProcessorConfig.from_dict(
        {
            **CLIP_PROCESSOR,
            "do_resize": False,
            "do_center_crop": True,
            "crop_size": {"height": 8, "width": 8},
        }
    )
    white = Image.new("RGB", (8, 2), (255, 255, 255))
    pixels = ImagePreprocessor(config, "pad")([white])[0]
    # Rows 0-2 are padding: colour int(255*mean) = (122, 116, 104), normalized.
    expected = (np.array([122, 116, 104]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels[:, 0, 0].numpy(), expected, atol=1e-5)
    assert pixels[:, 3, 0].tolist() == pytest.approx(
        ((1 - np.array(CLIP_MEAN)) / CLIP_STD).tolist(), abs=1e-5
    )


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ({}, (64, 40)),  # shortest-edge resize then a real crop
        ({"size": {"shortest_edge": 36}}, (37, 91)),  # crop off both axes, odd offsets
        ({"size": {"shortest_edge": 24}}, (30, 50)),  # crop larger than the image: zero pad
    ],
)
def test_clip_center_crop_matches_transformers(
    overrides: dict[str, Any], size: tuple[int, int]
) -> None:
    raw = {**CLIP_PROCESSOR, **overrides}
    config = ImageProcessorConfig.from_dict(raw)
    image = _random_image(*size, seed=5)
    ours = ImagePreprocessor(config, "square")([image])
    reference = _hf_pixels(_hf_processor("CLIP", raw), [image])
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16"])
def test_non_rgb_inputs_are_converted(mode: str) -> None:
    base = _random_image(30, 20, "RGBA" if mode in ("RGBA", "LA") else "RGB", seed=6)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 200)
    elif mode == "P":
        image = base.quantize(16)
    else:
        image = base.convert(mode)
    config = ImageProcessorConfig.from_dict(SIGLIP_PROCESSOR)
    pixels = ImagePreprocessor(config, "resize")([image])
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.isfinite(pixels).all()
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # Same as converting first: the alpha channel is dropped, as VILA's convert("RGB") does.
    expected = ImagePreprocessor(config, "resize")([image.convert("RGB")])
    torch.testing.assert_close(pixels, expected)


def test_empty_batch() -> None:
    config = ImageProcessorConfig.from_dict(SIGLIP_PROCESSOR)
    assert ImagePreprocessor(config, "resize")([]).shape == (0, 3, 32, 32)


# --------------------------------------------------------------------------- decoding


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_image_returns_rgb() -> None:
    rgba = _random_image(12, 10, "RGBA")
    decoded = decode_image(_encode(rgba), max_pixels=10_000)
    assert decoded.mode == "RGB" and decoded.size == (12, 10)
    assert np.array_equal(np.asarray(decoded), np.asarray(rgba.convert("RGB")))
    jpeg = decode_image(_encode(_random_image(8, 8, "L"), "JPEG"), max_pixels=64)
    assert jpeg.mode == "RGB" and jpeg.size == (8, 8)


@pytest.mark.parametrize(
    "payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]
)
def test_decode_image_rejects_garbage(payload: bytes) -> None:
    with pytest.raises(ValueError, match="image"):
        decode_image(payload, max_pixels=10_000)


def test_decode_image_rejects_truncated_data() -> None:
    data = _encode(_random_image(64, 64), "PNG")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], max_pixels=10_000)


def test_decode_image_rejects_unlisted_formats() -> None:
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(_encode(_random_image(8, 8), "PPM"), max_pixels=10_000)


def test_decode_image_pixel_limit_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_random_image(100, 60))

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data must not be decoded for an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ValueError, match=r"100x60 = 6000 pixels, more than the limit of 5999"):
        decode_image(data, max_pixels=5999)


def test_decode_image_exact_limit_passes() -> None:
    assert decode_image(_encode(_random_image(100, 60)), max_pixels=6000).size == (100, 60)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)


# --------------------------------------------------------------------------- vision tower


def _siglip(image_size: int = 32, layers: int = 3) -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )
    return SiglipVisionModel(config).eval()


def _clip(image_size: int = 32, layers: int = 3) -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=16,
    )
    return CLIPVisionModel(config).eval()


def _reference_states(model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("factory", [_siglip, _clip], ids=["siglip", "clip"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1, 0, -4])
def test_truncated_tower_equals_hidden_states(factory: Any, select_layer: int) -> None:
    model = factory()
    pixels = torch.randn(2, 3, 32, 32)
    states = _reference_states(model, pixels)
    assert len(states) == 4
    tower = VisionTower(copy.deepcopy(model), select_layer, "cls_patch").eval()
    with torch.inference_mode():
        out = tower(pixels)
    torch.testing.assert_close(out, states[select_layer], atol=1e-6, rtol=1e-6)
    assert len(tower.encoder.layers) == select_layer % 4
    names = "\n".join(name for name, _ in tower.named_parameters())
    assert "post_layernorm" not in names and "head" not in names


@pytest.mark.parametrize(
    ("factory", "feature", "tokens"),
    [
        (_siglip, "cls_patch", 16),
        (_siglip, "patch", 15),
        (_clip, "cls_patch", 17),
        (_clip, "patch", 16),
    ],
)
def test_select_feature_token_counts(factory: Any, feature: str, tokens: int) -> None:
    model = factory()
    pixels = torch.randn(1, 3, 32, 32)
    states = _reference_states(model, pixels)
    tower = VisionTower(copy.deepcopy(model), -2, feature)
    assert tower.output_tokens() == tokens
    with torch.inference_mode():
        out = tower(pixels)
    assert out.shape == (1, tokens, 32)
    expected = states[-2][:, 1:] if feature == "patch" else states[-2]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_tower_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="out of range"):
        VisionTower(_siglip(), -5, "patch")
    with pytest.raises(ValueError, match="'cls'"):
        VisionTower(_siglip(), -2, "cls")
    # InternViT has its own tower (intern_vit.py): the SigLIP/CLIP code must not take it.
    with pytest.raises(ValueError, match=r"unsupported vision model 'InternVisionModel'"):
        vision_kind({"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b"})
    with pytest.raises(ValueError, match=r"unsupported vision model 'dinov2'"):
        vision_kind({"model_type": "dinov2"})
    assert vision_kind({"architectures": ["CLIPModel"], "model_type": "clip"}) == "clip"
    assert vision_kind({"model_type": "clip_vision_model"}) == "clip"
    assert vision_kind({"architectures": ["SiglipVisionModel"]}) == "siglip"


def test_tower_takes_over_a_transformers_models_parameters() -> None:
    # The demo trains a tower built from a fresh transformers model: the tower must train those
    # very parameters (no copies), and compute what the model computes.
    model = _siglip()
    tower = VisionTower(model, -2, "cls_patch")
    assert tower.embeddings.patch_embedding.weight is model.embeddings.patch_embedding.weight
    assert tower.encoder.layers[0].mlp.fc1.weight is model.encoder.layers[0].mlp.fc1.weight
    assert all(p.requires_grad for p in tower.parameters())
    tower(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert model.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("factory", [_siglip, _clip], ids=["siglip", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tower_from_pretrained_equals_transformers(
    tmp_path: Path, factory: Any, dtype: torch.dtype
) -> None:
    # The served tower is our own code: it must give exactly what transformers' model, loaded
    # from the same folder in the same dtype, gives (same kernels, so bit for bit).
    factory().save_pretrained(tmp_path)
    reference = type(factory()).from_pretrained(tmp_path, dtype=dtype).eval()
    tower = VisionTower.from_pretrained(tmp_path, -2, "cls_patch", dtype, "cpu")
    assert tower.dtype == dtype and all(p.dtype == dtype for p in tower.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = tower(pixels)
    expected = _reference_states(reference, pixels.to(dtype))[-2]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "quick_gelu", "gelu_pytorch_tanh"])
def test_tower_activations_match_transformers(tmp_path: Path, act: str) -> None:
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=act,
    )
    model = SiglipVisionModel(config).eval()
    model.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path, -1, "cls_patch", torch.float32, "cpu")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        out = tower(pixels)
    torch.testing.assert_close(out, _reference_states(model, pixels)[-1], atol=1e-6, rtol=1e-6)


def test_tower_config_defaults_and_unsupported_activation(tmp_path: Path) -> None:
    # Keys a config.json leaves out take transformers' defaults (CLIP: patch 32, quick_gelu).
    model = CLIPVisionModel(CLIPVisionConfig(image_size=64, num_hidden_layers=2)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    kept = ("architectures", "model_type", "image_size", "num_hidden_layers")
    (tmp_path / "config.json").write_text(json.dumps({k: config[k] for k in kept}))
    tower = VisionTower.from_pretrained(tmp_path, -1, "patch", torch.float32, "cpu")
    assert (tower.patch_size, tower.hidden_size, tower.output_tokens()) == (32, 768, 4)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        out = tower(pixels)
    expected = _reference_states(model, pixels)[-1][:, 1:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    with pytest.raises(ValueError, match="unsupported hidden_act 'swish'"):
        VisionTower.from_pretrained(tmp_path, -1, "patch", torch.float32, "cpu")


def test_loading_a_tower_imports_no_transformers_model_code(tmp_path: Path) -> None:
    # transformers' modeling_utils costs seconds to import (issue 16, cold start of `chat`):
    # the served tower is plain torch and must not bring it in.
    _siglip().save_pretrained(tmp_path)
    script = (
        "import sys, torch\n"
        "from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime\n"
        "from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower\n"
        f"VisionTower.from_pretrained({str(tmp_path)!r}, -2, 'patch', torch.float32, 'cpu')\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.model')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_tower_from_pretrained_with_v4_key_names(tmp_path: Path) -> None:
    # Real VILA vision_tower/ files were written by transformers v4, whose vision models nest
    # everything under `vision_model.`; v5 must still load them.
    model = _siglip()
    model.config.save_pretrained(tmp_path)
    state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    tower = VisionTower.from_pretrained(tmp_path, -2, "cls_patch", torch.float32, "cpu")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        out = tower(pixels)
    torch.testing.assert_close(out, _reference_states(model, pixels)[-2], atol=1e-6, rtol=1e-6)


def test_tower_from_pretrained_refuses_missing_weights(tmp_path: Path) -> None:
    model = _clip()
    model.config.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if "layers.0.mlp" not in k}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing .*layers\.0\.mlp"):
        VisionTower.from_pretrained(tmp_path, -2, "patch", torch.float32, "cpu")


# --------------------------------------------------------------------------- pipeline


def _write_checkpoint(
    root: Path,
    model: Any,
    processor: dict[str, Any],
    projector_type: str,
    llm_hidden: int,
) -> dict[str, torch.Tensor]:
    tower_dir = root / "vision_tower"
    model.save_pretrained(tower_dir)
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    torch.manual_seed(1)
    projector = build_projector(projector_type, model.config.hidden_size, llm_hidden)
    proj_dir = root / "mm_projector"
    proj_dir.mkdir(parents=True)
    (proj_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MultimodalProjector"],
                "model_type": "v2l_projector",
                "mm_projector_type": projector_type,
            }
        )
    )
    state = projector.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(proj_dir / "model.safetensors"))
    return state


def test_pipeline_end_to_end_siglip_downsample(tmp_path: Path) -> None:
    # 40 px / patch 8 -> 5x5 = 25 tokens: an odd grid, padded to 6x6 -> 9 tokens, like 27 -> 14.
    model = _siglip(image_size=40)
    processor = {**SIGLIP_PROCESSOR, "size": {"height": 40, "width": 40}}
    projector_state = _write_checkpoint(tmp_path, model, processor, "mlp_downsample", 48)
    root_config = {
        "hidden_size": 48,
        "mm_hidden_size": 32,
        "image_aspect_ratio": "resize",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
    }
    images = [_random_image(50, 30, seed=7), _random_image(40, 40, "RGBA", seed=8)]

    pipeline = VisionPipeline.from_checkpoint(tmp_path, root_config, torch.float32, "cpu")
    assert pipeline.tokens_per_image == 9
    out = pipeline.encode(images)
    assert out.shape == (2, 9, 48) and out.dtype == torch.float32

    # Independent reference: untouched model's hidden_states[-2], then the projector.
    pixels = ImagePreprocessor(ImageProcessorConfig.from_dict(processor), "resize")(images)
    features = _reference_states(model, pixels)[-2]
    reference = build_projector("mlp_downsample", 32, 48)
    reference.load_state_dict(projector_state)
    with torch.inference_mode():
        expected = reference(features)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    bf16 = VisionPipeline.from_checkpoint(tmp_path, root_config, torch.bfloat16, "cpu")
    out_bf16 = bf16.encode(images)
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == (2, 9, 48)
    torch.testing.assert_close(out_bf16.float(), expected, atol=0.1, rtol=0.05)
    assert pipeline.encode([]).shape == (0, 9, 48)


def test_pipeline_clip_pad_mlp2x(tmp_path: Path) -> None:
    model = _clip()
    _write_checkpoint(tmp_path, model, CLIP_PROCESSOR, "mlp2x_gelu", 24)
    root_config = {
        "llm_cfg": {"hidden_size": 24},
        "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
    }
    pipeline = VisionPipeline.from_checkpoint(tmp_path, root_config, torch.float32, "cpu")
    assert pipeline.tokens_per_image == 16  # 4x4 patches + CLS - CLS
    out = pipeline.encode([_random_image(33, 70, seed=9)])
    assert out.shape == (1, 16, 24)


def test_pipeline_config_mismatches_are_reported(tmp_path: Path) -> None:
    model = _siglip()
    _write_checkpoint(tmp_path, model, {**SIGLIP_PROCESSOR, "size": 48}, "linear", 24)
    base = {
        "hidden_size": 24,
        "mm_hidden_size": 32,
        "image_aspect_ratio": "resize",
        "mm_vision_select_feature": "cls_patch",
    }
    with pytest.raises(ValueError, match="preprocessor produces"):
        VisionPipeline.from_checkpoint(tmp_path, base, torch.float32, "cpu")
    with pytest.raises(ValueError, match="mm_hidden_size 64"):
        VisionPipeline.from_checkpoint(
            tmp_path, {**base, "mm_hidden_size": 64}, torch.float32, "cpu"
        )
    with pytest.raises(ValueError, match="s2_scales"):
        VisionPipeline.from_checkpoint(
            tmp_path, {**base, "s2": True, "s2_scales": "x"}, torch.float32, "cpu"
        )
