"""The int8 token-embedding table of W4A16 models."""

from __future__ import annotations

import pytest
import torch

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    Int8Embedding,
    Int8TiedHead,
    compress_tied_embeddings,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs


def tiny_llama(tied: bool) -> Llama:
    args = LlamaArgs(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return Llama(args).to(torch.bfloat16).eval()


def test_rows_round_trip_within_half_a_step_of_their_absmax() -> None:
    weight = torch.randn(5000, 96) * torch.logspace(-3, 1, 5000)[:, None]  # very unequal rows
    embedding = Int8Embedding(weight.to(torch.bfloat16))
    ids = torch.arange(5000)
    got = embedding(ids).float()
    assert got.dtype == torch.float32 and embedding(ids).dtype == torch.bfloat16
    reference = weight.to(torch.bfloat16).float()
    step = reference.abs().amax(dim=1, keepdim=True) / 127
    # half a quantization step, plus the bf16 rounding of the output
    assert bool(((got - reference).abs() <= step / 2 + reference.abs() / 128 + 1e-12).all())
    assert embedding.table.dtype == torch.int8 and embedding.table.numel() == weight.numel()


def test_untied_model_is_compressed_and_answers_the_same() -> None:
    model = tiny_llama(tied=False)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(model.new_cache(1, 12), 0, input_ids=ids, last_only=False)
        assert compress_token_embeddings(model)
        assert isinstance(model.model.embed_tokens, Int8Embedding)
        assert model.dtype == torch.bfloat16  # the model still reports its compute dtype
        after = model(model.new_cache(1, 12), 0, input_ids=ids, last_only=False)
    assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_tied_model_keeps_its_16_bit_table() -> None:
    model = tiny_llama(tied=True)
    assert not compress_token_embeddings(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_rows_follow_the_model_dtype_and_the_scales_stay_fp32() -> None:
    weight = torch.randn(50, 32).to(torch.bfloat16)
    embedding = Int8Embedding(weight)
    ids = torch.tensor([[1, 7, 49]])
    rows16 = embedding(ids)
    assert rows16.dtype == torch.bfloat16
    embedding.to(torch.float32)
    assert embedding(ids).dtype == torch.float32 and embedding.scales.dtype == torch.float32
    embedding.to(torch.bfloat16)  # a round trip does not round the scales
    assert embedding.scales.dtype == torch.float32 and torch.equal(embedding(ids), rows16)


@pytest.mark.skipif(cpu_kernels.fp32_kernels() is None, reason="needs an AVX2 (or NEON) CPU")
def test_a_tied_model_on_the_fp32_path_keeps_one_int8_table_as_embedding_and_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fp32 = cpu_kernels.fp32_kernels()
    assert fp32 is not None
    monkeypatch.setenv("VILASERVE_CPU_PATH", fp32.path)
    torch.manual_seed(0)
    args = LlamaArgs(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = Llama(args).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        want = model(model.new_cache(1, 16), 0, input_ids=ids, last_only=False)
    assert compress_tied_embeddings(model)
    assert isinstance(model.lm_head, Int8TiedHead)
    assert model.lm_head.embedding[0] is model.model.embed_tokens  # one table
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        wide = model(cache, 0, input_ids=ids[:, :-1], last_only=False)  # > 8 rows: widened
        step = model(cache, 8, input_ids=ids[:, -1:])  # one row: the int8 kernel
    got = torch.cat((wide, step), dim=1)
    # per-row int8 of the table: logits within 1% of their range, argmax unchanged
    assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    untied = Llama(LlamaArgs(**{**args.__dict__, "tie_word_embeddings": False}))
    assert not compress_tied_embeddings(untied)
