"""AWQ (activation-aware weight quantization) for our `Llama`, producing canonical 4-bit weights.

This follows llm-awq's algorithm (see shared/reference/vila-tinychat-awq.md, section 3):

1. Layer by layer, run the *fp* decoder block on the calibration activations, caching the inputs
   of its linears; the block's output (before any scaling/clipping) feeds the next block, so
   quantization error never propagates into the calibration data.
2. Scale search: for four (previous op -> linears) groups, try `s = mean|x|^alpha` on a grid and
   keep the alpha whose fake-quantized group reproduces the inspected module's fp output best.
   Apply it function-preservingly: the previous op's output is divided by `s` (RMSNorm weight or
   the previous linear's rows) and the linears' input columns are multiplied by `s`.
3. Clip search: per (output channel, group), shrink the clipping range and keep the max value
   that best preserves the per-group partial sums on a token subsample.
4. Round-to-nearest the result into `QuantizedWeight`s (asymmetric, zero point, fp16 scales).

Steps 1-3 are `search_awq`, whose result (`AwqReport`: the scales and the clips' shrink steps)
can be saved (awq_search_file.py); `apply_awq` does the rescale, clip and step 4 from a result
alone, bit for bit as quantizing while searching. `quantize_llama` is the two in a row.

`AwqConfig.llm_awq()` is exactly that; the default `AwqConfig()` (recipe "vilaserve") adds three
refinements, each a flag: GQA models get the v -> o group too (one scale per v row), the scales
follow AutoAWQ's duo rule (`x_stat^a / w_stat^(1-a)`), and the clip search shrinks each group's
top and bottom independently, on up to 4096 tokens. On SmolLM2-135M (WikiText-2, W4 g64) they
take AWQ from 44.2 % to 50.0 % of RTN's perplexity gap closed (benchmarks/awq_quality.py).
`AwqConfig(search_scales=False, search_clip=False)` is plain round-to-nearest (RTN).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.torch_vila.kv_cache import KVCache
from vilaserve.adapters.worker.torch_vila.llama import (
    DECODER_LINEARS,
    DecoderLayer,
    LayerStep,
    Llama,
    RMSNorm,
)

# Which cached input each linear reads: q/k/v share the attention input and gate/up share the
# MLP input, so each activation tensor is cached once rather than per linear.
_FEATURE_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
# llm-awq never clips q/k: their outputs go through softmax, where per-group partial-sum error is
# a poor proxy for the real error.
_CLIPPED = ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The clip shrink factors are 1 - i / _CLIP_GRID (llm-awq's auto_clip_layer n_grid).
_CLIP_GRID = 20
# Lower bound on s = x_stat^alpha before normalising, as in llm-awq (keeps dead channels finite).
_MIN_SCALE = 1e-4
# Largest finite fp16 value: quantization scales are stored in fp16.
_FP16_MAX = 65504.0
# Tokens per forward chunk when running a block/module over the calibration set: bounds the
# transient memory of attention/MLP intermediates without changing any result.
_CHUNK_TOKENS = 8192


@dataclass
class AwqConfig:
    """The search. The defaults are this project's recipe; `AwqConfig.llm_awq()` is llm-awq's
    search exactly (what the demo build and the reference-rule tests use)."""

    group_size: int = 128
    w_bit: int = 4
    n_grid: int = 20  # alphas 0, 1/n_grid, ..., (n_grid-1)/n_grid (alpha = 1 is never tried)
    search_scales: bool = True
    search_clip: bool = True
    clip_tokens: int = 4096  # tokens subsampled (by stride) for the clip search; llm-awq: 512
    max_shrink_steps: int = 10  # shrink factors 1.00, 0.95, ..., 0.55
    # Scale o_proj's inputs through v_proj's rows in GQA models too (llm-awq skips the group
    # there), with one scale per v row shared by the query heads that read it.
    gqa_v_to_o: bool = True
    # AutoAWQ's duo scaling: s = x_stat^alpha / w_stat^(1 - alpha), w_stat the mean of |w|
    # relative to its group's max per input channel (llm-awq: s = x_stat^alpha).
    duo_scaling: bool = True
    # Shrink the top and the bottom of each group's range independently (the quantizer is
    # asymmetric); llm-awq clamps to +-max|w| * shrink, one factor for both ends.
    two_sided_clip: bool = True

    @classmethod
    def llm_awq(cls, **overrides: Any) -> AwqConfig:
        """llm-awq's search, rule for rule (section 3 of the AWQ reference)."""
        settings: dict[str, Any] = dict(
            clip_tokens=512, gqa_v_to_o=False, duo_scaling=False, two_sided_clip=False
        )
        return cls(**{**settings, **overrides})


