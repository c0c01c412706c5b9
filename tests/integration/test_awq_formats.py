"""AWQ packings against golden files written by the real llm-awq / AutoAWQ packers.

Byte-for-byte re-packing of the golden canonical data is the proof that our layouts are the
anchors' layouts; the logits check proves the unpacked numbers drive a real Llama correctly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from shared_data import golden_dir

from vilaserve.adapters.offline.awq_checkpoint_writing import (
    pack_gemm,
    pack_gemv,
    pack_v2,
    save_hf_awq_directory,
    save_tinychat_checkpoint,
)
from vilaserve.adapters.worker.awq.checkpoint_reading import (
    load_hf_awq_directory,
    load_tinychat_checkpoint,
)
from vilaserve.adapters.worker.awq.formats import (
    detect_layer_format,
    padded_group_count,
    unpack_gemm,
    unpack_gemv,
    unpack_v2,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

V2_FILE = "tiny-llama-w4-g128-awq-v2.pt"
GEMM_DIR = "tiny-llama-awq-gemm"
PLAIN_NAMES = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *(
        f"model.layers.{i}.{n}_layernorm.weight"
        for i in range(2)
        for n in ("input", "post_attention")
    ),
}


def shared_golden() -> Path:
    return golden_dir("tiny-llama-int4-canonical.safetensors")


@pytest.fixture(scope="module")
def golden() -> Path:
    return shared_golden()


@pytest.fixture(scope="module")
def canonical(golden: Path) -> dict[str, QuantizedWeight]:
    raw = load_file(str(golden / "tiny-llama-int4-canonical.safetensors"))
    modules = sorted({key.rsplit(".", 1)[0] for key in raw})
    return {
        m: QuantizedWeight(raw[f"{m}.intweight"], raw[f"{m}.scales"], raw[f"{m}.zeros"], 128)
        for m in modules
    }


@pytest.fixture(scope="module")
def v2_state(golden: Path) -> dict[str, torch.Tensor]:
    return torch.load(golden / V2_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def gemm_state(golden: Path) -> dict[str, torch.Tensor]:
    return load_file(str(golden / GEMM_DIR / "model.safetensors"))


def expected_shapes(canonical: dict[str, QuantizedWeight]) -> dict[str, tuple[int, int]]:
    return {m: (w.out_features, w.in_features) for m, w in canonical.items()}


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert a.group_size == b.group_size
    assert a.q.dtype == b.q.dtype == torch.uint8 and torch.equal(a.q, b.q)
    assert a.zeros.dtype == b.zeros.dtype == torch.uint8 and torch.equal(a.zeros, b.zeros)
    assert a.scales.dtype == b.scales.dtype and torch.equal(a.scales, b.scales)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes()
    )


# ---------------------------------------------------------------- (1)-(3) golden layouts


def test_unpack_golden_v2_equals_canonical(canonical, v2_state, golden: Path) -> None:
    for m, want in canonical.items():
        got = unpack_v2(
            v2_state[f"{m}.qweight"], v2_state[f"{m}.scales"], v2_state[f"{m}.scaled_zeros"], 128
        )
        assert_same(got, want)
    quantized, _ = load_tinychat_checkpoint(golden / V2_FILE, 128, expected_shapes(canonical))
    assert sorted(quantized) == sorted(canonical)
    for m, want in canonical.items():
        assert_same(quantized[m], want)


def test_unpack_golden_gemm_equals_canonical(canonical, gemm_state, golden: Path) -> None:
    for m, want in canonical.items():
        got = unpack_gemm(
            gemm_state[f"{m}.qweight"], gemm_state[f"{m}.qzeros"], gemm_state[f"{m}.scales"], 128
        )
        assert_same(got, want)
    quantized, _ = load_hf_awq_directory(golden / GEMM_DIR, expected_shapes(canonical))
    assert sorted(quantized) == sorted(canonical)
    for m, want in canonical.items():
        assert_same(quantized[m], want)


def test_pack_reproduces_golden_bytes(canonical, v2_state, gemm_state) -> None:
    for m, w in canonical.items():
        v2 = pack_v2(w)
        assert set(v2) == {"qweight", "scales", "scaled_zeros"}
        for leaf, tensor in v2.items():
            assert same_bytes(tensor, v2_state[f"{m}.{leaf}"]), f"v2 {m}.{leaf}"
        gemm = pack_gemm(w)
        assert set(gemm) == {"qweight", "qzeros", "scales"}
        for leaf, tensor in gemm.items():
            assert same_bytes(tensor, gemm_state[f"{m}.{leaf}"]), f"gemm {m}.{leaf}"


# ---------------------------------------------------------------- (4) GEMV / v1


def test_gemv_round_trip_and_v1_checkpoint(canonical, v2_state, tmp_path: Path) -> None:
    v1_state: dict[str, torch.Tensor] = {}
    for m, w in canonical.items():
        packed = pack_gemv(w)
        # [N, K/8] qweight, [N, Gp/8] qzeros, [N, Gp] scales with Gp = 8 for K <= 1024.
        assert packed["qweight"].shape == (w.out_features, w.in_features // 8)
        assert packed["scales"].shape == (w.out_features, 8)
        assert packed["qzeros"].shape == (w.out_features, 1)
        assert detect_layer_format(packed, None) == "gemv"
        got = unpack_gemv(packed["qweight"], packed["qzeros"], packed["scales"], 128, w.in_features)
        assert_same(got, w)
        v1_state.update({f"{m}.{leaf}": t for leaf, t in packed.items()})
    v1_state.update({k: v for k, v in v2_state.items() if k in PLAIN_NAMES})
    torch.save(v1_state, tmp_path / "tiny-w4-g128-awq.pt")
    quantized, plain = load_tinychat_checkpoint(
        tmp_path / "tiny-w4-g128-awq.pt", expected_shapes=expected_shapes(canonical)
    )
    for m, w in canonical.items():
        assert_same(quantized[m], w)
    assert set(plain) == PLAIN_NAMES


# ---------------------------------------------------------------- (5) plain tensors


def test_loaders_return_plain_tensors_from_the_file(golden: Path, v2_state, gemm_state) -> None:
    _, plain_v2 = load_tinychat_checkpoint(golden / V2_FILE)
    _, plain_gemm = load_hf_awq_directory(golden / GEMM_DIR)
    assert set(plain_v2) == set(plain_gemm) == PLAIN_NAMES
    for name in PLAIN_NAMES:
        assert same_bytes(plain_v2[name], v2_state[name])
        assert same_bytes(plain_gemm[name], gemm_state[name])


# ---------------------------------------------------------------- (6) reference logits


@pytest.mark.parametrize("source", [V2_FILE, GEMM_DIR])
def test_dequantized_weights_reproduce_reference_logits(golden: Path, source: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = golden / source
    if path.is_dir():
        quantized, plain = load_hf_awq_directory(path)
    else:
        quantized, plain = load_tinychat_checkpoint(path)
    state = {f"{m}.weight": w.dequantize(torch.float32) for m, w in quantized.items()}
    state.update({k: v.to(torch.float32) for k, v in plain.items()})

    config = LlamaConfig.from_pretrained(golden / "tiny-llama-dequant-fp16")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(state, strict=True)
    ref = load_file(str(golden / "tiny-llama-reference-logits.safetensors"))
    with torch.inference_mode():
        logits = model(input_ids=ref["input_ids"]).logits
    assert (logits.float() - ref["logits_fp32"]).abs().max().item() < 1e-3


# ---------------------------------------------------------------- (7) corrupt inputs


def _corrupt_v2(tmp_path: Path, v2_state, key: str, tensor: torch.Tensor) -> Path:
    state = dict(v2_state)
    state[key] = tensor
    path = tmp_path / "bad-w4-g128-awq-v2.pt"
    torch.save(state, path)
    return path


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("leaf", "make", "expect"),
    [
        ("qweight", lambda t: t[:-1].clone(), "(64, 256)"),  # truncated rows
        ("qweight", lambda t: t.to(torch.int32), "int16"),  # wrong dtype
        ("scales", lambda t: t[:4].clone(), "(8, 256)"),  # wrong padded shape
        ("scales", lambda t: torch.where(t == 0, t, t.new_tensor(float("nan"))), "NaN"),
        ("scales", lambda t: -t, "negative"),
        ("scaled_zeros", lambda t: t * 40, "0..15"),  # zeros out of range
    ],
)
def test_corrupt_v2_tensor_is_refused_with_file_tensor_and_expectation(
    v2_state, tmp_path: Path, leaf: str, make, expect: str
) -> None:
    path = _corrupt_v2(tmp_path, v2_state, f"{Q}.{leaf}", make(v2_state[f"{Q}.{leaf}"]))
    with pytest.raises(ValueError) as info:
        load_tinychat_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and f"{Q}.{leaf}" in message and expect in message, message


def test_shape_mismatch_against_expected_shapes(golden: Path, canonical) -> None:
    shapes = expected_shapes(canonical)
    shapes[Q] = (256, 512)  # a config whose hidden size does not match the file
    with pytest.raises(ValueError) as info:
        load_tinychat_checkpoint(golden / V2_FILE, expected_shapes=shapes)
    message = str(info.value)
    assert V2_FILE in message and f"{Q}.qweight" in message and "(64, 512)" in message, message
    with pytest.raises(ValueError) as info:
        load_hf_awq_directory(golden / GEMM_DIR, expected_shapes=shapes)
    message = str(info.value)
    assert "model.safetensors" in message and f"{Q}." in message and "512" in message, message


def test_truncated_gemm_qweight_is_refused(golden: Path, gemm_state, tmp_path: Path) -> None:
    folder = tmp_path / "gemm"
    shutil.copytree(golden / GEMM_DIR, folder)
    state = dict(gemm_state)
    state[f"{Q}.qweight"] = state[f"{Q}.qweight"][:100].clone()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_hf_awq_directory(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message, message
    assert f"{Q}.qweight" in message and "(256, 32)" in message, message


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"bits": 8}, "4-bit"),
        ({"zero_point": False}, "zero_point"),
        ({"version": "exllama"}, "version"),
        ({"quant_method": "gptq"}, "awq"),
    ],
)
def test_unsupported_awq_config_is_refused(golden: Path, tmp_path: Path, change, expect) -> None:
    folder = tmp_path / "gemm"
    shutil.copytree(golden / GEMM_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=expect) as info:
        load_hf_awq_directory(folder)
    assert "config.json" in str(info.value)


def test_garbage_files_are_refused_naming_the_file(golden: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk-awq-v2.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable torch checkpoint") as info:
        load_tinychat_checkpoint(junk)
    assert str(junk) in str(info.value)

    half = tmp_path / "half-awq-v2.pt"
    data = (golden / V2_FILE).read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(half)):
        load_tinychat_checkpoint(half)

    folder = tmp_path / "gemm"
    shutil.copytree(golden / GEMM_DIR, folder)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable safetensors") as info:
        load_hf_awq_directory(folder)
    assert str(folder / "model.safetensors") in str(info.value)

    # VILA's AWQ repos ship an fp16 shard index next to the .pt: name the missing shard.
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ValueError, match="model-00001-of-00002"):
        load_hf_awq_directory(folder)


# ---------------------------------------------------------------- (8) random round trips


def random_weight(n: int, k: int, group: int, seed: int, bias: bool = False) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    return QuantizedWeight(
        q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).to(torch.float16),
        zeros=torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8),
        group_size=group,
        bias=torch.randn(n, generator=gen).to(torch.float16) if bias else None,
    )


def test_padded_group_count_matches_llm_awq() -> None:
    # The reference table (g128) and the g64 / g32 multipliers: K padded to 1024 columns.
    table = {2560: 24, 4096: 32, 5120: 40, 6912: 56, 7168: 56, 11008: 88, 13824: 112}
    for k, gp in table.items():
        assert padded_group_count(k, 128) == gp
        assert padded_group_count(k, 64) == 2 * gp
        assert padded_group_count(k, 32) == 4 * gp
    assert padded_group_count(1152, 64) == 32  # 18 groups -> 3 words -> 4 (multiple of 2)
    assert padded_group_count(1152, 32) == 64  # 36 groups -> 5 words -> 8 (multiple of 4)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("n", "k"), [(104, 384), (200, 1152), (56, 2176)])
def test_random_round_trips(group: int, n: int, k: int) -> None:
    w = random_weight(n, k, group, seed=n + k + group, bias=True)
    v2 = pack_v2(w)
    assert v2["qweight"].dtype == torch.int16 and v2["qweight"].shape == (n // 4, k)
    gp = padded_group_count(k, group)
    assert v2["scales"].shape == v2["scaled_zeros"].shape == (gp, n)
    assert not v2["scales"][k // group :].any() and not v2["scaled_zeros"][k // group :].any()
    assert detect_layer_format(v2) == "v2"
    assert_same(unpack_v2(v2["qweight"], v2["scales"], v2["scaled_zeros"], group), w)

    gemm = pack_gemm(w)
    assert gemm["qweight"].shape == (k, n // 8) and gemm["scales"].shape == (k // group, n)
    assert detect_layer_format(gemm) == "gemm"
    assert_same(unpack_gemm(gemm["qweight"], gemm["qzeros"], gemm["scales"], group), w)

    gemv = pack_gemv(w)
    assert gemv["scales"].shape == (n, gp) and gemv["qzeros"].shape == (n, gp // 8)
    assert detect_layer_format(gemv) == "gemv"
    assert_same(unpack_gemv(gemv["qweight"], gemv["qzeros"], gemv["scales"], group, k), w)


def test_detect_prefers_config_version() -> None:
    w = random_weight(256, 256, 128, seed=3)  # square: qweight shapes alone are ambiguous
    gemv = pack_gemv(w)
    assert detect_layer_format(gemv, {"quantization_config": {"version": "gemv"}}) == "gemv"
    assert detect_layer_format(pack_gemm(w), {"version": "GEMM"}) == "gemm"


def test_large_layer_unpacks_quickly() -> None:
    w = random_weight(2560, 6912, 128, seed=1)
    packed = pack_v2(w)
    started = time.perf_counter()
    unpack_v2(packed["qweight"], packed["scales"], packed["scaled_zeros"], 128)
    # ~0.1 s on one idle core; the bound only catches a per-element Python loop (minutes).
    assert time.perf_counter() - started < 5.0


def _model_like(group: int) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    quantized = {
        "model.layers.0.self_attn.q_proj": random_weight(128, 256, group, seed=1),
        "model.layers.0.mlp.down_proj": random_weight(256, 512, group, seed=2),
        "model.layers.0.mlp.up_proj": random_weight(512, 256, group, seed=3),
    }
    embed = torch.randn(64, 256)
    plain = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed,  # tied: shares storage, which safetensors must not see
        "model.norm.weight": torch.rand(256).to(torch.bfloat16),
    }
    return quantized, plain


@pytest.mark.parametrize("group", [32, 128])
def test_writers_round_trip(tmp_path: Path, group: int) -> None:
    quantized, plain = _model_like(group)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256}
    save_hf_awq_directory(tmp_path / "hf", quantized, plain, config, group)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["hidden_size"] == 256
    assert written["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
        "w_bit": 4,
        "q_group_size": group,
    }
    pt = tmp_path / f"tiny-w4-g{group}-awq-v2.pt"
    save_tinychat_checkpoint(pt, quantized, plain, group)
    raw = torch.load(pt, weights_only=True)
    assert raw["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int16
    assert raw["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16

    shapes = {m: (w.out_features, w.in_features) for m, w in quantized.items()}
    # The .pt carries no group size: the default g128 hint must still find g32 from the padding.
    loaded = [
        load_hf_awq_directory(tmp_path / "hf", expected_shapes=shapes),
        load_tinychat_checkpoint(pt, expected_shapes=shapes),
    ]
    for got_q, got_plain in loaded:
        assert sorted(got_q) == sorted(quantized)
        for m, w in quantized.items():
            assert_same(got_q[m], w)
        assert set(got_plain) == set(plain)
        assert torch.equal(got_plain["model.embed_tokens.weight"], plain["lm_head.weight"].half())
        assert got_plain["model.norm.weight"].dtype == torch.bfloat16  # bf16 kept (fp16 range)


def test_sharded_hf_directory(tmp_path: Path) -> None:
    quantized, plain = _model_like(128)
    folder = tmp_path / "hf"
    save_hf_awq_directory(folder, quantized, plain, {}, 128)
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got_q, got_plain = load_hf_awq_directory(folder)
    for m, w in quantized.items():
        assert_same(got_q[m], w)
    assert set(got_plain) == set(plain)
