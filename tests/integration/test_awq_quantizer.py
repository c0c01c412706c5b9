"""Our AWQ quantizer on a tiny random Llama: quantizer consistency, function-preserving scales,
AWQ beating RTN on held-out tokens, and the returned tensors being enough to rebuild the model."""

from __future__ import annotations

import copy

import pytest
import torch

from vilaserve.adapters.offline.awq_quantizer import (
    RECIPES,
    AwqConfig,
    AwqReport,
    _search_clip,
    apply_awq_scales,
    calibration_blocks,
    pseudo_quantize,
    quantize_llama,
    quantize_to_canonical,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

GROUP = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(kv_heads: int = 2, seed: int = 0) -> Llama:
    args = LlamaArgs(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        rope_scaling=None,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = Llama(args).eval().requires_grad_(False)
    with torch.no_grad():
        # A few salient input channels with ~20x larger activations: what AWQ protects.
        model.model.embed_tokens.weight[:, [3, 17, 42, 99]] *= 20.0
        # Non-trivial norm weights, so that dividing them by s is really exercised.
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def calibration(seed: int, blocks: int = 8, seqlen: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (blocks, seqlen), generator=generator, dtype=torch.int64)


def logits(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        return model(cache, 0, input_ids=ids, last_only=False)


def rebuild(
    args: LlamaArgs, quantized: dict[str, QuantizedWeight], plain: dict[str, torch.Tensor]
) -> Llama:
    """A fresh model from the returned data only (dequantized weights in plain nn.Linear)."""
    state = dict(plain)
    for name, weight in quantized.items():
        state[f"{name}.weight"] = weight.dequantize(torch.float32)
        if weight.bias is not None:
            state[f"{name}.bias"] = weight.bias
    model = Llama(args).eval()
    # Strict: raises on any missing/unexpected tensor, so this also checks `plain` is complete.
    model.load_hf_state_dict(state)
    return model


def test_pseudo_quantize_matches_the_canonical_weight() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.rand(96, 1) * 3
    w[5, :64] += 7.0  # an all-positive group: zero point clamps to 0
    fake = pseudo_quantize(w, GROUP)
    canonical = quantize_to_canonical(w, GROUP)
    assert canonical.q.dtype == torch.uint8 and canonical.zeros.dtype == torch.uint8
    assert canonical.scales.dtype == torch.float16
    assert canonical.q.shape == (96, 256) and canonical.scales.shape == (96, 4)
    assert int(canonical.q.max()) <= 15 and int(canonical.zeros.max()) <= 15
    # Same fp16-rounded scales on both paths: identical, not merely close.
    assert torch.equal(canonical.dequantize(torch.float32), fake)
    # And llm-awq's formula with fp32 scales agrees up to that fp16 rounding of the scales.
    groups = w.reshape(96, 4, GROUP)
    high, low = groups.amax(-1, keepdim=True), groups.amin(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-5) / 15
    zeros = (-torch.round(low / scales)).clamp(0, 15)
    reference = (torch.clamp(torch.round(groups / scales) + zeros, 0, 15) - zeros) * scales
    step = scales.expand_as(groups).reshape(96, 256)
    in_steps = (reference.reshape(96, 256) - fake).abs() / step
    # fp16 scales move an element by at most 15 * 2^-11 steps, except where w / scale sits on
    # a rounding boundary and flips by one whole step (a tiny fraction of elements).
    assert (in_steps < 1.001).all()
    assert float((in_steps > 15 * 2**-11 * 1.01).float().mean()) < 0.005
    # Round-to-nearest error stays within half a step where the group's range is representable.
    assert ((fake - w).abs()[:5] <= 0.51 * step[:5]).all()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_scales_alone_preserve_the_fp_function(kv_heads: int) -> None:
    # Every group, v -> o included (under GQA: one scale per v row, shared by two heads).
    model = tiny_llama(kv_heads=kv_heads)
    original = copy.deepcopy(model)
    held_out = calibration(seed=99, blocks=2)
    report = AwqReport()
    config = AwqConfig(group_size=GROUP, search_clip=False)
    _, plain = quantize_llama(
        model, calibration(seed=1, blocks=4), config, progress=False, report=report
    )
    # The search picked non-trivial scales ...
    assert any(search.alpha > 0 for search in report.scale_searches)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.allclose(plain[norm], original.state_dict()[norm])
    # ... yet the scaled (unclipped, unquantized) fp model computes the same function.
    reference = logits(original, held_out)
    assert (logits(model, held_out) - reference).abs().max() < 1e-4
    # Re-applying the recorded scales by name reproduces the mutated model exactly.
    replayed = copy.deepcopy(original)
    apply_awq_scales(replayed, report.scale_searches)
    for key, value in model.state_dict().items():
        assert torch.equal(replayed.state_dict()[key], value), key
    assert torch.equal(plain[norm], model.state_dict()[norm])


def test_awq_beats_rtn_on_held_out_tokens() -> None:
    base = tiny_llama()
    held_out = calibration(seed=99, blocks=4)
    reference = logits(base, held_out)
    errors: dict[str, float] = {}
    for method, config in {
        "rtn": AwqConfig(group_size=GROUP, search_scales=False, search_clip=False),
        "awq": AwqConfig(group_size=GROUP),
    }.items():
        model = copy.deepcopy(base)
        quantized, plain = quantize_llama(model, calibration(seed=1), config, progress=False)
        rebuilt = rebuild(base.args, quantized, plain)
        errors[method] = float((logits(rebuilt, held_out) - reference).pow(2).mean())
    print(f"held-out logit MSE vs fp: {errors}")
    assert errors["awq"] < 0.8 * errors["rtn"], errors


def test_plain_holds_every_non_quantized_tensor() -> None:
    model = tiny_llama()
    quantized, plain = quantize_llama(
        model, calibration(seed=1, blocks=2), AwqConfig(group_size=GROUP), progress=False
    )
    expected_linears = {
        f"model.layers.{i}.{part}.{name}"
        for i in range(2)
        for part, names in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:]))
        for name in names
    }
    assert set(quantized) == expected_linears
    expected_plain = {
        key
        for key in model.state_dict()
        if not any(key.startswith(f"{name}.") for name in expected_linears)
    }
    assert set(plain) == expected_plain
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(plain)
    assert "model.layers.1.post_attention_layernorm.weight" in plain
    # Copies, not views of the (still mutable) model.
    assert plain["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()


@pytest.mark.parametrize(
    ("kv_heads", "recipe", "has_v_to_o"),
    [(2, "llm-awq", False), (4, "llm-awq", True), (2, "vilaserve", True), (4, "vilaserve", True)],
)
def test_v_to_o_group_under_gqa_only_in_our_recipe(
    kv_heads: int, recipe: str, has_v_to_o: bool
) -> None:
    report = AwqReport()
    quantize_llama(
        tiny_llama(kv_heads=kv_heads),
        calibration(seed=1, blocks=2),
        RECIPES[recipe](group_size=GROUP),
        progress=False,
        report=report,
    )
    scaled = {name for search in report.scale_searches for name in search.linears}
    o_projs = {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    assert (o_projs <= scaled) is has_v_to_o
    assert not (o_projs & scaled) or has_v_to_o
    assert len(report.scale_searches) == 2 * (4 if has_v_to_o else 3)
    for search in report.scale_searches:
        if search.prev_op.endswith("v_proj"):
            # One scale per v row (32 per KV head), spread over o_proj's 4 x 32 columns.
            assert search.scales.numel() == kv_heads * 32
            assert search.input_scales().numel() == 4 * 32
    # Clipping covers every linear but q/k, in both cases.
    assert {name.rsplit(".", 1)[1] for name in report.clips} == set(LINEARS) - {"q_proj", "k_proj"}


def test_bf16_model_is_searched_in_fp32_and_stays_bf16() -> None:
    model = tiny_llama().to(torch.bfloat16)
    quantized, plain = quantize_llama(
        model, calibration(seed=1, blocks=2), AwqConfig(group_size=GROUP), progress=False
    )
    assert all(weight.scales.dtype == torch.float16 for weight in quantized.values())
    assert all(tensor.dtype == torch.bfloat16 for tensor in plain.values())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


class CharTokenizer:
    """BOS (1) then one id per character, like a Llama tokenizer's `encode`."""

    def encode(self, text: str) -> list[int]:
        return [1] + [2 + ord(c) % 250 for c in text]


def test_calibration_blocks_concatenate_and_drop_the_remainder() -> None:
    lines = ["abcd", "", "   ", "x" * 40, "efgh", "ijk"]  # 40+1 tokens > seqlen 8: skipped
    blocks = calibration_blocks(CharTokenizer(), "\n".join(lines), n_samples=3, seqlen=8)
    # 3 accepted lines of 5, 5 and 4 tokens = 14 tokens -> one 8-token block.
    assert blocks.shape == (1, 8) and blocks.dtype == torch.int64
    assert int((blocks == 1).sum()) == 2  # BOS of the first two lines in the block
    with pytest.raises(ValueError, match="less than one 64-token block"):
        calibration_blocks(CharTokenizer(), "\n".join(lines), seqlen=64)


def test_clip_search_matches_a_per_channel_per_group_reference() -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 2 * GROUP)
    w[:, 5] *= 6.0  # outliers make shrinking worthwhile for some groups
    x = torch.randn(2, 700, 2 * GROUP)
    choice = _search_clip(w, x, AwqConfig.llm_awq(group_size=GROUP))
    low, found = (bound.squeeze(-1) for bound in choice.bounds(w))
    assert torch.equal(low, -found)  # one bound for both ends
    # llm-awq's rule written out plainly: ~512 tokens by stride, shrink 1.00 .. 0.55, keep the
    # first max |w| with the least mean squared change of the group's partial dot product.
    tokens = x.reshape(-1, w.shape[1])
    tokens = tokens[:: tokens.shape[0] // 512]
    expected = torch.empty(w.shape[0], 2)
    for row in range(w.shape[0]):
        for group in range(2):
            cols = slice(group * GROUP, (group + 1) * GROUP)
            part, inputs = w[row, cols], tokens[:, cols]
            best = (float("inf"), 0.0)
            for step in range(10):
                bound = part.abs().max() * (1 - step / 20)
                q = pseudo_quantize(part.clamp(-bound, bound)[None, :], GROUP)[0]
                err = float((inputs @ part - inputs @ q).pow(2).mean())
                if err < best[0]:
                    best = (err, float(bound))
            expected[row, group] = best[1]
    torch.testing.assert_close(found, expected)
    assert (found < w.reshape(64, 2, GROUP).abs().amax(-1)).any()  # some groups were clipped


def test_two_sided_clip_search_matches_a_per_channel_per_group_reference() -> None:
    torch.manual_seed(4)
    w = torch.randn(64, 2 * GROUP)
    w[:, 5] *= 6.0
    w[:, 70] = -w[:, 70].abs() * 5.0  # a low outlier in every row's second group
    x = torch.randn(2, 300, 2 * GROUP)
    choice = _search_clip(w, x, AwqConfig(group_size=GROUP))
    low, high = (bound.squeeze(-1) for bound in choice.bounds(w))
    # Written out plainly: every token (600 < clip_tokens), the group's max and min shrunk by
    # independent factors 1.00 .. 0.55, the first pair with the least partial-sum error wins.
    tokens = x.reshape(-1, w.shape[1])
    expected_low, expected_high = torch.empty(64, 2), torch.empty(64, 2)
    for row in range(w.shape[0]):
        for group in range(2):
            cols = slice(group * GROUP, (group + 1) * GROUP)
            part, inputs = w[row, cols], tokens[:, cols]
            best = (float("inf"), 0.0, 0.0)
            for top in range(10):
                for bottom in range(10):
                    hi = float(part.max()) * (1 - top / 20)
                    lo = float(part.min()) * (1 - bottom / 20)
                    q = pseudo_quantize(part.clamp(lo, hi)[None, :], GROUP)[0]
                    err = float((inputs @ part - inputs @ q).pow(2).mean())
                    if err < best[0]:
                        best = (err, lo, hi)
            expected_low[row, group], expected_high[row, group] = best[1], best[2]
    torch.testing.assert_close(low, expected_low)
    torch.testing.assert_close(high, expected_high)
    # The two ends moved independently: some groups clipped at one end only.
    groups = w.reshape(64, 2, GROUP)
    top_clipped = high < groups.amax(-1)
    bottom_clipped = low > groups.amin(-1)
    assert (top_clipped != bottom_clipped).any()


@pytest.mark.parametrize("duo", [False, True], ids=["llm-awq", "duo"])
def test_gate_up_scale_search_matches_the_reference_rule(duo: bool) -> None:
    model = tiny_llama()
    original = copy.deepcopy(model)
    blocks = calibration(seed=1, blocks=4)
    report = AwqReport()
    config = AwqConfig(group_size=GROUP, search_clip=False, duo_scaling=duo)
    quantize_llama(model, blocks, config, progress=False, report=report)
    name = "model.layers.0.post_attention_layernorm"
    [search] = [s for s in report.scale_searches if s.prev_op == name]
    # llm-awq's rule written out plainly on layer 0 of the fp model: x_stat = mean |x| of the
    # MLP input, s = x_stat^alpha normalised, gate and up quantized together as W * s, and the
    # loss taken on the whole MLP's output (down_proj in full precision).
    layer = original.model.layers[0]
    with torch.no_grad():
        hidden = original.embed(blocks)
        step = original.make_step(0, blocks.shape[1], hidden)
        cache = original.new_cache(blocks.shape[0], blocks.shape[1])
        hidden = hidden + layer.self_attn(layer.input_layernorm(hidden), step, cache)
        x = layer.post_attention_layernorm(hidden)
        mlp = layer.mlp
        reference = mlp(x)
        x_stat = x.reshape(-1, x.shape[-1]).abs().mean(dim=0)
        # AutoAWQ's duo rule: s = x_stat^a / w_stat^(1-a), w_stat per input channel the mean over
        # gate's and up's rows of |w| / (max |w| of its group).
        w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).abs()
        group_max = w.reshape(w.shape[0], -1, GROUP).amax(-1).repeat_interleave(GROUP, dim=1)
        w_stat = (w / group_max).mean(dim=0)
        losses = []
        for grid in range(20):
            a = grid / 20
            s = x_stat.pow(a) / (w_stat.pow(1 - a) + 1e-4) if duo else x_stat.pow(a)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            gate = pseudo_quantize(mlp.gate_proj.weight * s, GROUP) / s
            up = pseudo_quantize(mlp.up_proj.weight * s, GROUP) / s
            out = mlp.down_proj(torch.nn.functional.silu(x @ gate.T) * (x @ up.T))
            losses.append(float((out - reference).pow(2).mean()))
    assert search.alpha == losses.index(min(losses)) / 20
    torch.testing.assert_close(torch.tensor(search.losses), torch.tensor(losses), rtol=1e-3, atol=0)
    assert search.alpha > 0  # the salient channels made scaling pay off
