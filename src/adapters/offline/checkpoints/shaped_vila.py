"""Random checkpoints at a released model's shape, for speed measurements (their values do not
matter to speed): a W4A16 VILA checkpoint directory the worker serves, and a Q4_0 GGUF of the
same LLM for llama.cpp.

`VILA15_3B` is VILA1.5-3B: a 2.7B Llama LLM (Sheared-LLaMA shape), SigLIP-so400m at 384 px
(27 x 27 patches of 14 px) and the `mlp_downsample` projector (196 positions per image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vilaserve.adapters.offline.awq_checkpoint_writing import save_hf_awq_directory
from vilaserve.adapters.offline.checkpoints import vila_layout
from vilaserve.adapters.offline.checkpoints.tiny_vila import (
    _build_projector,
    _randomize,
    build_tokenizer,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

GROUP = 128


@dataclass(frozen=True)
class VilaShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    context: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int


VILA15_3B = VilaShape(
    vocab=32000, hidden=2560, intermediate=6912, layers=32, heads=20, kv_heads=20, context=4096,
    vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16,
    image_size=384, patch_size=14,
)  # fmt: skip


def _linears(shape: VilaShape) -> dict[str, tuple[int, int]]:
    """Every decoder linear's (out, in) under its HF name."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    per_layer = {
        "self_attn.q_proj": (shape.heads * head_dim, shape.hidden),
        "self_attn.k_proj": (kv, shape.hidden),
        "self_attn.v_proj": (kv, shape.hidden),
        "self_attn.o_proj": (shape.hidden, shape.heads * head_dim),
        "mlp.gate_proj": (shape.intermediate, shape.hidden),
        "mlp.up_proj": (shape.intermediate, shape.hidden),
        "mlp.down_proj": (shape.hidden, shape.intermediate),
    }
    return {
        f"model.layers.{i}.{name}": dims
        for i in range(shape.layers)
        for name, dims in per_layer.items()
    }


def _random_int4(n: int, k: int, gen: torch.Generator) -> QuantizedWeight:
    groups = k // GROUP
    return QuantizedWeight(
        q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(n, groups, generator=gen) * 0.004 + 0.001).to(torch.float16),
        zeros=torch.full((n, groups), 8, dtype=torch.uint8),
        group_size=GROUP,
        bias=None,
    )


def fill_vocabulary(llm_dir: Path, vocab: int) -> Path:
    """Pads the small trained tokenizer with plain word tokens up to the model's `vocab`, so
    that every id a random model samples decodes to text (and streams as it comes)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    missing = vocab - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f" w{i}" for i in range(missing)])
        tokenizer.save_pretrained(llm_dir)
    return llm_dir


def build_shaped_vila(root: Path, shape: VilaShape = VILA15_3B, seed: int = 0) -> Path:
    """A random W4A16 VILA-1.5 checkpoint (HF AWQ GEMM `llm/`, 16-bit tower and projector)."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    llm_dir = fill_vocabulary(build_tokenizer(root / "llm", "llama"), shape.vocab)
    quantized = {
        name: _random_int4(n, k, gen)
        for name, (n, k) in tqdm(_linears(shape).items(), desc="random int4 layers", leave=False)
    }
    std = 0.02

    def randn(*dims: int) -> torch.Tensor:
        return (torch.randn(dims, generator=gen) * std).to(torch.bfloat16)

    plain = {
        "model.embed_tokens.weight": randn(shape.vocab, shape.hidden),
        "lm_head.weight": randn(shape.vocab, shape.hidden),
        "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
    }
    for i in range(shape.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plain[f"model.layers.{i}.{norm}.weight"] = torch.ones(
                shape.hidden, dtype=torch.bfloat16
            )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.context,
        "tokenizer_model_max_length": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    save_hf_awq_directory(llm_dir, quantized, plain, config, GROUP)
    vision_cfg = _build_vision(root / "vision_tower", shape, gen)
    projector_cfg = _build_projector(
        root / "mm_projector", "siglip", gen, shape.vision_hidden, shape.hidden, std
    )
    llm_cfg = json.loads((llm_dir / "config.json").read_text())
    vila_layout.write_root(
        root, vila_layout.root_config("siglip", llm_cfg, vision_cfg, projector_cfg)
    )
    return root


def _build_vision(out_dir: Path, shape: VilaShape, gen: torch.Generator) -> dict[str, Any]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        num_channels=3,
        architectures=["SiglipVisionModel"],
    )
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    _randomize(model, gen, 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    vila_layout.write_json(
        out_dir / "preprocessor_config.json",
        vila_layout.preprocessor_config("siglip", shape.image_size),
    )
    saved: dict[str, Any] = json.loads((out_dir / "config.json").read_text())
    saved.setdefault("torch_dtype", "bfloat16")
    vila_layout.write_json(out_dir / "config.json", saved)
    return saved


def write_q4_0_gguf(path: Path, shape: VilaShape = VILA15_3B, seed: int = 0) -> Path:
    """The LLM of `shape` as a llama.cpp GGUF: random Q4_0 linears and token table, fp32 norms,
    and a SentencePiece-style vocabulary (<unk>, <s>, </s>, byte tokens, filler pieces)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("random VILA1.5-3B LLM shape")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(shape.vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (shape.vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(shape.vocab)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def q4_0(rows: int, cols: int) -> np.ndarray:
        # Q4_0 blocks: an fp16 scale, then 16 bytes of 32 nibbles (weight = scale * (q - 8)).
        blocks = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
        blocks[:, :, :2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        return blocks.reshape(rows, cols // 32 * 18)

    def add_q(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(
            name, q4_0(rows, cols), raw_shape=(rows, cols // 32 * 18),
            raw_dtype=gguf.GGMLQuantizationType.Q4_0,
        )  # fmt: skip

    add_q("token_embd.weight", shape.vocab, shape.hidden)
    ones = np.ones(shape.hidden, dtype=np.float32)
    writer.add_tensor("output_norm.weight", ones)
    add_q("output.weight", shape.vocab, shape.hidden)
    gguf_names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, (n, k) in tqdm(_linears(shape).items(), desc="random Q4_0 layers", leave=False):
        layer, part = name.removeprefix("model.layers.").split(".", 1)
        add_q(f"blk.{layer}.{gguf_names[part]}.weight", n, k)
        if part == "self_attn.q_proj":
            writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
            writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
