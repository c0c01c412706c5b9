"""W4A16 end to end: golden AWQ checkpoints through our loader and kernels, our quantizer's
output through the worker."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from shared_data import golden_dir
from test_worker_e2e import start_worker, stream_frames

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.loading import load_awq_llm
from vilaserve.adapters.worker.awq.qlinear import W4A16Linear
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.int8_embedding import Int8Embedding
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.entrypoints.offline.quantize import quantize_checkpoint


def shared_golden() -> Path:
    return golden_dir("tiny-llama-reference-logits.safetensors")


def golden_logits(golden: Path, source: Path, dtype: torch.dtype, backend: str) -> torch.Tensor:
    checkpoint = VilaCheckpoint.open(golden / "tiny-llama-dequant-fp16")
    model = load_awq_llm(checkpoint, str(source), dtype, torch.device("cpu"), backend)
    ids = load_file(str(golden / "tiny-llama-reference-logits.safetensors"))["input_ids"]
    with torch.inference_mode():
        return model(model.new_cache(ids.shape[0], ids.shape[1]), 0, input_ids=ids, last_only=False)


@pytest.mark.parametrize("source", ["tiny-llama-w4-g128-awq-v2.pt", "tiny-llama-awq-gemm"])
def test_golden_awq_checkpoints_reproduce_the_reference_logits(source: str) -> None:
    golden = shared_golden()
    reference = load_file(str(golden / "tiny-llama-reference-logits.safetensors"))["logits_fp32"]
    exact = golden_logits(golden, golden / source, torch.float32, "dequant")
    assert (exact - reference).abs().max() < 1e-3
    fast = golden_logits(golden, golden / source, torch.bfloat16, "auto")
    # bf16 activations move logits of this size (std ~1) by ~1e-2; argmax must agree where
    # the reference is not a near-tie.
    assert (fast - reference).abs().max() < 0.1
    top2 = reference.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 0.05
    assert torch.equal(fast.argmax(-1)[decisive], reference.argmax(-1)[decisive])


@pytest.fixture(scope="module")
def quantized_vila(tiny_vila_siglip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_tiny(tiny_vila_siglip, tmp_path_factory, group_size=32)


@pytest.fixture(scope="module")
def quantized_vila_g64(tiny_vila_siglip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Group 64: the shapes the native int4 kernels take (group % 64 == 0)."""
    return quantize_tiny(tiny_vila_siglip, tmp_path_factory, group_size=64)


def quantize_tiny(
    tiny_vila_siglip: Path, tmp_path_factory: pytest.TempPathFactory, group_size: int
) -> Path:
    calib = tmp_path_factory.mktemp("calib") / "calibration.txt"
    calib.write_text(
        "\n".join(f"The cat number {i} sat on a red mat near the river." for i in range(64))
    )
    output = tmp_path_factory.mktemp(f"awq-g{group_size}") / "VILA1.5-tiny-siglip"
    args = argparse.Namespace(
        model_path=str(tiny_vila_siglip),
        output=str(output),
        w_bit=4,
        group_size=group_size,
        calib=str(calib),
        n_samples=64,
        seqlen=32,
        no_search=False,
        recipe="vilaserve",
        export_tinychat=True,
        device="cpu",
        seed=0,
    )
    return quantize_checkpoint(args)


def test_both_written_formats_load_to_the_same_model(quantized_vila: Path) -> None:
    checkpoint = VilaCheckpoint.open(quantized_vila)
    [pickle] = sorted(checkpoint.llm_dir.glob("*awq-v2.pt"))
    ids = torch.arange(5, 37).unsqueeze(0)
    outputs = []
    for source in (checkpoint.llm_dir, pickle):
        model = load_awq_llm(checkpoint, str(source), torch.float32, torch.device("cpu"), "dequant")
        outputs.append(model(model.new_cache(1, 32), 0, input_ids=ids, last_only=False))
    assert torch.equal(outputs[0], outputs[1])
    assert (checkpoint.root / "vision_tower" / "preprocessor_config.json").is_file()
    assert (checkpoint.llm_dir / "tokenizer.json").is_file()


def test_the_demo_recipe_trains_through_a_plain_copy_of_the_4bit_llm(quantized_vila: Path) -> None:
    from vilaserve.adapters.offline.demo.training import differentiable_awq_llm

    checkpoint = VilaCheckpoint.open(quantized_vila)
    served = load_awq_llm(checkpoint, None, torch.bfloat16, torch.device("cpu"), "dequant")
    plain = differentiable_awq_llm(quantized_vila)
    assert not any("W4A16" in type(m).__name__ for m in plain.modules())
    ids = torch.arange(5, 21).unsqueeze(0)
    with torch.no_grad():
        expected = served(served.new_cache(1, 16), 0, input_ids=ids, last_only=False)
    embeds = plain.embed(ids).detach().requires_grad_(True)
    got = plain(plain.new_cache(1, 16), 0, inputs_embeds=embeds, last_only=False)
    assert torch.allclose(got.float(), expected.float(), atol=1e-2)
    got.float().logsumexp(-1).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_worker_serves_w4a16(quantized_vila: Path) -> None:
    checkpoint = VilaCheckpoint.open(quantized_vila)
    [pickle] = sorted(checkpoint.llm_dir.glob("*awq-v2.pt"))
    with start_worker(quantized_vila, precision="W4A16", quant_path=str(pickle)) as server:
        status = httpx.post(server.url + "/worker_get_status").json()
        assert status["model_names"] == ["VILA1.5-tiny-siglip-4bit-AWQ"]
        prompt = "USER: <image>\nWhat is it? ASSISTANT:"
        body = {
            "prompt": prompt,
            "images": [base64.b64encode(make_png(32, 32, "red")).decode()],
            "temperature": 0,
            "max_new_tokens": 8,
        }
        frames = stream_frames(server.url, body)
        assert frames[-1]["error_code"] == 0
        assert frames[-1]["text"].startswith(prompt)
        assert frames[-1]["usage"]["completion_tokens"] >= 1


