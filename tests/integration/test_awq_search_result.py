"""A saved AWQ search result, applied, gives the weights the search itself produced, bit for
bit; the demo ships the one for its LLM, and a build whose inputs differ searches instead."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_awq_quantizer import GROUP, calibration, tiny_llama
from torch import nn

from vilaserve.adapters.offline import awq_quantizer, gguf_import
from vilaserve.adapters.offline.awq_quantizer import RECIPES, apply_awq, search_awq
from vilaserve.adapters.offline.awq_search_file import load_awq_search, save_awq_search
from vilaserve.adapters.offline.demo import awq_search
from vilaserve.adapters.offline.demo.awq_search import SHIPPED_PROVENANCE, SHIPPED_RESULT
from vilaserve.adapters.offline.demo.calibration import calibration_lines
from vilaserve.entrypoints.offline import demo

# SmolLM2-135M-Instruct, the demo LLM: what the shipped result must cover.
SMOLLM2_LAYERS = 30
SMOLLM2_HIDDEN = 576
SMOLLM2_INTERMEDIATE = 1536
SMOLLM2_KV_WIDTH = 3 * 64  # 3 KV heads of 64


@pytest.mark.parametrize("recipe", ["llm-awq", "vilaserve"])
def test_applying_a_saved_search_gives_the_searched_weights(
    recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama(kv_heads=2)
    # Four shrink steps: 16 two-sided candidates instead of 100, every code path still taken.
    config = RECIPES[recipe](group_size=GROUP, max_shrink_steps=4)
    # The search's own weights: each block copy as the search leaves it, scaled and clipped.
    searched_blocks: list[nn.Module] = []
    search_block = awq_quantizer._search_block

    def keep_the_searched_block(work: nn.Module, *args: object) -> None:
        search_block(work, *args)  # type: ignore[arg-type]
        searched_blocks.append(copy.deepcopy(work))

    monkeypatch.setattr(awq_quantizer, "_search_block", keep_the_searched_block)
    result = search_awq(copy.deepcopy(model), calibration(seed=1, blocks=2), config, False)
    assert len(searched_blocks) == 2 and result.clips and result.scale_searches

    save_awq_search(tmp_path / "search.safetensors", result)
    loaded, _ = load_awq_search(tmp_path / "search.safetensors")
    quantized, plain = apply_awq(model, loaded, config)

    for index, searched in enumerate(searched_blocks):
        applied = model.model.layers[index].state_dict()
        for name, tensor in searched.state_dict().items():
            assert torch.equal(applied[name], tensor), f"layer {index} {name}"
        for name in awq_quantizer.DECODER_LINEARS:
            expected = awq_quantizer.quantize_to_canonical(
                searched.get_submodule(name).weight, GROUP
            )
            got = quantized[f"model.layers.{index}.{name}"]
            assert torch.equal(got.q, expected.q), name
            assert torch.equal(got.scales, expected.scales), name
            assert torch.equal(got.zeros, expected.zeros), name
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.equal(plain[norm], searched_blocks[1].state_dict()["input_layernorm.weight"])


def test_a_result_naming_no_block_of_the_model_is_refused(tmp_path: Path) -> None:
    config = RECIPES["llm-awq"](group_size=GROUP)
    result = search_awq(tiny_llama(), calibration(seed=1, blocks=2), config, False)
    result.clips["model.layers.7.mlp.up_proj"] = result.clips["model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="2 decoder blocks"):
        apply_awq(tiny_llama(), result, config)


def _shipped_key() -> dict[str, object]:
    return json.loads(SHIPPED_PROVENANCE.read_text())["key"]


def test_the_shipped_result_belongs_to_the_checked_smollm2_wheel() -> None:
    assert _shipped_key()["smollm2_wheel_sha256"] == gguf_import.SMOLLM2_WHEEL_SHA256
    with safe_open(str(SHIPPED_RESULT), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["smollm2_wheel_sha256"] == gguf_import.SMOLLM2_WHEEL_SHA256


def test_the_shipped_result_fits_this_build(tmp_path: Path) -> None:
    # Everything the build keys it on (calibration text, recipe, group, blocks) is what the
    # build has now: a change to the calibration world or the settings needs a new search
    # (`vilaserve build-demo --search --save-search`), or every first build searches.
    calibration_file = tmp_path / "calibration.txt"
    calibration_file.write_text(
        "\n".join(calibration_lines(demo.CALIBRATION_LINES)) + "\n", encoding="utf-8"
    )
    key = demo._search_key(calibration_file)
    assert _shipped_key() == dataclasses.asdict(key)
    result, why_not = awq_search.shipped_result(key)
    assert result is not None, why_not


def test_the_shipped_result_covers_every_linear_the_quantizer_touches() -> None:
    result, _ = load_awq_search(SHIPPED_RESULT)
    widths = {
        "input_layernorm": SMOLLM2_HIDDEN,
        "post_attention_layernorm": SMOLLM2_HIDDEN,
        "mlp.up_proj": SMOLLM2_INTERMEDIATE,
    }
    # llm-awq's groups under GQA (no v -> o), in search order, layer by layer.
    expected_scales = [
        (f"model.layers.{i}.{prev_op}", width)
        for i in range(SMOLLM2_LAYERS)
        for prev_op, width in widths.items()
    ]
    assert [(s.prev_op, s.scales.numel()) for s in result.scale_searches] == expected_scales
    assert all(s.scales.dtype == torch.float32 for s in result.scale_searches)
    # Every linear but q/k is clipped: [output channels, input width / 64 groups].
    shapes = {
        "self_attn.v_proj": (SMOLLM2_KV_WIDTH, SMOLLM2_HIDDEN // 64),
        "self_attn.o_proj": (SMOLLM2_HIDDEN, SMOLLM2_HIDDEN // 64),
        "mlp.gate_proj": (SMOLLM2_INTERMEDIATE, SMOLLM2_HIDDEN // 64),
        "mlp.up_proj": (SMOLLM2_INTERMEDIATE, SMOLLM2_HIDDEN // 64),
        "mlp.down_proj": (SMOLLM2_HIDDEN, SMOLLM2_INTERMEDIATE // 64),
    }
    expected_clips = {
        f"model.layers.{i}.{name}": shape
        for i in range(SMOLLM2_LAYERS)
        for name, shape in shapes.items()
    }
    assert {name: tuple(c.top_steps.shape) for name, c in result.clips.items()} == expected_clips
    assert all(c.bottom_steps is None for c in result.clips.values())  # llm-awq: symmetric
    assert max(int(c.top_steps.max()) for c in result.clips.values()) < 10


def test_a_build_for_another_wheel_searches_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calibration_file = tmp_path / "calibration.txt"
    calibration_file.write_text(
        "\n".join(calibration_lines(demo.CALIBRATION_LINES)) + "\n", encoding="utf-8"
    )
    assert demo._shipped_search(calibration_file) is not None
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(gguf_import, "SMOLLM2_WHEEL_SHA256", "0" * 64)
    assert demo._shipped_search(calibration_file) is None
    [line] = capsys.readouterr().err.splitlines()
    assert "searching" in line and "smollm2 wheel sha256" in line and "0000" in line