# Quantizer recipes by name (`vilaserve quantize --recipe`).
RECIPES = {"vilaserve": AwqConfig, "llm-awq": AwqConfig.llm_awq}


@dataclass(frozen=True)
class HeadSharing:
    """How o_proj's input columns map onto v_proj's rows under GQA: query head h reads KV head
    h // repeats, so column h * head_dim + d carries v row (h // repeats) * head_dim + d."""

    repeats: int  # query heads per KV head
    head_dim: int

    def pool(self, column_stat: Tensor) -> Tensor:
        """Per-column statistic [heads * head_dim] -> per v row (mean over sharing heads)."""
        return column_stat.view(-1, self.repeats, self.head_dim).mean(dim=1).reshape(-1)

    def spread(self, row_scales: Tensor) -> Tensor:
        """Per v row scales -> per o_proj input column."""
        rows = row_scales.view(-1, 1, self.head_dim)
        return rows.expand(-1, self.repeats, self.head_dim).reshape(-1)


def _input_scales(scales: Tensor, sharing: HeadSharing | None) -> Tensor:
    """The factors for the scaled linears' input columns, from one scale per prev-op output."""
    return scales if sharing is None else sharing.spread(scales)


@dataclass
class ScaleSearch:
    """One applied scale: `prev_op`'s output was divided by `scales`, `linears`' inputs
    multiplied by it (names are full HF module names, as in llm-awq's `--dump_awq`)."""

    prev_op: str
    linears: tuple[str, ...]
    alpha: float
    loss: float
    losses: list[float]  # one per alpha tried, for diagnostics
    scales: Tensor  # fp32, one per output of prev_op that feeds the linears
    sharing: HeadSharing | None = None  # GQA v -> o: how `scales` spread over o_proj's inputs

    def input_scales(self) -> Tensor:
        """The factors the linears' input columns were multiplied by."""
        return _input_scales(self.scales, self.sharing)