def test_runtime_stores_the_embedding_table_in_int8_unless_told(quantized_vila: Path) -> None:
    logits = {}
    for bits in (8, 16):
        runtime = VilaRuntime.load(
            VilaRuntimeOptions(str(quantized_vila), precision="W4A16", dtype="bfloat16",
                               embedding_bits=bits)
        )  # fmt: skip
        model = runtime.model_runner.model
        assert isinstance(model.model.embed_tokens, Int8Embedding) == (bits == 8)
        ids = torch.arange(5, 37).unsqueeze(0)
        with torch.inference_mode():
            logits[bits] = model(model.new_cache(1, 32), 0, input_ids=ids, last_only=False)
        runtime.executor.shutdown()
    assert float((logits[8] - logits[16]).abs().max()) < 0.05 * float(logits[16].abs().max())


def test_a_4bit_checkpoint_loaded_as_16_bit_is_refused_with_the_fix(quantized_vila: Path) -> None:
    with pytest.raises(ValueError, match=r"AWQ checkpoint.*--precision W4A16"):
        VilaRuntime.load(VilaRuntimeOptions(str(quantized_vila), precision="W16A16"))


@pytest.mark.parametrize(("lines", "warned"), [(4, True), (64, False)])
def test_too_little_calibration_text_is_warned_about(
    tiny_vila_siglip: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    lines: int,
    warned: bool,
) -> None:
    calib = tmp_path / "calibration.txt"
    calib.write_text("\n".join(f"The cat number {i} sat on a red mat." for i in range(64)))
    args = argparse.Namespace(
        model_path=str(tiny_vila_siglip),
        output=str(tmp_path / "out"),
        w_bit=4,
        group_size=32,
        calib=str(calib),
        n_samples=lines,
        seqlen=32,
        no_search=False,
        recipe="vilaserve",
        export_tinychat=False,
        device="cpu",
        seed=0,
    )
    with caplog.at_level("WARNING", logger="vilaserve.entrypoints.offline.quantize"):
        quantize_checkpoint(args)
    warnings = [r for r in caplog.records if "little calibration text" in r.getMessage()]
    assert bool(warnings) == warned
    if warned:
        assert warnings[0].calibration_blocks < 16  # type: ignore[attr-defined]
        assert "--n-samples" in warnings[0].getMessage()


W4A16_PATHS = {
    "torch": ("cpu_int4", "dequant"),
    "fp32": ("cpu_fp32",),  # avx2 on x86, neon(_dotprod) on ARM
    "avx512_bf16": ("cpu_avx512",),
}


@pytest.mark.parametrize("path", list(W4A16_PATHS))
def test_w4a16_runs_on_every_cpu_path_this_machine_has(
    path: str, quantized_vila_g64: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 compute (what `auto` picks where bf16 is emulated): the 4-bit layers take the
    path's kernel, and greedy logits agree with the same model on the reference backend."""
    fp32 = cpu_kernels.fp32_kernels()
    usable = {"torch": True, "fp32": fp32, "avx512_bf16": cpu_kernels.avx512_kernels()}
    if not usable[path]:
        pytest.skip(f"this CPU cannot run the {path} kernels")
    backends_of_path = W4A16_PATHS[path]
    if path == "fp32" and fp32 is not None:
        path = fp32.path
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    runtime = VilaRuntime.load(
        VilaRuntimeOptions(str(quantized_vila_g64), precision="W4A16", dtype="float32")
    )
    model = runtime.model_runner.model
    assert runtime.model_runner.compute_path == path
    backends = {m.backend for m in model.modules() if isinstance(m, W4A16Linear)}
    assert backends and backends <= set(backends_of_path), backends
    reference = load_awq_llm(VilaCheckpoint.open(quantized_vila_g64), None, torch.float32, "cpu")
    for module in reference.modules():
        if isinstance(module, W4A16Linear):
            module._impl = module._forward_dequant  # the dequantize-then-F.linear oracle
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.inference_mode():
        got = model(model.new_cache(1, 40), 0, input_ids=ids, last_only=False)
        want = reference(reference.new_cache(1, 40), 0, input_ids=ids, last_only=False)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    runtime.executor.shutdown()
