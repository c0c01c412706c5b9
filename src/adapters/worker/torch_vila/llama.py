"""A compact Llama decoder (gpt-fast style) with a preallocated KV cache that we own.

It also runs Qwen2 (NVILA's LLM): the same decoder with a bias on q/k/v only. Parameter names
match Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` exactly, so an HF state dict loads
unchanged, and every projection stays a plain `nn.Linear` at its HF name so that quantized
linears can later be swapped in by name. Numerics follow HF's Llama (transformers v5) step for
step -- RMSNorm in fp32, rotate-half RoPE with fp32 angles cast to the activation dtype, llama3
and linear RoPE scaling -- so fp32 logits agree with HF to float rounding.

Usage (the config is read by `llama_config.LlamaArgs`, the cache is `kv_cache.KVCache`)::

    model = Llama(LlamaArgs.from_hf_config(config_json))
    model.load_hf_state_dict(state)
    cache = model.new_cache(batch=1, max_len=4096)
    logits = model(cache, 0, input_ids=prompt)            # prefill
    logits = model(cache, prompt_len, input_ids=next_ids)  # one decode step
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker.torch_vila.device import apply_keeping_dtypes, embedding_table
from vilaserve.adapters.worker.torch_vila.kv_cache import KVCache
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs, RopeScaling

# RoPE tables start this long (capped by max_position_embeddings) and grow on demand, so a
# 128K-context config does not pin 128 MB of tables that a 4K serving cache never reads.
_INITIAL_ROPE_POSITIONS = 4096

# Every Linear of a decoder layer, as named under `model.layers.{i}.` (HF names): the units
# that AWQ quantizes and that W4A16 swaps in.
DECODER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
# Old HF checkpoints saved the rotary inverse frequencies; they are derived, never loaded.
DERIVED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_inv_freq(args: LlamaArgs) -> Tensor:
    """Per-pair inverse frequencies [head_dim // 2] in fp32, computed the way HF does."""
    dim = args.head_dim
    # On the CPU even under a meta-device context (`Llama.empty`): a tiny computation there,
    # where on meta tensors torch's Python decompositions would import torch._dynamo (seconds).
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1 frequency-dependent interpolation.

    Wavelengths shorter than original_len / high_freq_factor are kept, longer than
    original_len / low_freq_factor are divided by `factor`, and the band between is blended
    linearly in original_len / wavelength. Same operation order as HF for bitwise parity.
    """
    original = scaling.original_max_position_embeddings
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long_waves = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, long_waves)


class RotaryTable(nn.Module):
    """cos/sin of every position's rotation angles, [positions, head_dim], always fp32.

    The buffers are non-persistent (derived, not checkpoint state). They stay fp32 through
    `model.to(bf16)`: HF computes angles and cos/sin in fp32 and casts only the result to the
    activation dtype, which `Llama` does per forward on the few rows it reads.
    """

    inv_freq: Tensor
    cos: Tensor
    sin: Tensor

    def __init__(self, inv_freq: Tensor, length: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos, sin = self._build(inv_freq, length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Tables cast to an activation dtype, made once: the decode step then only slices.
        self._cast: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @property
    def length(self) -> int:
        return self.cos.shape[0]

    def ensure(self, length: int) -> None:
        """Grows the tables to cover positions [0, length); a no-op on the hot path."""
        if length > self.length:
            self.cos, self.sin = self._build(self.inv_freq, length)
            self._cast.clear()

    def rows(self, start: int, end: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin for positions [start, end) in `dtype` (cast from fp32 as HF does)."""
        if dtype == self.cos.dtype:
            return self.cos[start:end], self.sin[start:end]
        cast = self._cast.get(dtype)
        if cast is None:
            cast = self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return cast[0][start:end], cast[1][start:end]

    @staticmethod
    def _build(inv_freq: Tensor, length: int) -> tuple[Tensor, Tensor]:
        positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None, :]
        # Rotate-half layout: dims i and i + head_dim/2 form a pair and share one angle.
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RotaryTable:
        # Module.to(dtype) / .half() would cast these tables along with the weights, and a
        # bf16 round trip would lose precision for good. Follow device moves, undo dtype casts.
        apply_keeping_dtypes(self, fn, recurse)
        self._cast.clear()
        return self