@dataclass
class ClipChoice:
    """The clip search's answer for one linear, per (output channel, group): how many
    1/_CLIP_GRID steps the group's range was shrunk. Steps rather than the clamp values: the
    clamp is recomputed from the (rescaled) weight, so a saved choice reapplies bit for bit
    and takes a byte per group instead of two fp32 numbers."""

    top_steps: Tensor  # uint8 [N, groups]: the group's max (or max|w|) times 1 - step/_CLIP_GRID
    # uint8 [N, groups] with two-sided clipping: the group's min shrinks by its own steps;
    # None: llm-awq's symmetric clamp to +-max|w| * (1 - top_step/_CLIP_GRID).
    bottom_steps: Tensor | None = None

    def bounds(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The (low, high) clamp [N, groups, 1] of `weight` [N, K] under this choice."""
        groups = weight.reshape(weight.shape[0], self.top_steps.shape[1], -1)
        return _clip_bounds(_group_range(groups, self.bottom_steps is not None), self)


@dataclass
class AwqReport:
    """What the search decided (its result: `apply_awq` quantizes a model with it, and
    adapters/offline/awq_search_file.py stores it); `quantize_llama` fills one in if given."""

    # In search order: each rescale is applied after the ones before it.
    scale_searches: list[ScaleSearch] = field(default_factory=list)
    clips: dict[str, ClipChoice] = field(default_factory=dict)  # by HF module name


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


# --------------------------------------------------------------------------- quantizer


def _quant_params(w: Tensor, group_size: int, w_bit: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scales, zeros) in fp32, shaped [N, G, group] / [N, G, 1] / [N, G, 1].

    The scales are rounded to fp16 *before* q and zeros are derived from them, so dequantizing
    with the stored fp16 scales reproduces the fake-quantized weight exactly.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group size {group_size}")
    max_int = 2**w_bit - 1
    groups = w.to(torch.float32).reshape(n, k // group_size, group_size)
    w_max = groups.amax(dim=-1, keepdim=True)
    w_min = groups.amin(dim=-1, keepdim=True)
    scales = ((w_max - w_min).clamp(min=1e-5) / max_int).clamp(max=_FP16_MAX)
    scales = scales.to(torch.float16).to(torch.float32)
    zeros = (-torch.round(w_min / scales)).clamp(0, max_int)
    q = (torch.round(groups / scales) + zeros).clamp(0, max_int)
    return q, scales, zeros


def pseudo_quantize(w: Tensor, group_size: int, w_bit: int = 4) -> Tensor:
    """Asymmetric (zero-point) round-to-nearest of `w` [N, K] in groups of `group_size` along
    K, dequantized back; computed in fp32 and returned in `w`'s dtype."""
    q, scales, zeros = _quant_params(w, group_size, w_bit)
    return ((q - zeros) * scales).reshape(w.shape).to(w.dtype)


def quantize_to_canonical(
    w: Tensor, group_size: int, w_bit: int = 4, bias: Tensor | None = None
) -> QuantizedWeight:
    """The canonical form of `pseudo_quantize(w, group_size, w_bit)`: its `dequantize()` equals
    that tensor exactly (both use the same fp16-rounded scales)."""
    if w_bit > 8:
        raise ValueError(f"w_bit {w_bit} does not fit the uint8 canonical layout")
    q, scales, zeros = _quant_params(w, group_size, w_bit)
    n = w.shape[0]
    return QuantizedWeight(
        q=q.reshape(w.shape).to(torch.uint8),
        scales=scales.reshape(n, -1).to(torch.float16),
        zeros=zeros.reshape(n, -1).to(torch.uint8),
        group_size=group_size,
        bias=None if bias is None else bias.detach().clone(),
    )


# --------------------------------------------------------------------------- calibration data


def calibration_blocks(
    tokenizer: Tokenizer, text: str, n_samples: int = 128, seqlen: int = 512, seed: int = 0
) -> Tensor:
    """llm-awq's `get_calib_dataset` on a local text: int64 [n_blocks, seqlen].

    Non-empty lines are shuffled with `seed`, each encoded with the tokenizer's special tokens
    (BOS for Llama), lines longer than `seqlen` tokens skipped; the first `n_samples` accepted
    lines are concatenated and cut into `seqlen` blocks, the remainder dropped.
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    random.Random(seed).shuffle(lines)
    samples: list[int] = []
    accepted = 0
    for line in lines:
        if accepted == n_samples:
            break
        ids = list(tokenizer.encode(line))
        if not ids or len(ids) > seqlen:
            continue
        samples.extend(ids)
        accepted += 1
    n_blocks = len(samples) // seqlen
    if n_blocks == 0:
        raise ValueError(
            f"calibration text gives {len(samples)} tokens from {accepted} usable lines "
            f"(of {len(lines)} non-empty), less than one {seqlen}-token block: provide more "
            f"text, raise n_samples, or lower seqlen"
        )
    return torch.tensor(samples[: n_blocks * seqlen], dtype=torch.int64).view(n_blocks, seqlen)


# --------------------------------------------------------------------------- block plumbing


class _NoCache(KVCache):
    """A prefill at position 0 attends only to the keys it has just computed, so calibration
    forwards need no storage: `update` hands the new keys/values straight back."""

    def __init__(self) -> None:  # deliberately allocates nothing (unlike KVCache)
        pass

    def update(
        self, layer: int, start_pos: int, keys: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        return keys, values


def _chunks(x: Tensor) -> Iterator[Tensor]:
    """Splits [B, T, ...] along B into pieces of about _CHUNK_TOKENS tokens."""
    per_chunk = max(1, _CHUNK_TOKENS // max(1, x.shape[1]))
    yield from x.split(per_chunk, dim=0)


def _run_chunked(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return torch.cat([fn(chunk) for chunk in _chunks(x)], dim=0)


def _mse_chunked(fn: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor) -> float:
    """mean((fn(x) - reference)^2) in fp32, without materialising the whole fn(x)."""
    total = 0.0
    offset = 0
    for chunk in _chunks(x):
        out = fn(chunk).to(torch.float32)
        ref = reference[offset : offset + chunk.shape[0]].to(torch.float32)
        total += float((out - ref).pow(2).sum())
        offset += chunk.shape[0]
    return total / reference.numel()


def _run_block(
    layer: DecoderLayer, hidden: Tensor, run_layer: Callable[[nn.Module, Tensor], Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """Runs the (fp) block on `hidden`; returns the inputs its linears saw and its output."""
    captured: dict[str, list[Tensor]] = {"attn_in": [], "o_in": [], "mlp_in": [], "down_in": []}
    # One hook per distinct input: q/k/v (and gate/up) receive the very same tensor.
    sources = {
        "attn_in": layer.self_attn.q_proj,
        "o_in": layer.self_attn.o_proj,
        "mlp_in": layer.mlp.gate_proj,
        "down_in": layer.mlp.down_proj,
    }
    handles = []
    for key, module in sources.items():

        def hook(_: nn.Module, args: tuple[Tensor, ...], key: str = key) -> None:
            captured[key].append(args[0].detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        output = _run_chunked(lambda x: run_layer(layer, x), hidden)
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts, dim=0) for key, parts in captured.items()}, output


# --------------------------------------------------------------------------- scale search


@dataclass
class _ScaleGroup:
    prev_op: str
    linears: tuple[str, ...]
    feature: str  # the cached input of the linears (and of the inspected module)
    inspect: Callable[[Tensor], Tensor]  # the module whose output the search compares
    sharing: HeadSharing | None = None


def _scale_groups(
    layer: DecoderLayer, attention: Callable[[Tensor], Tensor], config: AwqConfig
) -> list[_ScaleGroup]:
    """llm-awq's Llama groups, plus v -> o under GQA when `config.gqa_v_to_o`."""
    attn, mlp = layer.self_attn, layer.mlp
    q_k_v = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    groups = [_ScaleGroup("input_layernorm", q_k_v, "attn_in", attention)]
    # llm-awq (PR #67) skips v -> o under GQA, where a v row feeds several heads' columns; one
    # scale per v row, shared by those columns, keeps the rescale exact.
    gqa = attn.groups > 1
    if not gqa or config.gqa_v_to_o:
        sharing = HeadSharing(attn.groups, attn.head_dim) if gqa else None
        groups.append(
            _ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "o_in", attn.o_proj, sharing)
        )
    groups.append(
        _ScaleGroup(
            "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_in", mlp.forward
        )
    )
    groups.append(_ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "down_in", mlp.down_proj))
    return groups


