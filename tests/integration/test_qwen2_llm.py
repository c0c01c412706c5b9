"""Qwen2 (NVILA's LLM) in our compact Llama code, against transformers' Qwen2ForCausalLM.

Tiny random Qwen2 checkpoints are written with `save_pretrained` (several shards) and streamed
into our model by `load_llm_weights`; transformers' own model on the same weights is the
reference: prefill logits and greedy tokens from the same `inputs_embeds` (random vectors
standing in for spliced image features), in 16-bit and W4A16 (our AWQ quantizer, TinyChat v2
file, `load_awq_llm`). Also the config refusals, the loader's key map and refusals, that it
holds one checkpoint tensor at a time, and the native CPU decoder with q/k/v biases.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM

from vilaserve.adapters.offline.awq_checkpoint_writing import (
    save_hf_awq_directory,
    save_tinychat_checkpoint,
)
from vilaserve.adapters.offline.awq_quantizer import (
    AwqConfig,
    quantize_llama,
    quantize_to_canonical,
)
from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.loading import load_awq_llm, read_awq
from vilaserve.adapters.worker.awq.qlinear import (
    fuse_w4a16,
    keep_16_bit_prefill,
    quantize_model_linears,
)
from vilaserve.adapters.worker.torch_vila import llm_loading
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.cpu_path import NativeDecodeBody, put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.llama import DECODER_LINEARS, Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
from vilaserve.adapters.worker.torch_vila.llm_loading import load_llm_weights

VOCAB, HIDDEN = 300, 64
PROMPT, NEW_TOKENS = 6, 16
FP32_TOL = 1e-4
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def qwen2_config(tied: bool, **changes: Any) -> Qwen2Config:
    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "tie_word_embeddings": tied,
        # Eager attention: a reference that shares no SDPA call with ours.
        "attn_implementation": "eager",
        **changes,
    }
    return Qwen2Config(**settings)


def random_qwen2(tied: bool, seed: int = 0) -> Qwen2ForCausalLM:
    """Every parameter re-randomised: HF starts biases at 0 and norms at 1, which would hide a
    lost bias or a swapped norm. Biases are large, as Qwen2's k biases are."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tied))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_((0.5 if name.endswith(".bias") else 0.15) * noise)
    return model.eval().requires_grad_(False)


def save_checkpoint(hf: Qwen2ForCausalLM, directory: Path, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """Writes `hf` in `dtype` as small shards; returns transformers' own fp32 load of them (the
    reference: exactly the saved values, with its RoPE tables rebuilt in fp32)."""
    copy.deepcopy(hf).to(dtype).save_pretrained(directory, max_shard_size="40KB")
    assert len(list(directory.glob("*.safetensors"))) > 1  # the streaming crosses shards
    reference = Qwen2ForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return reference.eval().requires_grad_(False)


def ours_from(directory: Path, dtype: torch.dtype = torch.float32) -> Llama:
    config = json.loads((directory / "config.json").read_text())
    model = Llama.empty(LlamaArgs.from_hf_config(config), dtype, "cpu")
    load_llm_weights(model, directory, show_progress=False)
    return model.eval().requires_grad_(False)


def spliced_embeddings(batch: int = 2, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, PROMPT, HIDDEN, generator=generator)


def our_greedy(model: Llama, embeds: torch.Tensor, steps: int = NEW_TOKENS) -> torch.Tensor:
    cache = model.new_cache(embeds.shape[0], embeds.shape[1] + steps)
    with torch.inference_mode():
        token = model(cache, 0, inputs_embeds=embeds)[:, -1].argmax(-1)
        tokens = [token]
        for pos in range(embeds.shape[1], embeds.shape[1] + steps - 1):
            token = model(cache, pos, input_ids=token[:, None])[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=1)


def hf_greedy(hf: Qwen2ForCausalLM, embeds: torch.Tensor, steps: int = NEW_TOKENS) -> torch.Tensor:
    with torch.inference_mode():
        out = hf.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.int64),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, -steps:]


