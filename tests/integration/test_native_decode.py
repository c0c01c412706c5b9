"""All decoder layers in one native call (cpu_kernels/decoder.c) against the per-op path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vilaserve.adapters.offline.awq_quantizer import quantize_to_canonical
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.qlinear import fuse_w4a16, quantize_model_linears
from vilaserve.adapters.worker.torch_vila.cpu_path import NativeDecodeBody, put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="needs an AVX-512 BF16 CPU and gcc")


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


def op_by_op(model: Llama) -> Llama:
    """The same kernels as `in_one_call`, dispatched op by op from Python."""
    report = put_on_cpu_path(model, one_call_decode=False)
    assert report.kernel_linears > 0 and not report.native_decode
    return model


def in_one_call(model: Llama) -> Llama:
    assert put_on_cpu_path(model).native_decode
    return model


def decode(model: Llama, batch: int = 2, steps: int = 5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy-free decode of fixed ids: logits of every step and the final KV cache."""
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
    slow, slow_cache = decode(op_by_op(copy.deepcopy(model)))
    fast, fast_cache = decode(in_one_call(model))
    # The same matmul, norm, rotary and attention kernels in the same order: equal results
    # up to SiLU's exp (a polynomial here, Sleef in torch), i.e. a rare bf16 rounding flip.
    assert float((fast - slow).abs().max()) < 2e-2 * float(slow.abs().max())
    for a, b in zip(fast_cache, slow_cache, strict=True):
        assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.abs().max())
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.9


def test_dense_bf16_layers_agree_with_pytorch_fp32() -> None:
    args = tiny_args(num_key_value_heads=1)  # GQA with one KV head
    model = in_one_call(bf16_model(args, seed=1))
    fast, _ = decode(model, batch=1)
    # The deepcopy must not trip on the native plan; in fp32 every swapped module runs
    # PyTorch's ops.
    reference = copy.deepcopy(model).float()
    want, _ = decode(reference, batch=1)
    assert float((fast - want).abs().max()) < 5e-2 * float(want.abs().max())


def test_a_caller_embedding_is_not_overwritten() -> None:
    model = in_one_call(w4a16_model(tiny_args(), fused=True))
    cache = model.new_cache(1, 4)
    embeds = torch.randn(1, 1, 128).to(torch.bfloat16)
    before = embeds.clone()
    with torch.inference_mode():
        model(cache, 0, inputs_embeds=embeds)
    assert torch.equal(embeds, before)


def test_models_the_c_code_cannot_run_keep_the_per_op_path() -> None:
    def one_call_decoder(model: Llama) -> bool:
        return put_on_cpu_path(model).native_decode

    assert not one_call_decoder(bf16_model(tiny_args(attention_bias=True)))
    assert not one_call_decoder(bf16_model(tiny_args(head_dim=48, hidden_size=192)))
    assert not one_call_decoder(bf16_model(tiny_args()).float())
    model = bf16_model(tiny_args())
    model.model.layers[1].mlp.down_proj = nn.Linear(384, 128, bias=True).to(torch.bfloat16)
    assert not one_call_decoder(model)
    # ...and still decode correctly (the per-op path), batch beyond the kernels' rows included.
    logits, _ = decode(model, batch=9, steps=2)
    assert torch.isfinite(logits).all()


def test_moving_the_model_drops_the_plan() -> None:
    model = in_one_call(w4a16_model(tiny_args(), fused=True))
    body = model.model
    assert isinstance(body, NativeDecodeBody)
    planned = body.decoder
    assert planned is not None
    decode(model, steps=1)
    model.to("cpu")
    assert body.decoder is not None and body.decoder is not planned