def _search_scale(
    linears: list[nn.Linear],
    x: Tensor,
    inspect: Callable[[Tensor], Tensor],
    config: AwqConfig,
    sharing: HeadSharing | None = None,
) -> tuple[float, float, list[float], Tensor]:
    """Grid search over alpha; returns (alpha, loss, losses, scales). Weights are restored.

    The scales are per output of the previous op: with `sharing` (GQA v -> o) one per v row,
    spread over the o_proj columns that read it.
    """
    k = x.shape[-1]
    x_stat = x.reshape(-1, k).abs().mean(dim=0)
    w_stat = _weight_stat(linears, config.group_size) if config.duo_scaling else None
    if sharing is not None:
        x_stat = sharing.pool(x_stat)
        w_stat = None if w_stat is None else sharing.pool(w_stat)
    reference = _run_chunked(inspect, x)
    originals = [linear.weight.detach().clone() for linear in linears]
    losses: list[float] = []
    best: tuple[float, float, Tensor] | None = None
    try:
        for step in range(config.n_grid):
            alpha = step / config.n_grid
            s = x_stat.pow(alpha)
            if w_stat is not None:
                s = s / (w_stat.pow(1 - alpha) + 1e-4)
            s = s.clamp(min=_MIN_SCALE)
            # Normalising around the geometric middle keeps W * s in a sane numeric range.
            s = s / (s.max() * s.min()).sqrt()
            s_in = _input_scales(s, sharing)
            for linear, original in zip(linears, originals, strict=True):
                scaled = original * s_in[None, :]
                linear.weight.copy_(pseudo_quantize(scaled, config.group_size, config.w_bit) / s_in)
            loss = _mse_chunked(inspect, x, reference)
            losses.append(loss)
            if best is None or loss < best[1]:
                best = (alpha, loss, s.clone())
    finally:
        for linear, original in zip(linears, originals, strict=True):
            linear.weight.copy_(original)
    assert best is not None, "n_grid must be at least 1"
    return best[0], best[1], losses, best[2]


