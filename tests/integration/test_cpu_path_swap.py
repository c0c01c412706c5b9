"""`put_on_cpu_path`: the one place that puts the plain-PyTorch LLM on the CPU kernels.

Run on every native path this machine has (each forced through VILASERVE_CPU_PATH): the swap
keeps every tensor's name, the tied head and the answers, and decode steps then run in one native
call. A model never put on a path calls no kernel at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_qlinear import rel_err, tiny_args

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.cpu_path import (
    KernelAttention,
    KernelRMSNorm,
    NativeDecodeBody,
    put_on_cpu_path,
)
from vilaserve.adapters.worker.torch_vila.fast_linear import (
    Avx512DecodeLinear,
    PortableDecodeLinear,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama

FP32 = cpu_kernels.fp32_kernels()
# (path, the dtype the worker computes in there)
NATIVE_PATHS = ([(FP32.path, torch.float32)] if FP32 else []) + (
    [("avx512_bf16", torch.bfloat16)] if cpu_kernels.avx512_kernels() else []
)
pytestmark = pytest.mark.skipif(not NATIVE_PATHS, reason="needs a CPU path with kernels and gcc")


def plain_model(dtype: torch.dtype) -> Llama:
    torch.manual_seed(0)
    # Weights exactly 16-bit, as checkpoints store them (the fp32 path keeps them in 16 bits).
    model = Llama(tiny_args(tied=True)).to(torch.bfloat16).to(dtype)
    return model.eval().requires_grad_(False)


def prefill_then_decode(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a 6-token prefill and 4 single steps (`forward`), then one `decode_rows` step
    of both rows at different positions."""
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        logits = [model(cache, 0, input_ids=ids[:, :6])]
        logits += [model(cache, p, input_ids=ids[:, p : p + 1]) for p in range(6, 10)]
        rows = model.decode_rows(
            cache, torch.tensor([1, 0]), torch.tensor([10, 10]), ids[:, 10].flip(0)
        )
    return torch.cat([*logits, rows[:, None]], dim=1)


@pytest.mark.parametrize(("path", "dtype"), NATIVE_PATHS)
def test_the_swap_keeps_names_tied_head_and_answers(
    path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VILASERVE_CPU_PATH", path)
    model = plain_model(dtype)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    want = prefill_then_decode(copy.deepcopy(model), ids)

    report = put_on_cpu_path(model)
    assert report.path == path
    assert report.kernel_linears == 2 * 7 + 1  # every decoder linear and the (tied) head
    assert report.native_decode and isinstance(model.model, NativeDecodeBody)
    # The same tensors under the same names (the fp32 path keeps 16-bit weights as buffers).
    names = {name for name, _ in (*model.named_parameters(), *model.named_buffers())}
    assert set(keys) <= names
    head, table = model.lm_head.weight, model.model.embed_tokens.weight
    kinds = {type(m) for m in model.modules()}
    if path == "avx512_bf16":
        assert head is table  # still tied
        assert {Avx512DecodeLinear, KernelRMSNorm, KernelAttention} <= kinds
    else:  # the head streams a 16-bit copy; lookups read the fp32 table
        assert head.dtype == torch.bfloat16 and torch.equal(head.float(), table)
        assert PortableDecodeLinear in kinds and KernelAttention not in kinds

    calls = 0
    decoder = model.model.decoder
    assert decoder is not None
    run = decoder.run

    def counted(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return run(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(decoder, "run", counted)
    got = prefill_then_decode(model, ids)
    assert calls == 5  # four single steps and the row-wise step; the prefill ran per layer
    # bf16: the kernels round at other points than PyTorch (as test_native_decode allows).
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel_err(got, want) < tolerance


def test_a_model_never_put_on_a_path_calls_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("llama.py asked for a kernel")

    for name in ("load", "load_fp32", "fp32_kernels", "avx512_kernels", "cpu_path"):
        monkeypatch.setattr(cpu_kernels, name, refuse)
    model = plain_model(torch.float32)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(prefill_then_decode(model, ids)).all()
