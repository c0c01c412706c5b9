"""The benchmark checkpoints at a released model's shape, built small: the worker serves the
W4A16 directory, and the GGUF's tensors have the shapes and types llama.cpp expects."""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine_wiring import engine_generator

from vilaserve.adapters.offline.checkpoints.shaped_vila import (
    VilaShape,
    build_shaped_vila,
    write_q4_0_gguf,
)
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.domain.shared.generation import SamplingParams

SMALL = VilaShape(
    vocab=1024, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, context=256,
    vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=2,
    image_size=56, patch_size=14,
)  # fmt: skip


def test_the_shaped_checkpoint_serves_in_w4a16(tmp_path: Path) -> None:
    root = build_shaped_vila(tmp_path / "shaped", SMALL)
    runtime = VilaRuntime.load(VilaRuntimeOptions(model_path=str(root), precision="W4A16"))
    assert runtime.vision_encoder is not None
    assert runtime.vision_encoder.tokens_per_image == 4  # 4 x 4 patches, 2 x 2 downsampled
    params = SamplingParams(temperature=0, max_new_tokens=5)

    async def generate() -> list[int]:
        steps = engine_generator(runtime).generate("USER: hi ASSISTANT:", None, params)
        return [s.completion_tokens async for s in steps]

    assert asyncio.run(generate())[-1] >= 1


def test_the_gguf_has_llama_cpp_names_shapes_and_q4_0(tmp_path: Path) -> None:
    import gguf

    path = write_q4_0_gguf(tmp_path / "shaped.gguf", SMALL)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + SMALL.layers * 9
    q = tensors["blk.1.ffn_down.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert list(q.shape) == [SMALL.intermediate, SMALL.hidden]  # GGUF lists ne0 (in) first
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert reader.fields["llama.block_count"].parts[-1][0] == SMALL.layers
