"""Loader and generation pieces of the torch adapter that the HTTP tests do not pin down."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_wiring import engine_generator

from vilaserve.adapters.offline.checkpoints.tiny_vila import build_tiny_vila
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint, safetensors_files
from vilaserve.adapters.worker.torch_vila.device import cpu_computes_bf16_natively
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.adapters.worker.torch_vila.sampling import Sampler
from vilaserve.domain.shared.generation import SamplingParams


def test_stale_index_of_awq_releases_is_tolerated(tiny_vila_siglip: Path, tmp_path: Path) -> None:
    llm = tmp_path / "llm"
    shutil.copytree(tiny_vila_siglip / "llm", llm)
    shards = sorted(llm.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((llm / "model.safetensors.index.json").read_text())
    # Merge the shards into one file, leaving the index pointing at files that are gone.
    from safetensors.torch import load_file, save_file

    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(str(shard)))
        shard.unlink()
    save_file(merged, str(llm / "model.safetensors"))
    assert set(index["weight_map"].values()) != {"model.safetensors"}
    assert safetensors_files(llm) == [llm / "model.safetensors"]


def test_only_a_pickle_in_llm_says_how_to_load_it(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "x.safetensors"}}')
    (tmp_path / "vila-1.5-3b-w4-g128-awq-v2.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        safetensors_files(tmp_path)
    message = str(info.value)
    assert "index names shards that do not exist" in message
    assert "--quant-path" in message and "awq-v2.pt" in message


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        VilaCheckpoint.open(tmp_path)


def test_chatml_tokenizer_template_is_chosen_and_its_end_token_stops(tmp_path: Path) -> None:
    root = build_tiny_vila(tmp_path / "vila-chatml", "siglip", seed=3, tokenizer_kind="chatml")
    runtime = VilaRuntime.load(VilaRuntimeOptions(model_path=str(root), dtype="float32"))
    generator = engine_generator(runtime)
    template = generator.conversation_template
    assert template.name == "tokenizer"
    assert template.chat_template is not None
    assert 4 in template.stop_token_ids  # <|im_end|>
    assert 2 in template.stop_token_ids  # </s>, the tokenizer's eos
    overridden = VilaRuntime.load(
        VilaRuntimeOptions(model_path=str(root), dtype="float32", conv_template="hermes-2")
    )
    assert overridden.model_runner.conversation_template.name == "hermes-2"


def test_im_start_end_checkpoints_need_the_tokens(tmp_path: Path) -> None:
    root = build_tiny_vila(tmp_path / "vila-wrap", "siglip", seed=4)
    config = json.loads((root / "config.json").read_text())
    config["mm_use_im_start_end"] = True
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no <im_start>, <im_end> token"):
        VilaRuntime.load(VilaRuntimeOptions(model_path=str(root), dtype="float32"))


def test_w4a16_without_awq_weights_says_what_is_missing(tiny_vila_siglip: Path) -> None:
    with pytest.raises(FileNotFoundError, match="needs AWQ weights: pass --quant-path"):
        VilaRuntime.load(VilaRuntimeOptions(model_path=str(tiny_vila_siglip), precision="W4A16"))


def test_cpu_default_dtype_is_the_one_its_cpu_path_computes_in(tiny_vila_siglip: Path) -> None:
    """bf16 on the AVX-512 kernels, fp32 on the AVX2 / NEON ones, and on PyTorch's own kernels
    bf16 only where the CPU computes it natively."""
    runtime = VilaRuntime.load(VilaRuntimeOptions(model_path=str(tiny_vila_siglip), device="cpu"))
    parameter = next(runtime.model_runner.model.parameters())
    path = cpu_kernels.cpu_path()
    if path == "avx512_bf16":
        assert parameter.dtype == torch.bfloat16
    elif path == "torch":
        native = cpu_computes_bf16_natively()
        assert parameter.dtype == (torch.bfloat16 if native else torch.float32)
    else:
        assert parameter.dtype == torch.float32


LOGITS = torch.tensor([0.0, 3.0, 2.9, 1.0, -2.0])


def draw(params: SamplingParams, n: int = 400) -> list[int]:
    sampler = Sampler(params, torch.device("cpu"))
    return [int(sampler(LOGITS)) for _ in range(n)]


def test_greedy_and_degenerate_sampling_pick_the_argmax() -> None:
    assert set(draw(SamplingParams(temperature=0.0), 5)) == {1}
    assert set(draw(SamplingParams(temperature=1.0, top_k=1), 50)) == {1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.01), 50)) == {1}


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {1, 2}
    # Softmax mass of tokens 1 and 2 is about 0.86: top_p 0.8 keeps exactly those two.
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.8))) == {1, 2}
    assert len(set(draw(SamplingParams(temperature=5.0)))) == 5


def test_seed_reproduces_and_differs() -> None:
    a = draw(SamplingParams(temperature=1.5, seed=11), 50)
    b = draw(SamplingParams(temperature=1.5, seed=11), 50)
    c = draw(SamplingParams(temperature=1.5, seed=12), 50)
    assert a == b
    assert a != c


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_logits_match_cpu_fp32_and_generation_runs(tiny_vila_siglip: Path) -> None:
    import asyncio

    from vilaserve.adapters.worker.torch_vila.runtime import load_llm

    checkpoint = VilaCheckpoint.open(tiny_vila_siglip)
    ids = torch.arange(3, 40).unsqueeze(0)
    logits = []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
        model = load_llm(checkpoint, dtype, torch.device(device))
        cache = model.new_cache(1, ids.shape[1])
        logits.append(model(cache, 0, input_ids=ids.to(device), last_only=False).cpu())
    assert (logits[0] - logits[1]).abs().max() < 2e-2  # fp16 rounding on ~0.2-sized logits

    runtime = VilaRuntime.load(
        VilaRuntimeOptions(model_path=str(tiny_vila_siglip), device="cuda", dtype="auto")
    )

    async def generate() -> list:
        params = SamplingParams(temperature=0.7, max_new_tokens=8, seed=1)
        steps = engine_generator(runtime).generate("USER: hi ASSISTANT:", None, params)
        return [s async for s in steps]

    steps = asyncio.run(generate())
    assert steps[-1].finish_reason in ("stop", "length")


def test_ignore_eos_leaves_only_the_requests_own_stop_tokens(tiny_vila_siglip: Path) -> None:
    options = VilaRuntimeOptions(model_path=str(tiny_vila_siglip), dtype="float32")
    runtime = VilaRuntime.load(options)
    runner = runtime.model_runner
    usual = runner.prepare("USER: hi ASSISTANT:", None, SamplingParams(stop_token_ids=(7,)))
    ignoring = runner.prepare(
        "USER: hi ASSISTANT:", None, SamplingParams(stop_token_ids=(7,), ignore_eos=True)
    )
    assert len(usual.stop_token_ids) > 1  # the model's own end tokens, and 7
    assert ignoring.stop_token_ids == frozenset({7})
