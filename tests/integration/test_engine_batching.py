"""The engine on the real model: batched decode at per-row positions on every CPU path this
machine runs, and requests that give the same tokens batched as alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from engine_wiring import engine_generator
from test_cpu_paths import PATHS
from test_qlinear import rel_err, rtn_weights, tiny_args

from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.domain.shared.generation import SamplingParams

# (W4A16 backend, model dtype) per CPU path: what the worker loads on each.
PATH_MODELS = {"torch": ("dequant", torch.float32), "avx512_bf16": ("cpu_avx512", torch.bfloat16)}


def model_on(path: str, quantized: bool, monkeypatch: pytest.MonkeyPatch) -> Llama:
    """The model as the worker serves it on `path`."""
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    backend, dtype = PATH_MODELS.get(path, ("cpu_fp32", torch.float32))
    torch.manual_seed(0)
    # Weights exactly 16-bit, as every checkpoint stores them (the fp32 path keeps them so).
    model = Llama(tiny_args(hidden=128, inter=256)).to(torch.bfloat16).to(dtype)
    model.eval().requires_grad_(False)
    if quantized:
        quantize_model_linears(model, rtn_weights(model, group=64), dtype, "cpu", backend)
        model.fuse_projections(fuse_w4a16)
    report = put_on_cpu_path(model)
    assert report.path == path and report.native_decode == (path != "torch")
    return model


@pytest.mark.parametrize("quantized", [True, False], ids=["w4a16", "w16a16"])
@pytest.mark.parametrize("path", PATHS)
def test_rows_at_different_positions_decode_as_each_would_alone(
    path: str, quantized: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = model_on(path, quantized, monkeypatch)
    lengths, cache_rows = [5, 17, 1, 30], [3, 0, 5, 1]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (1, n), generator=gen) for n in lengths]
    nexts = torch.randint(0, 512, (len(lengths),), generator=gen)
    with torch.inference_mode():
        want = []
        for prompt, token in zip(prompts, nexts, strict=True):
            cache = model.new_cache(1, 64)
            model(cache, 0, input_ids=prompt)
            want.append(model(cache, prompt.shape[1], input_ids=token.view(1, 1))[0, -1])
        pool = model.new_cache(6, 64)
        for prompt, cache_row in zip(prompts, cache_rows, strict=True):
            model(pool.row(cache_row), 0, input_ids=prompt)
        got = model.decode_rows(
            pool, torch.tensor(cache_rows), torch.tensor(lengths), nexts
        )  # one step for all four rows
        again = model.decode_rows(  # and the next position, fed back, still per row
            pool, torch.tensor(cache_rows), torch.tensor(lengths) + 1, got.argmax(-1)
        )
    tolerance = 2e-2 if model.dtype == torch.bfloat16 else 1e-5
    assert rel_err(got, torch.stack(want)) < tolerance
    assert torch.isfinite(again).all()


def run(generator, prompts: list[str], params: SamplingParams, stagger_s: float) -> list[str]:  # type: ignore[no-untyped-def]
    async def one(i: int) -> str:
        await asyncio.sleep(stagger_s * i)
        return "".join([s.text async for s in generator.generate(prompts[i], None, params)])

    async def all_of_them() -> list[str]:
        try:
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
        finally:
            await generator.close()

    return asyncio.run(all_of_them())


PROMPTS = [
    "USER: " + " ".join(["hello"] * n) + f" number {n} ASSISTANT:"
    for n in (1, 9, 3, 30, 5, 14, 2, 60)
]


@pytest.fixture(scope="module")
def fp32_runtime(tiny_vila_siglip: Path) -> VilaRuntime:
    return VilaRuntime.load(
        VilaRuntimeOptions(model_path=str(tiny_vila_siglip), dtype="float32", kv_slots=8)
    )


def test_greedy_tokens_are_the_same_batched_with_others_joining_as_alone(
    fp32_runtime: VilaRuntime,
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=24)
    alone = [
        run(engine_generator(fp32_runtime, max_num_seqs=1), [p], params, 0)[0] for p in PROMPTS
    ]
    batched = run(
        engine_generator(fp32_runtime, max_num_seqs=8, prefill_chunk_while_decoding=8),
        PROMPTS,
        params,
        stagger_s=0.01,  # requests join while others decode; prompts arrive in chunks
    )
    assert batched == alone
    assert all(alone)


def test_seeded_sampling_gives_the_same_text_alone_and_batched(fp32_runtime: VilaRuntime) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=16)
    alone = run(engine_generator(fp32_runtime, max_num_seqs=1), PROMPTS[:1], params, 0)
    batched = run(engine_generator(fp32_runtime, max_num_seqs=4), PROMPTS[:4], params, 0.005)
    assert batched[0] == alone[0]
