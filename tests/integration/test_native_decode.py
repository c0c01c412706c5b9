"""All decoder layers in one native call (cpu_kernels/decoder.c) against the per-op path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vilaserve.adapters.offline.awq_quantizer import quantize_to_canonical
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
from vilaserve.adapters.worker.torch_vila.fast_linear import accelerate_cpu_linears
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama, LlamaArgs
from vilaserve.adapters.worker.torch_vila.native_decode import NativeDecoder

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="needs an AVX-512 BF16 CPU and gcc"
)


def tiny_args(**changes: object) -> LlamaArgs:
    fields: dict[str, object] = dict(
        vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=128,
    )  # fmt: skip
    fields.update(changes)
    return LlamaArgs(**fields)  # type: ignore[arg-type]


def bf16_model(args: LlamaArgs, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(args).eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # not all ones: a swapped norm would show
    return model.to(torch.bfloat16)


def w4a16_model(args: LlamaArgs, fused: bool) -> Llama:
    model = bf16_model(args)
    weights = {
        f"model.layers.{i}.{name}": quantize_to_canonical(
            model.get_submodule(f"model.layers.{i}.{name}").weight, group_size=64
        )
        for i in range(args.num_hidden_layers)
        for name in DECODER_LINEARS
    }
    quantize_model_linears(model, weights, torch.bfloat16, "cpu", "cpu_avx512")
    if fused:
        assert model.fuse_projections(fuse_w4a16) == 2 * args.num_hidden_layers
    return model


def decode(
    model: Llama, native: bool, batch: int = 2, steps: int = 5
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy-free decode of fixed ids: logits of every step and the final KV cache."""
    model.use_native_decode = native
    ids = torch.randint(0, model.args.vocab_size, (batch, 7 + steps),
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    cache = model.new_cache(batch, 7 + steps)
    with torch.inference_mode():
        model(cache, 0, input_ids=ids[:, :7])
        logits = [model(cache, p, input_ids=ids[:, p : p + 1]) for p in range(7, 7 + steps)]
    return torch.cat(logits, dim=1), [*cache.keys, *cache.values]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_w4a16_layers_in_one_call_equal_the_per_op_path(fused: bool) -> None:
    model = w4a16_model(tiny_args(), fused)
    assert NativeDecoder.for_model(model) is not None
    fast, fast_cache = decode(model, native=True)
    slow, slow_cache = decode(model, native=False)
    # The same matmul, norm, rotary and attention kernels in the same order: equal results
    # up to SiLU's exp (a polynomial here, Sleef in torch), i.e. a rare bf16 rounding flip.
    assert float((fast - slow).abs().max()) < 2e-2 * float(slow.abs().max())
    for a, b in zip(fast_cache, slow_cache, strict=True):
        assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.abs().max())
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.9


def test_dense_bf16_layers_agree_with_pytorch_fp32() -> None:
    args = tiny_args(num_key_value_heads=1)  # GQA with one KV head
    model = bf16_model(args, seed=1)
    accelerate_cpu_linears(model)
    fast, _ = decode(model, native=True, batch=1)
    reference = copy.deepcopy(model).float()  # the deepcopy must not trip on the native plan
    reference.use_native_decode = False
    want, _ = decode(reference, native=False, batch=1)
    assert float((fast - want).abs().max()) < 5e-2 * float(want.abs().max())


def test_a_caller_embedding_is_not_overwritten() -> None:
    model = w4a16_model(tiny_args(), fused=True)
    cache = model.new_cache(1, 4)
    embeds = torch.randn(1, 1, 128).to(torch.bfloat16)
    before = embeds.clone()
    with torch.inference_mode():
        model(cache, 0, inputs_embeds=embeds)
    assert torch.equal(embeds, before)


def test_models_the_c_code_cannot_run_keep_the_per_op_path() -> None:
    assert NativeDecoder.for_model(bf16_model(tiny_args(attention_bias=True))) is None
    assert NativeDecoder.for_model(bf16_model(tiny_args(head_dim=48, hidden_size=192))) is None
    assert NativeDecoder.for_model(bf16_model(tiny_args()).float()) is None
    model = bf16_model(tiny_args())
    model.model.layers[1].mlp.down_proj = nn.Linear(384, 128, bias=True).to(torch.bfloat16)
    assert NativeDecoder.for_model(model) is None
    # ...and still decode correctly (the per-op path), batch beyond the kernels' rows included.
    logits, _ = decode(model, native=True, batch=9, steps=2)
    assert torch.isfinite(logits).all()


def test_moving_the_model_drops_the_plan() -> None:
    from vilaserve.adapters.worker.torch_vila import llama

    model = w4a16_model(tiny_args(), fused=True)
    decode(model, native=True, steps=1)
    assert llama._NATIVE_DECODERS.get(model) is not None
    model.to("cpu")
    assert model not in llama._NATIVE_DECODERS