def _weight_stat(linears: list[nn.Linear], group_size: int) -> Tensor:
    """AutoAWQ's weight statistic: |w| over its group's max |w|, averaged per input channel
    across the output rows of every linear in the group."""
    w = torch.cat([linear.weight for linear in linears], dim=0)
    groups = w.abs().reshape(-1, group_size)
    relative = groups / groups.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return relative.reshape(w.shape).mean(dim=0)


def _apply_scale(
    prev: nn.Module, linears: list[nn.Linear], s: Tensor, sharing: HeadSharing | None
) -> None:
    """Function-preserving rescale: prev's output / s, the linears' input columns * s (spread
    over the heads that share a v row, with `sharing`)."""
    s_in = _input_scales(s, sharing)
    if isinstance(prev, RMSNorm):
        prev.weight.div_(s.to(prev.weight.dtype))
    elif isinstance(prev, nn.Linear):
        # Only the last len(s) output rows feed the scaled linears (all of them for Llama).
        rows = slice(prev.weight.shape[0] - s.numel(), None)
        prev.weight[rows].div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias[rows].div_(s.to(prev.bias.dtype))
    else:
        raise TypeError(f"cannot fold AWQ scales into {type(prev).__name__}")
    for linear in linears:
        linear.weight.mul_(s_in.to(linear.weight.dtype)[None, :])


def apply_awq_scales(model: nn.Module, searches: list[ScaleSearch]) -> None:
    """Re-applies recorded scales to a model by name (llm-awq's `--load_awq` for scales)."""
    with torch.no_grad():
        for search in searches:
            prev = model.get_submodule(search.prev_op)
            linears = [model.get_submodule(name) for name in search.linears]
            if not all(isinstance(linear, nn.Linear) for linear in linears):
                raise TypeError(f"{search.linears} are not all nn.Linear")
            s = search.scales.to(prev.weight.device)
            _apply_scale(prev, [m for m in linears if isinstance(m, nn.Linear)], s, search.sharing)


# --------------------------------------------------------------------------- clip search


def _fake_quant_last_dim(groups: Tensor, w_bit: int) -> Tensor:
    """pseudo_quantize on tensors already shaped [..., group] (same fp16-rounded scales)."""
    q, scales, zeros = _quant_params(groups.reshape(-1, groups.shape[-1]), groups.shape[-1], w_bit)
    return ((q - zeros) * scales).reshape(groups.shape)


def _group_range(groups: Tensor, two_sided: bool) -> tuple[Tensor | None, Tensor]:
    """What the clip shrinks, per group of `groups` [..., group] as [..., 1]: (min, max), or
    (None, max|w|) for the symmetric clamp."""
    if two_sided:
        return groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    return None, groups.abs().amax(dim=-1, keepdim=True)


