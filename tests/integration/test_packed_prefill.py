"""Several prompts' chunks prefilled in one forward (`Llama.prefill_packed`, the engine's step
when it holds more than one chunk) give what prefilling each chunk alone gives."""

from __future__ import annotations

import pytest
import torch

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.torch_vila.cpu_path import put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

ARGS = LlamaArgs(
    vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=128,
)  # fmt: skip


def tiny_model(w4a16: bool) -> Llama:
    torch.manual_seed(0)
    model = Llama(ARGS).eval().requires_grad_(False)
    if w4a16:
        gen = torch.Generator().manual_seed(1)
        weights = {}
        for i in range(ARGS.num_hidden_layers):
            for name in DECODER_LINEARS:
                n, k = model.get_submodule(f"model.layers.{i}.{name}").weight.shape
                weights[f"model.layers.{i}.{name}"] = QuantizedWeight(
                    torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                    torch.rand(n, k // 64, generator=gen) * 0.02 + 0.005,
                    torch.randint(0, 16, (n, k // 64), generator=gen, dtype=torch.uint8),
                    64,
                    None,
                )
        quantize_model_linears(model, weights, torch.float32, "cpu")
        model.fuse_projections(fuse_w4a16)
    put_on_cpu_path(model)
    return model


# (cache row, start, length): a fresh prompt, the second chunk of a prompt whose first chunk
# ran earlier (explicit mask), and a one-position chunk.
CHUNKS = ((0, 0, 9), (2, 6, 5), (1, 0, 1))


@pytest.mark.parametrize("w4a16", [False, True], ids=["fp32", "w4a16"])
def test_packed_chunks_equal_each_chunk_alone(w4a16: bool) -> None:
    model = tiny_model(w4a16)
    gen = torch.Generator().manual_seed(2)
    prompts = {row: torch.randint(0, ARGS.vocab_size, (1, 16), generator=gen) for row in range(3)}
    alone, packed = model.new_cache(3, 32), model.new_cache(3, 32)
    with torch.inference_mode():
        for cache in (alone, packed):  # row 2's first chunk, before the packed step
            model(cache.row(2), 0, input_ids=prompts[2][:, :6])
        want = torch.cat(
            [
                model(alone.row(row), start, input_ids=prompts[row][:, start : start + n])[:, -1]
                for row, start, n in CHUNKS
            ]
        )
        parts = [
            (row, start, model.embed(prompts[row][:, start : start + n]))
            for row, start, n in CHUNKS
        ]
        got = model.prefill_packed(packed, parts)
    assert got.shape == (len(CHUNKS), ARGS.vocab_size)
    # fp32: the same arithmetic (GEMM blocking aside). W4A16 on AVX2: a one-position chunk
    # alone takes the 16-bit decode kernel, packed the 8-bit prefill GEMM.
    fp32_exact = not w4a16 or not (cpu_kernels.load_fp32() and cpu_kernels.load_fp32().has_gemm)
    tol = 1e-4 if fp32_exact else 2e-2
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < tol * scale
    for layer in range(ARGS.num_hidden_layers):
        for row, start, n in CHUNKS:
            written = slice(0, start + n)
            for ours, theirs in ((packed.keys, alone.keys), (packed.values, alone.values)):
                a, b = ours[layer][row, :, written], theirs[layer][row, :, written]
                assert float((a - b).abs().max()) < tol * max(float(b.abs().max()), 1e-6)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_packed_chunks_must_go_to_distinct_rows_inside_the_cache() -> None:
    model = tiny_model(False)
    cache = model.new_cache(2, 8)
    embeds = model.embed(torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="distinct cache rows"):
        model.prefill_packed(cache, [(0, 0, embeds), (0, 3, embeds)])
    with pytest.raises(ValueError, match="outside the cache"):
        model.prefill_packed(cache, [(0, 0, embeds), (1, 6, embeds)])


def test_one_packed_position_is_not_taken_for_a_decode_step() -> None:
    """A packed step of one position (one chunk of one token, mid-prompt) must not go to the
    one-call decoder, which would put it at the packed step's nominal position 0."""
    model = tiny_model(True)  # W4A16: the one-call decoder takes its decode steps
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, ARGS.vocab_size, (1, 6), generator=gen)
    alone, packed = model.new_cache(2, 16), model.new_cache(2, 16)
    with torch.inference_mode():
        for cache in (alone, packed):
            model(cache.row(1), 0, input_ids=ids[:, :5])
        want = model(alone.row(1), 5, input_ids=ids[:, 5:])[:, -1]
        got = model.prefill_packed(packed, [(1, 5, model.embed(ids[:, 5:]))])
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
