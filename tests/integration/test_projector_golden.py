"""Token merges against VILA's own output (golden data), hand-worked merges, projector layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from shared_data import shared_dir

from vilaserve.adapters.worker.torch_vila.projector import (
    DownSample3x3Block,
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


# ---------------------------------------------------------------- NVILA projector variants


def test_row_major_downsample_is_golden_with_half_grid_transposed(
    golden: dict[str, torch.Tensor],
) -> None:
    # The golden output is column-major: token col_pair * half + row_pair. Row-major puts
    # token row_pair * half + col_pair there, with the same channels inside each token.
    for tokens, half in (("729", 14), ("256", 8)):
        expected = golden[f"out_{tokens}"]
        batch, count, width = expected.shape
        transposed = expected.reshape(batch, half, half, width).transpose(1, 2)
        row_major = transposed.reshape(batch, count, width)
        out = DownSampleBlock("row")(golden[f"in_{tokens}"])
        assert torch.equal(out, row_major)
        assert not torch.equal(out, expected)


def test_mlp_downsample_token_order_choice() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    for projector_type, order, second_token in (
        ("mlp_downsample", "column", [8, 9, 12, 13]),
        ("mlp_downsample", "row", [2, 3, 6, 7]),
        ("mlp_downsample_2x2_fix", "row", [2, 3, 6, 7]),
        # The _fix variant is row-major in every VILA version; the choice does not apply.
        ("mlp_downsample_2x2_fix", "column", [2, 3, 6, 7]),
    ):
        projector = build_projector(projector_type, 1, 3, token_order=order)
        assert projector.layers[0](x)[0, 1].tolist() == second_token
    with pytest.raises(ValueError, match="token_order"):
        build_projector("mlp_downsample", 1, 3, token_order="diagonal")


def test_3x3_merge_by_hand() -> None:
    # 5x5 grid, 1 channel, value = r*5 + c; padded with zeros to 6x6 -> 2x2 merged tokens.
    x = torch.arange(25, dtype=torch.float32).reshape(1, 25, 1)
    out = DownSample3x3Block()(x)
    assert out.shape == (1, 4, 9)
    assert out[0].tolist() == [
        [0, 1, 2, 5, 6, 7, 10, 11, 12],  # rows 0-2, cols 0-2
        [3, 4, 0, 8, 9, 0, 13, 14, 0],  # rows 0-2, cols 3-5 (col 5 is padding): row-major
        [15, 16, 17, 20, 21, 22, 0, 0, 0],  # rows 3-5 (row 5 is padding), cols 0-2
        [18, 19, 0, 23, 24, 0, 0, 0, 0],
    ]
    # Two channels: each position contributes its channels together, (r,c) before (r,c+1).
    y = torch.stack([torch.arange(9.0), 100 + torch.arange(9.0)], dim=-1).reshape(1, 9, 2)
    assert DownSample3x3Block()(y)[0, 0, :6].tolist() == [0, 100, 1, 101, 2, 102]


def test_3x3_fix_layout_and_forward_math() -> None:
    torch.manual_seed(0)
    projector = build_projector("mlp_downsample_3x3_fix", 4, 6)
    got = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert got == {
        "layers.1.weight": (36,),
        "layers.1.bias": (36,),
        "layers.2.weight": (12, 36),
        "layers.2.bias": (12,),
        "layers.4.weight": (12,),
        "layers.4.bias": (12,),
        "layers.5.weight": (6, 12),
        "layers.5.bias": (6,),
        "layers.7.weight": (6, 6),
        "layers.7.bias": (6,),
    }
    for index in (1, 4):
        assert projector.layers[index].eps == 1e-5
    x = torch.randn(2, 16, 4)
    merged = DownSample3x3Block()(x)
    layers = projector.layers

    def gelu(h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h * (1 + torch.erf(h / 2**0.5))

    h = torch.nn.functional.layer_norm(merged, (36,), layers[1].weight, layers[1].bias, 1e-5)
    h = gelu(layers[2](h))
    h = torch.nn.functional.layer_norm(h, (12,), layers[4].weight, layers[4].bias, 1e-5)
    h = layers[7](gelu(layers[5](h)))
    torch.testing.assert_close(projector(x), h)
    assert projector(x).shape == (2, 4, 6)


def test_output_tokens_per_projector_type() -> None:
    down = build_projector("mlp_downsample", 4, 6)
    fix = build_projector("mlp_downsample_2x2_fix", 4, 6)
    three = build_projector("mlp_downsample_3x3_fix", 4, 6)
    assert (down.output_tokens(729), down.output_tokens(1024)) == (196, 256)
    assert (fix.output_tokens(729), fix.output_tokens(1024)) == (196, 256)
    assert (three.output_tokens(1024), three.output_tokens(729)) == (121, 81)
    with pytest.raises(ValueError, match="square"):
        three.output_tokens(1000)


def test_nvila_projector_sizes() -> None:
    # §4.8 size checks, parameters counted by hand:
    # NVILA-8B mlp_downsample, C 3456, H 3584: LN 2*13824 + 13824*3584 + 3584 + 3584*3584 + 3584
    # NVILA-Lite 3x3, C 1152, H 3584: LN 2*10368 + 10368*3456 + 3456 + LN 2*3456
    #   + 3456*3584 + 3584 + 3584*3584 + 3584
    with torch.device("meta"):
        nvila = build_projector("mlp_downsample", 3456, 3584, token_order="row")
        lite = build_projector("mlp_downsample_3x3_fix", 1152, 3584)
    assert sum(p.numel() for p in nvila.parameters()) == 62_425_088
    assert sum(p.numel() for p in lite.parameters()) == 61_101_440


def test_load_3x3_fix_and_row_major_projectors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_projector("mlp_downsample_3x3_fix", 4, 6)
    _write_projector(tmp_path / "lite", "mlp_downsample_3x3_fix", source.state_dict())
    loaded = load_projector(tmp_path / "lite", 4, 6, torch.float32, "cpu")
    x = torch.randn(1, 25, 4)
    assert torch.equal(loaded(x), source(x))
    assert loaded.output_tokens(1024) == 121

    row = build_projector("mlp_downsample", 4, 6, token_order="row")
    _write_projector(tmp_path / "nvila", "mlp_downsample", row.state_dict())
    loaded_row = load_projector(tmp_path / "nvila", 4, 6, torch.float32, "cpu", token_order="row")
    loaded_col = load_projector(tmp_path / "nvila", 4, 6, torch.float32, "cpu")
    x = torch.randn(1, 16, 4)
    assert torch.equal(loaded_row(x), row(x))
    # Same weights, other token order: the same tokens, transposed on the 2x2 grid.
    torch.testing.assert_close(loaded_col(x)[0, [0, 2, 1, 3]], row(x)[0])