def _clip_bounds(
    group_range: tuple[Tensor | None, Tensor], choice: ClipChoice
) -> tuple[Tensor, Tensor]:
    """(low, high) [..., 1]: the range shrunk by the choice's steps. The search and the
    application both clamp through here, so a saved choice reproduces the searched weight."""
    bottom, top = group_range
    factors = torch.tensor(
        [1 - step / _CLIP_GRID for step in range(_CLIP_GRID)],
        dtype=torch.float32,
        device=top.device,
    )
    high = top * factors[choice.top_steps.to(top.device).long()][..., None]
    if bottom is None or choice.bottom_steps is None:
        return -high, high
    return bottom * factors[choice.bottom_steps.to(top.device).long()][..., None], high


def _search_clip(w: Tensor, x: Tensor, config: AwqConfig) -> ClipChoice:
    """Best clamp per (output channel, group) for `w` [N, K], as shrink steps [N, G].

    llm-awq's search: candidates clamp to +-max|w| * (1 - i/20), i < max_shrink_steps. With
    `two_sided_clip`, the group's max and min shrink by independent factors instead (every
    pair). The error of a candidate is the mean over tokens of the squared change of each
    group's partial dot product, as in llm-awq; the partial sums are batched matmuls over
    groups, so the [channels, tokens, K] product llm-awq materialises is never built.
    """
    n, k = w.shape
    gs = config.group_size
    n_groups = k // gs
    tokens = x.reshape(-1, k)
    stride = max(1, tokens.shape[0] // config.clip_tokens)
    x_groups = tokens[::stride].reshape(-1, n_groups, gs).transpose(0, 1)  # [G, t, gs]
    steps = range(config.max_shrink_steps)
    candidates: list[tuple[int, int | None]] = (
        [(up, down) for up in steps for down in steps]
        if config.two_sided_clip
        else [(up, None) for up in steps]
    )
    batch = 256 if n % 256 == 0 else 64
    tops: list[Tensor] = []
    bottoms: list[Tensor] = []
    for start in range(0, n, batch):
        w_chunk = w[start : start + batch].reshape(-1, n_groups, gs)  # [c, G, gs]
        group_range = _group_range(w_chunk, config.two_sided_clip)
        shape = (w_chunk.shape[0], n_groups)
        org_out = torch.bmm(x_groups, w_chunk.permute(1, 2, 0))  # [G, t, c]
        best_err = torch.full(shape, float("inf"), device=w.device)
        best_top = torch.zeros(shape, dtype=torch.uint8, device=w.device)
        best_bottom = torch.zeros_like(best_top)
        for up, down in candidates:
            candidate = ClipChoice(
                torch.full_like(best_top, up),
                None if down is None else torch.full_like(best_top, down),
            )
            low, high = _clip_bounds(group_range, candidate)
            quantized = _fake_quant_last_dim(torch.clamp(w_chunk, low, high), config.w_bit)
            out = torch.bmm(x_groups, quantized.permute(1, 2, 0))
            err = (out - org_out).pow(2).mean(dim=1).transpose(0, 1)  # [c, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_top[better] = up
            best_bottom[better] = 0 if down is None else down
        tops.append(best_top.cpu())
        bottoms.append(best_bottom.cpu())
    return ClipChoice(
        torch.cat(tops, dim=0), torch.cat(bottoms, dim=0) if config.two_sided_clip else None
    )


def _apply_clip(linear: nn.Linear, choice: ClipChoice) -> None:
    low, high = choice.bounds(linear.weight)
    groups = linear.weight.view(linear.weight.shape[0], choice.top_steps.shape[1], -1)
    groups.copy_(torch.clamp(groups, low.to(groups.dtype), high.to(groups.dtype)))


# --------------------------------------------------------------------------- driver


def _check_inputs(model: Llama, calibration: Tensor, config: AwqConfig) -> None:
    if calibration.dim() != 2 or calibration.dtype != torch.int64:
        raise ValueError(
            f"calibration must be int64 [n_blocks, seqlen], got {calibration.dtype} "
            f"{tuple(calibration.shape)}"
        )
    if calibration.numel() == 0:
        raise ValueError("calibration has no tokens")
    args = model.args
    widths = (args.hidden_size, args.intermediate_size, args.num_attention_heads * args.head_dim)
    for width in widths:
        if width % config.group_size:
            raise ValueError(f"in_features {width} is not a multiple of {config.group_size}")


def quantize_llama(
    model: Llama,
    calibration: Tensor,
    config: AwqConfig,
    progress: bool = True,
    report: AwqReport | None = None,
) -> tuple[dict[str, QuantizedWeight], dict[str, Tensor]]:
    """AWQ-quantizes every decoder linear of `model`: `search_awq`, then `apply_awq` (see
    there); `report`, if given, receives the search's result."""
    _check_inputs(model, calibration, config)
    searching = config.search_scales or config.search_clip
    # RTN needs no calibration activations at all: an empty result quantizes plainly.
    result = search_awq(model, calibration, config, progress) if searching else AwqReport()
    if report is not None:
        report.scale_searches.extend(result.scale_searches)
        report.clips.update(result.clips)
    return apply_awq(model, result, config)


def search_awq(
    model: Llama, calibration: Tensor, config: AwqConfig, progress: bool = True
) -> AwqReport:
    """The AWQ search over every decoder block, `model` left as it is: the scales and clips
    `apply_awq` applies. Runs in fp32 on a copy of one block at a time, whatever the model's
    dtype; each block's inputs are the previous block's fp output (before scaling/clipping),
    so quantization error never propagates into the calibration data."""
    _check_inputs(model, calibration, config)
    result = AwqReport()
    layers = model.model.layers
    with torch.no_grad():
        hidden = model.embed(calibration.to(model.device)).to(torch.float32)
        # RoPE tables for positions [0, seqlen) in fp32, shared by every block's forwards.
        forwards = _Forwards(model.make_step(0, calibration.shape[1], hidden))
        for index in tqdm(range(len(layers)), desc="AWQ", unit="block", disable=not progress):
            work = copy.deepcopy(layers[index]).to(torch.float32)
            assert isinstance(work, DecoderLayer)
            features, hidden = _run_block(work, hidden, forwards.block)
            _search_block(work, features, forwards, config, f"model.layers.{index}.", result)
            del features, work
    return result


def apply_awq(
    model: Llama, result: AwqReport, config: AwqConfig
) -> tuple[dict[str, QuantizedWeight], dict[str, Tensor]]:
    """Folds `result`'s scales into `model`'s fp weights (norms, v/up rows, linear columns)
    and applies its clips, as llm-awq does, then rounds every decoder linear to `config`'s
    grid. Mutates `model`. Works block by block in fp32, exactly as the search did, so the
    weights equal those of quantizing while searching, bit for bit.

    Returns (quantized, plain): canonical weights keyed by HF module name
    (`model.layers.{i}.self_attn.q_proj`, ...) and every other tensor (embeddings, the
    *rescaled* norms, final norm, lm_head unless tied) by HF parameter name, enough to build
    the quantized model without the original checkpoint.
    """
    layers = model.model.layers
    by_layer = _result_by_layer(result, len(layers))
    quantized: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for index, layer in enumerate(layers):
            prefix = f"model.layers.{index}."
            work = copy.deepcopy(layer).to(torch.float32)
            searches, clips = by_layer[index]
            apply_awq_scales(work, [_local(search, prefix) for search in searches])
            for name, choice in clips.items():
                linear = _linear(work, name[len(prefix) :])
                groups = (linear.out_features, linear.in_features // config.group_size)
                if tuple(choice.top_steps.shape) != groups:
                    raise ValueError(
                        f"{name}: clip steps {tuple(choice.top_steps.shape)} do not fit its "
                        f"{groups} groups of {config.group_size}"
                    )
                _apply_clip(linear, choice)
            for name in DECODER_LINEARS:
                linear = _linear(work, name)
                bias = None if linear.bias is None else linear.bias.to(model.dtype)
                quantized[prefix + name] = quantize_to_canonical(
                    linear.weight, config.group_size, config.w_bit, bias
                )
            # Write the rescaled/clipped fp weights back (cast to the model's dtype).
            layer.load_state_dict(work.state_dict())
            del work
    return quantized, _plain_tensors(model)


def _result_by_layer(
    result: AwqReport, n_layers: int
) -> list[tuple[list[ScaleSearch], dict[str, ClipChoice]]]:
    """The result's scales (in order) and clips of each block; refuses names of no block."""
    by_layer: list[tuple[list[ScaleSearch], dict[str, ClipChoice]]] = [
        ([], {}) for _ in range(n_layers)
    ]
    for search in result.scale_searches:
        by_layer[_layer_index(search.prev_op, n_layers)][0].append(search)
    for name, choice in result.clips.items():
        by_layer[_layer_index(name, n_layers)][1][name] = choice
    return by_layer


def _layer_index(name: str, n_layers: int) -> int:
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise ValueError(f"{name!r} names no decoder block (model.layers.<i>....)")
    index = int(parts[2])
    if index >= n_layers:
        raise ValueError(f"{name!r}: the model has {n_layers} decoder blocks")
    return index


def _local(search: ScaleSearch, prefix: str) -> ScaleSearch:
    """`search` with its names relative to its block (the block copy is the module)."""
    return dataclasses.replace(
        search,
        prev_op=search.prev_op[len(prefix) :],
        linears=tuple(name[len(prefix) :] for name in search.linears),
    )


class _Forwards:
    """Runs a block or its attention on [B, T, H] calibration activations at position 0."""

    def __init__(self, step: LayerStep) -> None:
        self.step = step
        self.cache = _NoCache()

    def block(self, layer: nn.Module, x: Tensor) -> Tensor:
        return layer(x, self.step, self.cache)

    def attention(self, layer: DecoderLayer) -> Callable[[Tensor], Tensor]:
        attention = layer.self_attn
        return lambda x: attention(x, self.step, self.cache)


def _search_block(
    work: DecoderLayer,
    features: dict[str, Tensor],
    forwards: _Forwards,
    config: AwqConfig,
    prefix: str,
    result: AwqReport,
) -> None:
    """Scale search + application, then clip search + application, on the fp32 block copy.

    Applying each group's scale before searching the next one is equivalent to llm-awq's
    search-all-then-apply: no group's inspected module or cached input is touched by an
    earlier group's rescaling (and v/up row scaling commutes with per-row group quantization).
    """
    if config.search_scales:
        for group in _scale_groups(work, forwards.attention(work), config):
            linears = [_linear(work, name) for name in group.linears]
            x = features[group.feature]
            alpha, loss, losses, s = _search_scale(linears, x, group.inspect, config, group.sharing)
            _apply_scale(work.get_submodule(group.prev_op), linears, s, group.sharing)
            # The clip search must see the inputs of the rescaled linears.
            x.div_(_input_scales(s, group.sharing))
            names = tuple(prefix + name for name in group.linears)
            record = ScaleSearch(
                prefix + group.prev_op, names, alpha, loss, losses, s.cpu(), group.sharing
            )
            result.scale_searches.append(record)
    if config.search_clip:
        for name in _CLIPPED:
            linear = _linear(work, name)
            choice = _search_clip(linear.weight, features[_FEATURE_OF[name]], config)
            _apply_clip(linear, choice)
            result.clips[prefix + name] = choice


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is {type(module).__name__}, expected nn.Linear")
    return module


def _plain_tensors(model: Llama) -> dict[str, Tensor]:
    """Every state-dict tensor outside the decoder linears, copied (HF names)."""
    linear_prefixes = tuple(
        f"model.layers.{i}.{name}."
        for i in range(len(model.model.layers))
        for name in DECODER_LINEARS
    )
    plain = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if not key.startswith(linear_prefixes)
    }
    if model.args.tie_word_embeddings:
        # HF convention for tied heads: only the embedding is stored (loaders re-tie it).
        plain.pop("lm_head.weight", None)
    return plain
