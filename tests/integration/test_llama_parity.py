"""Parity of our compact Llama (adapters.worker.torch_vila.llama) with HF LlamaForCausalLM.

Every check compares against Hugging Face's implementation on tiny random models, so a wrong
RoPE, mask, GQA grouping, bias or cache write shows up as a logit difference. Weights are
re-randomized (biases and norm weights included, which HF initializes to 0 and 1) so that no
term is trivially zero.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, NamedTuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vilaserve.adapters.worker.torch_vila.llama import Llama, rope_inv_freq
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs, RopeScaling

FP32_TOL = 1e-4
BATCH = 2
# Past the llama3 case's original_max_position_embeddings (32), so the scaling matters.
SEQ = 96
PREFILL = 40

_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES: dict[str, dict[str, Any]] = {
    "gqa_bias": {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    # head_dim != hidden / heads, so q/o widths differ from the hidden size.
    "mha_head_dim": {"num_key_value_heads": 4, "head_dim": 32, "num_hidden_layers": 3},
    "llama3_rope": {"num_key_value_heads": 2, "rope_parameters": _LLAMA3},
    "tied_linear_rope": {
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 5_000.0, "factor": 2.0},
    },
}


class Pair(NamedTuple):
    hf: LlamaForCausalLM
    ours: Llama
    ids: torch.Tensor
    ref: torch.Tensor  # HF fp32 logits [BATCH, SEQ, vocab]


def _hf_model(overrides: dict[str, Any], seed: int) -> LlamaForCausalLM:
    settings: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        # Eager attention: an independent reference that does not share our SDPA calls.
        "attn_implementation": "eager",
        **overrides,
    }
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model.eval().requires_grad_(False)


def _ours_from(hf: LlamaForCausalLM) -> Llama:
    ours = Llama(LlamaArgs.from_hf_config(hf.config.to_dict()))
    ours.load_hf_state_dict(hf.state_dict())
    return ours.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request: pytest.FixtureRequest) -> Pair:
    seed = list(CASES).index(request.param)
    hf = _hf_model(CASES[request.param], seed)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    return Pair(hf, _ours_from(hf), ids, ref)


def _full(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    return model(model.new_cache(ids.shape[0], ids.shape[1]), 0, input_ids=ids, last_only=False)


def _prefill_then_decode(model: Llama, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits for every position: one prefill call, then one call per remaining token."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    logits = [model(cache, 0, input_ids=ids[:, :prefill], last_only=False)]
    logits += [model(cache, pos, input_ids=ids[:, pos : pos + 1]) for pos in range(prefill, SEQ)]
    return torch.cat(logits, dim=1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_parameter_names_match_hf(pair: Pair) -> None:
    # Same keys both ways, so plain load_state_dict(strict=True) works too, and the W4A16
    # swap can find every projection by its HF name as a plain nn.Linear.
    assert set(pair.ours.state_dict()) == set(pair.hf.state_dict())
    pair.ours.load_state_dict(pair.hf.state_dict(), strict=True)
    linears = {n for n, m in pair.ours.named_modules() if type(m) is torch.nn.Linear}
    assert "model.layers.0.self_attn.k_proj" in linears
    assert "model.layers.1.mlp.down_proj" in linears


def test_rope_frequencies_match_hf(pair: Pair) -> None:
    assert torch.equal(rope_inv_freq(pair.ours.args), pair.hf.model.rotary_emb.inv_freq)


def test_full_forward_matches_hf(pair: Pair) -> None:
    assert _max_diff(_full(pair.ours, pair.ids), pair.ref) < FP32_TOL


def test_prefill_then_token_by_token_decode_matches_hf(pair: Pair) -> None:
    cached = _prefill_then_decode(pair.ours, pair.ids, PREFILL)
    assert _max_diff(cached, pair.ref) < FP32_TOL
    assert _max_diff(cached, _full(pair.ours, pair.ids)) < FP32_TOL


def test_chunked_prefill_matches_hf(pair: Pair) -> None:
    # Chunks starting at start_pos > 0 need the offset causal mask; uneven sizes on purpose.
    cache = pair.ours.new_cache(BATCH, SEQ)
    bounds = [0, 30, 71, 72, SEQ]
    chunks = [
        pair.ours(cache, start, input_ids=pair.ids[:, start:end], last_only=False)
        for start, end in itertools.pairwise(bounds)
    ]
    assert _max_diff(torch.cat(chunks, dim=1), pair.ref) < FP32_TOL


def test_last_only_returns_the_last_position(pair: Pair) -> None:
    last = pair.ours(pair.ours.new_cache(BATCH, SEQ), 0, input_ids=pair.ids)
    assert last.shape == (BATCH, 1, pair.ref.shape[-1])
    assert last.dtype == torch.float32
    assert _max_diff(last, pair.ref[:, -1:]) < FP32_TOL


def test_inputs_embeds_equal_input_ids(pair: Pair) -> None:
    embeds = pair.ours.embed(pair.ids)
    by_embeds = pair.ours(pair.ours.new_cache(BATCH, SEQ), 0, inputs_embeds=embeds, last_only=False)
    assert torch.equal(by_embeds, _full(pair.ours, pair.ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_decode_agrees_on_argmax(pair: Pair, dtype: torch.dtype) -> None:
    model = copy.deepcopy(pair.ours).to(dtype)
    assert model.new_cache(1, 1).keys[0].dtype == dtype
    logits = _prefill_then_decode(model, pair.ids, PREFILL)
    # bf16 keeps 8 significant bits (~0.4% per rounding). Through 2-3 layers these logits (std
    # ~1.2) move by a few 1e-2, at worst ~0.2, so argmax can flip only where the fp32
    # reference's top two logits are that close (measured: every flip had a gap < 0.07; fp16
    # is ~8x tighter). Everywhere else it must agree, and on >= 90% of positions overall
    # (measured 96-100%).
    top2 = pair.ref.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < 0.15
    agree = logits.argmax(-1) == pair.ref.argmax(-1)
    assert agree.float().mean().item() >= 0.9
    assert bool((agree | near_tie).all())


def test_missing_and_unexpected_tensors_are_named(pair: Pair) -> None:
    state = dict(pair.hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        pair.ours.load_hf_state_dict(state)
    state = dict(pair.hf.state_dict())
    state["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected model\.layers\.0\.self_attn\.qkv_proj"):
        pair.ours.load_hf_state_dict(state)


def test_tied_head_loads_without_lm_head() -> None:
    hf = _hf_model(CASES["tied_linear_rope"], seed=7)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = Llama(LlamaArgs.from_hf_config(hf.config.to_dict()))
    ours.load_hf_state_dict(state)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.to(torch.bfloat16)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # An untied model does need its head.
    untied = _hf_model(CASES["gqa_bias"], seed=7)
    state = {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        _ours_from_state(untied, state)


def _ours_from_state(hf: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> Llama:
    ours = Llama(LlamaArgs.from_hf_config(hf.config.to_dict()))
    ours.load_hf_state_dict(state)
    return ours


def test_cache_is_written_in_place() -> None:
    hf = _hf_model(CASES["gqa_bias"], seed=3)
    ours = _ours_from(hf)
    cache = ours.new_cache(1, 16)
    pointers = [t.data_ptr() for t in (*cache.keys, *cache.values)]
    ids = torch.randint(0, 256, (1, 6))
    ours(cache, 0, input_ids=ids[:, :4])
    ours(cache, 4, input_ids=ids[:, 4:5])
    ours(cache, 5, input_ids=ids[:, 5:6])
    assert [t.data_ptr() for t in (*cache.keys, *cache.values)] == pointers
    assert cache.keys[0].shape == (1, 2, 16, 16)
    assert bool(cache.keys[1][:, :, :6].abs().sum(-1).gt(0).all())
    # Positions past the written prefix are left uninitialised (never read): not checked.
    with pytest.raises(ValueError, match="cache length"):
        ours(cache, 16, input_ids=ids[:, :1])


def test_rope_tables_stay_fp32_through_dtype_round_trip() -> None:
    ours = _ours_from(_hf_model(CASES["llama3_rope"], seed=4))
    cos = ours.rope.cos.clone()
    ours.to(torch.bfloat16).to(torch.float32)
    assert ours.rope.cos.dtype == torch.float32
    assert torch.equal(ours.rope.cos, cos)


def test_config_forms_v4_and_v5_agree() -> None:
    base = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    v4_rope = {k: v for k, v in _LLAMA3.items() if k not in ("rope_type", "rope_theta")}
    v4 = {**base, "rope_theta": 10_000.0, "rope_scaling": {"type": "llama3", **v4_rope}}
    v5 = {**base, "rope_parameters": dict(_LLAMA3)}
    from_v5 = LlamaArgs.from_hf_config(v5)
    assert LlamaArgs.from_hf_config(v4) == from_v5
    assert from_v5.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    assert from_v5.num_key_value_heads == 4 and from_v5.head_dim == 16
    plain = LlamaArgs.from_hf_config({**base, "rope_scaling": None, "rope_theta": 500_000.0})
    assert plain.rope_scaling is None and plain.rope_theta == 500_000.0
    # HF's own v5 serialization of a legacy-style config parses the same way.
    legacy_hf = LlamaConfig(**base, rope_theta=10_000.0, rope_scaling={"type": "llama3", **v4_rope})
    assert LlamaArgs.from_hf_config(legacy_hf.to_dict()) == from_v5


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn"])
def test_unsupported_rope_type_is_named(rope_type: str) -> None:
    cfg = {
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_parameters": {"rope_type": rope_type, "factor": 2.0},
    }
    with pytest.raises(ValueError, match=rope_type):
        LlamaArgs.from_hf_config(cfg)
