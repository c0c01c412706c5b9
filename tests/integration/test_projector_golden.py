"""DownSampleBlock against VILA's own output (golden data) and projector checkpoint layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from shared_data import shared_dir

from vilaserve.adapters.worker.torch_vila.projector import (
    DownSampleBlock,
    build_projector,
    load_projector,
)

GOLDEN = shared_dir() / "golden" / "vila-downsample-block.safetensors"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    if not GOLDEN.is_file():
        pytest.skip(f"golden data not found at {GOLDEN} (set VILASERVE_SHARED to the shared dir)")
    return load_file(str(GOLDEN))


@pytest.mark.parametrize("tokens", ["729", "256"])
def test_downsample_matches_vila_golden(golden: dict[str, torch.Tensor], tokens: str) -> None:
    out = DownSampleBlock()(golden[f"in_{tokens}"])
    expected = golden[f"out_{tokens}"]
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


def test_downsample_order_by_hand() -> None:
    # 4x4 grid, 1 channel, token value = its index: makes the column-major order visible.
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    out = DownSampleBlock()(x)
    assert out.shape == (1, 4, 4)
    # token 0: rows 0-1, cols 0-1; token 1: rows 2-3, cols 0-1 (column-major).
    assert out[0, 0].tolist() == [0, 1, 4, 5]
    assert out[0, 1].tolist() == [8, 9, 12, 13]
    assert out[0, 2].tolist() == [2, 3, 6, 7]


def test_downsample_odd_grid_pads_with_zeros() -> None:
    x = torch.ones(1, 9, 2)
    out = DownSampleBlock()(x)
    assert out.shape == (1, 4, 8)
    # Last token covers rows 2-3, cols 2-3 of the padded 4x4 grid: only (2,2) is real.
    assert out[0, 3].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_downsample_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        DownSampleBlock()(torch.zeros(1, 10, 2))


@pytest.mark.parametrize(
    ("projector_type", "shapes"),
    [
        ("linear", {"layers.weight": (6, 4), "layers.bias": (6,)}),
        (
            "mlp2x_gelu",
            {
                "layers.0.weight": (6, 4),
                "layers.0.bias": (6,),
                "layers.2.weight": (6, 6),
                "layers.2.bias": (6,),
            },
        ),
        (
            "mlp3x_gelu",
            {
                "layers.0.weight": (6, 4),
                "layers.0.bias": (6,),
                "layers.2.weight": (6, 6),
                "layers.2.bias": (6,),
                "layers.4.weight": (6, 6),
                "layers.4.bias": (6,),
            },
        ),
        (
            "mlp_downsample",
            {
                "layers.1.weight": (16,),
                "layers.1.bias": (16,),
                "layers.2.weight": (6, 16),
                "layers.2.bias": (6,),
                "layers.4.weight": (6, 6),
                "layers.4.bias": (6,),
            },
        ),
        ("identity", {}),
    ],
)
def test_projector_state_dict_layout(
    projector_type: str, shapes: dict[str, tuple[int, ...]]
) -> None:
    hidden = 4 if projector_type == "identity" else 6
    projector = build_projector(projector_type, 4, hidden)
    got = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert got == shapes


def test_projector_forward_shapes_and_token_counts() -> None:
    down = build_projector("mlp_downsample", 4, 6)
    assert down(torch.randn(2, 729, 4)).shape == (2, 196, 6)
    assert down.output_tokens(729) == 196
    assert down.output_tokens(1024) == 256
    mlp = build_projector("mlp2x_gelu", 4, 6)
    assert mlp(torch.randn(2, 576, 4)).shape == (2, 576, 6)
    assert mlp.output_tokens(576) == 576


def test_mlp_downsample_is_layernorm_linear_exact_gelu_linear() -> None:
    torch.manual_seed(0)
    proj = build_projector("mlp_downsample", 2, 3)
    x = torch.randn(1, 4, 2)
    merged = DownSampleBlock()(x)
    ln, fc1, fc2 = proj.layers[1], proj.layers[2], proj.layers[4]
    normed = torch.nn.functional.layer_norm(merged, (8,), ln.weight, ln.bias, eps=1e-5)
    h = fc1(normed)
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU, not the tanh approximation
    torch.testing.assert_close(proj(x), fc2(h))


def test_unknown_projector_type_is_named() -> None:
    with pytest.raises(ValueError, match="'mlp_fancy'"):
        build_projector("mlp_fancy", 4, 6)


def _write_projector(directory: Path, projector_type: str, state: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"mm_projector_type": projector_type, "model_type": "v2l_projector"}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))


def test_load_projector_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_projector("mlp_downsample", 4, 6)
    _write_projector(tmp_path, "mlp_downsample", source.state_dict())
    loaded = load_projector(tmp_path, 4, 6, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16))
    x = torch.randn(1, 16, 4)
    torch.testing.assert_close(loaded(x.bfloat16()).float(), source(x), atol=5e-2, rtol=5e-2)


def test_load_projector_reports_bad_keys_and_shapes(tmp_path: Path) -> None:
    state = build_projector("mlp2x_gelu", 4, 6).state_dict()
    state["layers.2.weight"] = torch.zeros(6, 5)
    state.pop("layers.0.bias")
    state["layers.9.weight"] = torch.zeros(1)
    _write_projector(tmp_path, "mlp2x_gelu", state)
    with pytest.raises(ValueError) as info:
        load_projector(tmp_path, 4, 6, torch.float32, "cpu")
    message = str(info.value)
    assert "model.safetensors" in message
    assert "layers.0.bias" in message
    assert "layers.9.weight" in message
    assert "layers.2.weight: file (6, 5) vs model (6, 6)" in message


def test_load_projector_unknown_type_and_missing_files(tmp_path: Path) -> None:
    _write_projector(tmp_path / "a", "qformer", {})
    with pytest.raises(ValueError, match="qformer"):
        load_projector(tmp_path / "a", 4, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_projector(tmp_path / "missing", 4, 6, torch.float32, "cpu")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_projector(tmp_path / "b", 4, 6, torch.float32, "cpu")