class LayerStep(NamedTuple):
    """What every layer needs about the positions of one forward call, built once per call.

    A batch of running sequences (`Llama.decode_rows`) has one position per row: then `rows`
    and `positions` (int64 [B]) say where each row's new key goes, `lengths` how many cached
    positions each row attends to, and cos / sin are [B, 1, 1, head_dim].
    """

    start_pos: int
    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    is_causal: bool
    rows: Tensor | None = None
    positions: Tensor | None = None
    lengths: tuple[tuple[int, int], ...] = ()  # (cache row, length) per batch row
    # Packed prefill (`Llama.prefill_packed`): several prompts' chunks side by side in one
    # [1, sum T] batch, each with its cache row and its own step (positions, RoPE rows, mask).
    segments: tuple[tuple[int, LayerStep], ...] = ()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 and cast back before the weight, exactly like HF's LlamaRMSNorm.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, D]; cos/sin: [T, D] in x's dtype."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.groups = args.num_attention_heads // args.num_key_value_heads
        q_width = args.num_attention_heads * args.head_dim
        kv_width = args.num_key_value_heads * args.head_dim
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.hidden_size, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, args.hidden_size, bias=args.attention_bias)
        # Set by `fuse_projections`: one layer computing [q | k | v] instead of three.
        self.qkv_proj: nn.Module | None = None
        self._qkv_widths = (q_width, kv_width, kv_width)

    def fuse_projections(self, fuse: Callable[[list[nn.Module]], nn.Module | None]) -> bool:
        fused = fuse([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of `x` [B, T, hidden], each [B, T, heads * head_dim]."""
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self._qkv_widths, dim=-1)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.project(x)
        if step.segments:
            return self.o_proj(self._attend_segments(q, k, v, step, cache))
        if step.rows is not None:
            return self.o_proj(self._attend_rows(q, k, v, step, cache).view(batch, 1, -1))
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = _apply_rope(q, step.cos, step.sin)
        k = _apply_rope(k, step.cos, step.sin)
        keys, values = cache.update(self.layer_idx, step.start_pos, k, v)
        out = self._attend(q, keys, values, step)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _attend_segments(
        self, q: Tensor, k: Tensor, v: Tensor, step: LayerStep, cache: KVCache
    ) -> Tensor:
        """Packed prefill: the projections ran once for every prompt's rows (one GEMM each);
        attention runs per prompt, each over its own cache row. Returns [1, sum T, width]."""
        outs, at = [], 0
        for row, own in step.segments:
            n = own.cos.shape[0]
            qs = q[:, at : at + n].view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
            ks = k[:, at : at + n].view(1, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            vs = v[:, at : at + n].view(1, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
            qs, ks = _apply_rope(qs, own.cos, own.sin), _apply_rope(ks, own.cos, own.sin)
            keys, values = cache.update_row(self.layer_idx, row, own.start_pos, ks, vs)
            outs.append(self._attend(qs, keys, values, own).transpose(1, 2).reshape(1, n, -1))
            at += n
        return torch.cat(outs, dim=1)

    def _attend_rows(
        self, q: Tensor, k: Tensor, v: Tensor, step: LayerStep, cache: KVCache
    ) -> Tensor:
        """One new position per row, each row at its own position of its own cache row."""
        batch, dim = q.shape[0], self.head_dim
        q = _apply_rope(q.view(batch, 1, self.n_heads, dim).transpose(1, 2), step.cos, step.sin)
        k = _apply_rope(k.view(batch, 1, self.n_kv_heads, dim).transpose(1, 2), step.cos, step.sin)
        layer_keys, layer_values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        layer_keys[step.rows, :, step.positions] = k[:, :, 0]
        layer_values[step.rows, :, step.positions] = v.view(batch, self.n_kv_heads, dim)
        # Rows differ in length: each attends over its own prefix (views, no copies).
        outs = [
            self._attend_one(
                q[b : b + 1], layer_keys[r : r + 1, :, :n], layer_values[r : r + 1, :, :n]
            )
            for b, (r, n) in enumerate(step.lengths)
        ]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, step: LayerStep) -> Tensor:
        if step.mask is None and q.shape[2] == 1:
            return self._attend_one(q, keys, values)
        if step.mask is None:
            # Decode (one query sees every cached key) or a fresh prefill (plain causal): the
            # flash kernels handle GQA natively here, so the KV heads are not copied.
            return F.scaled_dot_product_attention(
                q,
                keys,
                values,
                is_causal=step.is_causal,
                scale=self.scale,
                enable_gqa=self.groups > 1,
            )
        # Chunked prefill needs an explicit mask; the kernels that take a mask do not take
        # GQA, so expand KV heads (query head h reads KV head h // groups, as in HF).
        if self.groups > 1:
            keys = keys.repeat_interleave(self.groups, dim=1)
            values = values.repeat_interleave(self.groups, dim=1)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=step.mask, scale=self.scale
        )

    def _attend_one(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Decode: one query per row. Three small matmuls cost less than the flash kernel's
        setup at this size, and GQA needs no copies: the query heads that share a KV head
        become the rows of one matmul. Same arithmetic as HF's eager attention."""
        batch, heads, _, dim = q.shape
        grouped = q.reshape(batch, self.n_kv_heads, self.groups, dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, values).view(batch, heads, 1, dim)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # set by `fuse_projections`: [gate | up]

    def fuse_projections(self, fuse: Callable[[list[nn.Module]], nn.Module | None]) -> bool:
        fused = fuse([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBody(nn.Module):
    """Holds what HF keeps under `model.` so the state-dict keys line up."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.embed_tokens = embedding_table(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def run_layers(self, hidden: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        """Every decoder layer, op by op. `hidden` belongs to this call: a body that a CPU path
        swaps in (cpu_path.py) may run a decode step natively, updating it in place."""
        for layer in self.layers:
            hidden = layer(hidden, step, cache)
        return hidden


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        initial = min(args.max_position_embeddings, _INITIAL_ROPE_POSITIONS)
        self.rope = RotaryTable(rope_inv_freq(args), initial)

    @classmethod
    def empty(cls, args: LlamaArgs, dtype: torch.dtype, device: torch.device | str) -> Llama:
        """A model with uninitialised weights, for loading into: random init of billions of
        parameters would cost more than the load itself."""
        with torch.device("meta"):
            model = cls(args)
        model.to_empty(device=device).to(dtype)
        # The RoPE tables are derived, not loaded: rebuild them on the real device.
        initial = min(args.max_position_embeddings, _INITIAL_ROPE_POSITIONS)
        model.rope = RotaryTable(rope_inv_freq(args).to(device), initial)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    @property
    def dtype(self) -> torch.dtype:
        # The final norm, not the embedding: a compressed (int8) table must not change this.
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def fuse_projections(self, fuse: Callable[[list[nn.Module]], nn.Module | None]) -> int:
        """Lets `fuse` merge each layer's q/k/v and gate/up layers (it returns None to decline:
        only some kernels gain from it). Returns how many merges happened. Inference only: the
        state dict of a fused model no longer has the separate projections."""
        merged = 0
        for layer in self.model.layers:
            merged += layer.self_attn.fuse_projections(fuse) + layer.mlp.fuse_projections(fuse)
        return merged

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A zeroed cache for `batch` rows and up to `max_len` positions, in the model's dtype."""
        self.rope.ensure(max_len)
        args = self.args
        return KVCache(
            num_layers=args.num_hidden_layers,
            batch=batch,
            kv_heads=args.num_key_value_heads,
            max_len=max_len,
            head_dim=args.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        cache: KVCache,
        start_pos: int,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        last_only: bool = True,
    ) -> Tensor:
        """Runs T new positions [start_pos, start_pos + T) for every row of the batch.

        Their keys/values go into `cache`; attention is causal over cache[:start_pos + T].
        Returns fp32 logits [B, T, vocab], or [B, 1, vocab] for the last position when
        `last_only`.
        """
        hidden = self._input_hidden(input_ids, inputs_embeds)
        batch, length, _ = hidden.shape
        _check_fits(cache, batch, start_pos, length)
        hidden = self.model.run_layers(hidden, self.make_step(start_pos, length, hidden), cache)
        if last_only:
            # Norm and head are per position: skip them for positions nobody reads.
            hidden = hidden[:, -1:]
        return self.lm_head(self.model.norm(hidden)).float()

    def prefill_packed(self, cache: KVCache, chunks: Sequence[tuple[int, int, Tensor]]) -> Tensor:
        """Prefills several prompts' chunks in one forward: chunk i, embeddings [1, T_i,
        hidden], goes to positions [start_i, start_i + T_i) of cache row row_i (rows distinct).
        Every linear runs once over all the chunks' rows; attention runs per chunk. Returns fp32
        logits [len(chunks), vocab] of each chunk's last position."""
        rows = [row for row, _, _ in chunks]
        if len(set(rows)) != len(rows):
            raise ValueError(f"packed chunks must go to distinct cache rows, got {rows}")
        hidden = torch.cat([embeds.reshape(-1, embeds.shape[-1]) for _, _, embeds in chunks])[None]
        segments, ends, at = [], [], 0
        for row, start, embeds in chunks:
            length = embeds.shape[-2]
            if not 0 <= row < cache.batch or start < 0 or start + length > cache.max_len:
                raise ValueError(
                    f"chunk of {length} at {start} in row {row} is outside the cache "
                    f"({cache.batch} x {cache.max_len})"
                )
            segments.append((row, self.make_step(start, length, hidden)))
            at += length
            ends.append(at - 1)
        first = segments[0][1]
        step = LayerStep(0, first.cos, first.sin, None, False, segments=tuple(segments))
        hidden = self.model.run_layers(hidden, step, cache)
        last = hidden[0, torch.tensor(ends, device=hidden.device)]
        return self.lm_head(self.model.norm(last)).float()

    def decode_rows(
        self, cache: KVCache, rows: Tensor, positions: Tensor, input_ids: Tensor
    ) -> Tensor:
        """One decode step for a batch of sequences that sit at different positions.

        Row b feeds token input_ids[b] at position positions[b] of cache row rows[b] (all int64
        [B], `rows` distinct) and attends to that row's positions [0, positions[b]]. Returns
        fp32 logits [B, vocab]. `positions` and `rows` must be on the CPU (the per-row lengths
        are read on the host); they are copied to the model's device here.
        """
        hidden = self.embed(input_ids.to(self.device).view(-1, 1))
        batch = hidden.shape[0]
        top = int(positions.max()) + 1
        if top > cache.max_len or int(rows.max()) >= cache.batch:
            raise ValueError(f"rows/positions outside the cache ({cache.batch} x {cache.max_len})")
        self.rope.ensure(top)
        cos_table, sin_table = self.rope.rows(0, top, hidden.dtype)
        device_positions = positions.to(self.device)
        step = LayerStep(
            start_pos=0,
            cos=cos_table[device_positions].view(batch, 1, 1, -1),
            sin=sin_table[device_positions].view(batch, 1, 1, -1),
            mask=None,
            is_causal=False,
            rows=rows.to(self.device),
            positions=device_positions,
            lengths=tuple(zip(rows.tolist(), (positions + 1).tolist(), strict=True)),
        )
        hidden = self.model.run_layers(hidden, step, cache)
        return self.lm_head(self.model.norm(hidden))[:, 0].float()

    def _input_hidden(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            return self.embed(input_ids)
        assert inputs_embeds is not None
        # Vision features may arrive in fp32 while the model runs in bf16; a copy either way,
        # since the layers may update the hidden state in place (LlamaBody.run_layers).
        return inputs_embeds.to(self.dtype, copy=True)

    def make_step(self, start_pos: int, length: int, hidden: Tensor) -> LayerStep:
        """Positions, RoPE rows and mask shared by every layer of one forward (also used by
        the AWQ quantizer to run single layers)."""
        end = start_pos + length
        self.rope.ensure(end)
        # HF casts its fp32 cos/sin to the activation dtype before rotating; same here.
        cos, sin = self.rope.rows(start_pos, end, hidden.dtype)
        mask = None
        if length > 1 and start_pos > 0:
            # SDPA's is_causal aligns the triangle top-left, which is wrong when the queries
            # start mid-sequence: query i (absolute start_pos + i) sees keys 0..start_pos + i.
            mask = torch.ones(length, end, dtype=torch.bool, device=hidden.device)
            mask = mask.tril(diagonal=start_pos)
        return LayerStep(start_pos, cos, sin, mask, is_causal=length > 1 and start_pos == 0)

    def load_hf_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copies an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` state dict into this model
        (cast to its dtype). For a checkpoint on disk `llm_loading.load_llm_weights` streams
        the tensors instead of holding a second copy of the model.

        With tied embeddings the head is the embedding: a saved `lm_head.weight` is ignored
        (as HF does) and may be absent. Raises ValueError naming missing/unexpected keys.
        """
        tied = self.args.tie_word_embeddings
        expected = set(self.state_dict())
        provided = {k: v for k, v in state.items() if not k.endswith(DERIVED_KEY_SUFFIXES)}
        if tied:
            expected.discard(HEAD_KEY)
            provided.pop(HEAD_KEY, None)
        missing = sorted(expected - provided.keys())
        unexpected = sorted(provided.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the {self.args.model_type} layout: "
                f"missing {describe_keys(missing)}; unexpected {describe_keys(unexpected)}"
            )
        if tied:
            provided[HEAD_KEY] = provided[EMBED_KEY]
        self.load_state_dict(provided, strict=True)


def _check_fits(cache: KVCache, batch: int, start_pos: int, length: int) -> None:
    # Plain int comparisons: no device work, so they cost nothing on the decode path.
    if batch != cache.batch:
        raise ValueError(f"batch {batch} does not match the cache's batch {cache.batch}")
    if length < 1 or start_pos < 0:
        raise ValueError(f"need start_pos >= 0 and at least one position ({start_pos=}, {length=})")
    if start_pos + length > cache.max_len:
        raise ValueError(
            f"positions up to {start_pos + length} exceed the cache length {cache.max_len}"
        )


def describe_keys(keys: list[str], limit: int = 20) -> str:
    """`keys` for an error message: the first `limit`, then how many more."""
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"
