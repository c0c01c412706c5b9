"""The int8 token-embedding table of W4A16 models."""

from __future__ import annotations

import torch

from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    Int8Embedding,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama, LlamaArgs


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