def our_prefill(model: Llama, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        cache = model.new_cache(embeds.shape[0], embeds.shape[1])
        return model(cache, 0, inputs_embeds=embeds, last_only=False)


def hf_prefill(hf: Qwen2ForCausalLM, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(inputs_embeds=embeds).logits.float()


# ------------------------------------------------------------------ config


def test_a_qwen2_config_reads_as_qwen2_in_both_layouts() -> None:
    v5 = qwen2_config(tied=False).to_dict()
    args = LlamaArgs.from_hf_config(v5)
    assert args.model_type == "qwen2"
    assert args.qkv_bias and not args.attention_bias and not args.mlp_bias
    assert args.rope_theta == 1_000_000.0 and args.rope_scaling is None
    assert (args.num_key_value_heads, args.head_dim, args.rms_norm_eps) == (2, 16, 1e-6)
    assert not args.tie_word_embeddings
    assert LlamaArgs.from_hf_config(qwen2_config(tied=True).to_dict()).tie_word_embeddings
    # transformers v4 wrote rope_theta at the top level (NVILA-8B's llm/config.json does).
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=1_000_000.0, rope_scaling=None, use_sliding_window=False)
    assert LlamaArgs.from_hf_config(v4) == args
    # Biases follow the architecture: q/k/v biased, o not.
    attention = Llama(args).model.layers[0].self_attn
    assert all(getattr(attention, n.split(".")[1]).bias is not None for n in QKV)
    assert attention.o_proj.bias is None


def test_sliding_window_and_unknown_families_are_refused_by_name() -> None:
    config = qwen2_config(tied=False).to_dict()
    with pytest.raises(ValueError, match=r"use_sliding_window is true in llm/config\.json"):
        LlamaArgs.from_hf_config({**config, "use_sliding_window": True}, "llm/config.json")
    windowed = qwen2_config(
        tied=False, use_sliding_window=True, sliding_window=16, max_window_layers=1
    ).to_dict()
    with pytest.raises(ValueError, match="sliding"):
        LlamaArgs.from_hf_config(windowed)
    with pytest.raises(ValueError, match=r"unsupported LLM model_type 'mistral' in m/config\.json"):
        LlamaArgs.from_hf_config({**config, "model_type": "mistral"}, "m/config.json")


# ------------------------------------------------------------------ 16-bit parity


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_logits_and_greedy_tokens_equal_transformers(
    tied: bool, saved_dtype: torch.dtype, tmp_path: Path
) -> None:
    reference = save_checkpoint(random_qwen2(tied, seed=int(tied)), tmp_path, saved_dtype)
    ours = ours_from(tmp_path)
    embeds = spliced_embeddings()
    want = hf_prefill(reference, embeds)
    assert float((our_prefill(ours, embeds) - want).abs().max()) < FP32_TOL
    expected_tokens = hf_greedy(reference, embeds)
    assert torch.equal(our_greedy(ours, embeds), expected_tokens)
    # The tokens are not a constant sequence: the comparison is informative.
    assert len(set(expected_tokens.flatten().tolist())) > 3


def test_an_in_memory_state_dict_loads_the_same() -> None:
    reference = random_qwen2(tied=False, seed=2)
    ours = Llama(LlamaArgs.from_hf_config(reference.config.to_dict())).eval()
    ours.load_hf_state_dict(reference.state_dict())
    embeds = spliced_embeddings()
    assert float((our_prefill(ours, embeds) - hf_prefill(reference, embeds)).abs().max()) < FP32_TOL


def test_a_bf16_model_holds_the_checkpoint_values_exactly(tmp_path: Path) -> None:
    reference = save_checkpoint(random_qwen2(tied=False), tmp_path, torch.bfloat16)
    ours = ours_from(tmp_path, torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        mine = ours.state_dict()[name]
        assert mine.dtype == torch.bfloat16 and torch.equal(mine.float(), tensor), name


# ------------------------------------------------------------------ the streaming loader


def test_the_key_map_renames_and_skips(tmp_path: Path) -> None:
    reference = random_qwen2(tied=False, seed=3)
    state = {f"language_model.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(HIDDEN, 8)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(reference.config.to_json_string())

    def llava_hf_key(name: str) -> str | None:
        return name.removeprefix("language_model.") if name.startswith("language_model.") else None

    model = Llama.empty(LlamaArgs.from_hf_config(reference.config.to_dict()), torch.float32, "cpu")
    load_llm_weights(model, tmp_path, llava_hf_key, show_progress=False)
    embeds = spliced_embeddings(batch=1)
    want = hf_prefill(reference, embeds)
    assert float((our_prefill(model, embeds) - want).abs().max()) < FP32_TOL
    # Renaming without skipping leaves the projector's tensor, which is refused by name.
    with pytest.raises(ValueError, match=r"unexpected multi_modal_projector\.linear_1\.weight$"):
        load_llm_weights(model, tmp_path, lambda k: k.removeprefix("language_model."))


def write_state(directory: Path, reference: Qwen2ForCausalLM, state: dict[str, Tensor]) -> None:
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(reference.config.to_json_string())


def test_missing_and_mis_shaped_tensors_are_refused_by_name(tmp_path: Path) -> None:
    reference = random_qwen2(tied=False)
    state = dict(reference.state_dict())
    args = LlamaArgs.from_hf_config(reference.config.to_dict())
    gone = "model.layers.1.self_attn.k_proj.bias"
    write_state(tmp_path / "missing", reference, {k: v for k, v in state.items() if k != gone})
    with pytest.raises(ValueError, match=rf"missing {gone}"):
        load_llm_weights(Llama.empty(args, torch.float32, "cpu"), tmp_path / "missing")
    bad = "model.layers.0.self_attn.q_proj.bias"
    write_state(tmp_path / "shape", reference, {**state, bad: torch.zeros(HIDDEN + 1)})
    with pytest.raises(ValueError, match=rf"{bad} has shape \(65,\), expected \(64,\)"):
        load_llm_weights(Llama.empty(args, torch.float32, "cpu"), tmp_path / "shape")


def test_the_loader_holds_one_checkpoint_tensor_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of streaming: every tensor read from a shard is gone before the next one is
    read, so the peak is the model plus one tensor."""
    save_checkpoint(random_qwen2(tied=True), tmp_path, torch.bfloat16)
    real_open = llm_loading.safe_open
    alive: list[weakref.ref[torch.Tensor]] = []
    reads = 0

    class CountingShard:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._shard = real_open(*args, **kwargs)

        def __enter__(self) -> CountingShard:
            self._handle = self._shard.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._shard.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def get_tensor(self, key: str) -> torch.Tensor:
            nonlocal reads
            # Tensors are freed by reference counting: a dead one is gone without a gc pass.
            assert all(ref() is None for ref in alive), f"another tensor alive when reading {key}"
            tensor = self._handle.get_tensor(key)
            alive.append(weakref.ref(tensor))
            reads += 1
            return tensor

    monkeypatch.setattr(llm_loading, "safe_open", CountingShard)
    model = ours_from(tmp_path)
    # Tied: the head is the embedding, filled once through it.
    assert reads == len(model.state_dict()) - 1
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------ W4A16


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_w4a16_from_our_quantizer_equals_transformers_on_the_dequantized_weights(
    tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # These exact comparisons need fp32 activations: the AVX-512 kernels read bf16 rows (0.5 %
    # of the largest logit off here), so on such a CPU the fp32 kernels of its AVX2 path run
    # (the AVX-512 ones are held to a bf16 bound in test_w4a16's every-path test).
    fp32 = cpu_kernels.fp32_kernels()
    if cpu_kernels.cpu_path() == "avx512_bf16" and fp32 is not None:
        monkeypatch.setenv("VILASERVE_CPU_PATH", fp32.path)
    save_checkpoint(random_qwen2(tied, seed=5), tmp_path, torch.float32)
    fp = ours_from(tmp_path)
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    quantized, plain = quantize_llama(fp, calibration, AwqConfig(group_size=64), progress=False)
    assert all(quantized[f"model.layers.0.{n}"].bias is not None for n in QKV)
    awq_file = tmp_path / "tiny-qwen2-w4-g64-awq-v2.pt"
    save_tinychat_checkpoint(awq_file, quantized, plain, group_size=64)

    checkpoint = VilaCheckpoint.open(tmp_path)
    ours = load_awq_llm(checkpoint, str(awq_file), torch.float32, torch.device("cpu"))
    # What the file holds, exactly: the prefill GEMM's 8-bit activations (2 % of the largest
    # logit on this random model) are held to their own bound in test_qlinear.
    keep_16_bit_prefill(ours)
    # The reference: transformers' Qwen2 holding what the file holds, its Linear weights the
    # dequantized 4-bit values. The file keeps the quantizer's weights and biases exactly.
    stored, stored_plain = read_awq(awq_file, ours.args)
    reference = Qwen2ForCausalLM(qwen2_config(tied)).eval().requires_grad_(False)
    state = {k: v.float() for k, v in stored_plain.items()}
    for name, weight in stored.items():
        assert torch.equal(weight.dequantize(), quantized[name].dequantize()), name
        state[f"{name}.weight"] = weight.dequantize()
        if weight.bias is not None:
            assert torch.equal(weight.bias, quantized[name].bias), name
            state[f"{name}.bias"] = weight.bias.float()
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state, strict=True)

    embeds = spliced_embeddings()
    want = hf_prefill(reference, embeds)
    got = our_prefill(ours, embeds)
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
    want_tokens = hf_greedy(reference, embeds)
    assert torch.equal(our_greedy(ours, embeds), want_tokens)
    # As the runtime serves it: q/k/v fused with their biases (where the backend fuses).
    ours.fuse_projections(fuse_w4a16)
    assert torch.equal(our_greedy(ours, embeds), want_tokens)
    # The same weights as an HF/AutoAWQ folder (GEMM packing, biases beside qweight).
    hf_awq = tmp_path / "awq"
    save_hf_awq_directory(
        hf_awq, quantized, plain, json.loads((tmp_path / "config.json").read_text()), 64
    )
    from_folder = load_awq_llm(checkpoint, str(hf_awq), torch.float32, torch.device("cpu"))
    keep_16_bit_prefill(from_folder)
    assert torch.equal(our_greedy(from_folder, embeds), want_tokens)


def test_an_awq_file_without_the_qkv_biases_is_refused(tmp_path: Path) -> None:
    save_checkpoint(random_qwen2(tied=False), tmp_path, torch.float32)
    fp = ours_from(tmp_path)
    quantized = {
        f"model.layers.{i}.{name}": quantize_to_canonical(
            fp.get_submodule(f"model.layers.{i}.{name}").weight, 64
        )  # no bias passed: a Llama-style file
        for i in range(2)
        for name in DECODER_LINEARS
    }
    plain = {k: v for k, v in fp.state_dict().items() if ".layers." not in k or "norm" in k}
    awq_file = tmp_path / "no-bias-awq-v2.pt"
    save_tinychat_checkpoint(awq_file, quantized, plain, group_size=64)
    with pytest.raises(ValueError, match=r"missing model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_awq_llm(VilaCheckpoint.open(tmp_path), str(awq_file), torch.float32, "cpu")


# ------------------------------------------------------------------ native decode with biases


def native_dtype() -> torch.dtype | None:
    """What this machine's native decoder computes in: bf16 (AVX-512) or fp32 (AVX2 / NEON)."""
    if cpu_kernels.load() is not None:
        return torch.bfloat16
    return torch.float32 if cpu_kernels.load_fp32() is not None else None


NATIVE_DTYPE = native_dtype()
needs_native = pytest.mark.skipif(NATIVE_DTYPE is None, reason="needs the CPU kernels and gcc")


def native_qwen2(kind: str) -> Llama:
    """A Qwen2-shaped model the native decoder accepts (head_dim 32), in its dtype, with
    16-bit-exact weights (the fp32 path keeps them 16-bit) and large q/k/v biases."""
    args = LlamaArgs(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, rope_scaling=None, max_position_embeddings=128,
        qkv_bias=True, model_type="qwen2",
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(args).eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    assert NATIVE_DTYPE is not None
    model = model.to(torch.bfloat16).to(NATIVE_DTYPE)
    if kind == "dense":
        return model
    weights = {
        f"model.layers.{i}.{name}": quantize_to_canonical(
            model.get_submodule(f"model.layers.{i}.{name}").weight.float(), 64
        )
        for i in range(args.num_hidden_layers)
        for name in DECODER_LINEARS
    }
    quantize_model_linears(model, weights, NATIVE_DTYPE, "cpu")  # the Linears' biases kept
    if kind == "w4a16_fused":
        assert model.fuse_projections(fuse_w4a16) == 2 * args.num_hidden_layers
    return model


def decode_steps(model: Llama, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 7 + steps), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, 7 + steps)
    with torch.inference_mode():
        model(cache, 0, input_ids=ids[:, :7])
        logits = [model(cache, p, input_ids=ids[:, p : p + 1]) for p in range(7, 7 + steps)]
    return torch.cat(logits, dim=1), torch.stack([*cache.keys, *cache.values]).float()


@needs_native
@pytest.mark.parametrize("kind", ["dense", "w4a16", "w4a16_fused"])
def test_native_decode_with_qkv_biases_equals_the_per_op_path(kind: str) -> None:
    model = native_qwen2(kind)
    op_by_op = copy.deepcopy(model)
    assert not put_on_cpu_path(op_by_op, one_call_decode=False).native_decode
    # The biases no longer send Qwen2 to the per-op path.
    assert put_on_cpu_path(model).native_decode
    assert isinstance(model.model, NativeDecodeBody) and model.model.decoder is not None
    plan = model.model.decoder.plan
    assert all(len(layer.qkv_bias) == len(layer.qkv) for layer in plan.layers)
    fast, fast_cache = decode_steps(model)
    slow, slow_cache = decode_steps(op_by_op)
    # fp32: the same matmul kernels, other fp32 summation orders around them. bf16: the same
    # kernels in the same order, up to SiLU's exp (a rare bf16 rounding flip).
    tolerance = 2e-2 if NATIVE_DTYPE is torch.bfloat16 else 1e-4
    assert float((fast - slow).abs().max()) < tolerance * float(slow.abs().max())
    assert float((fast_cache - slow_cache).abs().max()) < tolerance * float(slow_cache.abs().max())
    # Without its biases the model decodes visibly differently (by ~40 % of the largest logit,
    # fp32 and bf16 alike): the check above sees them.
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(getattr(module, "bias", None), Tensor):
                module.bias.zero_()  # in place: the native plan reads them where they are
    unbiased, _ = decode_steps(model)
    visible = max(0.1, 5 * tolerance)
    assert float((unbiased - slow).abs().max()) > visible * float(slow.abs().max())


@needs_native
def test_an_o_proj_bias_still_keeps_the_per_op_path() -> None:
    model = native_qwen2("dense")
    assert put_on_cpu_path(model).native_decode
    biased = Llama(dataclasses.replace(model.args, attention_bias=True))
    assert not put_on_cpu_path(biased.to(torch.bfloat16).to(NATIVE_DTYPE)).native_decode
