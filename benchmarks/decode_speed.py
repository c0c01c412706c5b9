"""Single-stream CPU decode speed of our Llama: W16A16 (bf16) vs W4A16 (W4A16Linear, g128).

W16A16 is measured twice: with PyTorch's own bf16 GEMV (`F.linear`, layer by layer), and as the
worker runs it, with the AVX-512 decode kernels and all layers in one native call; the speedup
is against the latter. W4A16 is also timed with the same kernels dispatched op by op from
Python ("per-op"), which shows what the one-call decoder (cpu_kernels/decoder.c) saves.

Random weights (speed does not depend on their values), built directly in bf16; the W4A16
model is the same model with its decoder linears RTN-quantized in place, one at a time, so the
peak memory stays at the bf16 model's size. Also measures the machine's memory read bandwidth
and the bandwidth bound for W4A16 decode (bytes streamed per token / bandwidth), and the int4
kernel's own ceiling: the rate at which it consumes packed weights that sit in cache. Above
that rate of DRAM bandwidth, decode is bound by the kernel's instructions, not by memory.

    python benchmarks/decode_speed.py --sizes small,3b --tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.awq.qlinear import (
    W4A16Linear,
    fuse_w4a16,
    quantize_model_linears,
    weight_bytes,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.cpu_kernels import packing
from vilaserve.adapters.worker.torch_vila.cpu_path import NativeDecodeBody, put_on_cpu_path
from vilaserve.adapters.worker.torch_vila.int8_embedding import (
    Int8TiedHead,
    compress_token_embeddings,
)
from vilaserve.adapters.worker.torch_vila.llama import Llama
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 128
PROMPT_LEN = 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape(name: str) -> LlamaArgs:
    # (vocab, hidden, inter, layers, heads, kv_heads, tied)
    dims = {
        "small": (49152, 576, 1536, 30, 9, 3, True),  # SmolLM2-135M
        "3b": (32000, 2560, 6912, 32, 20, 20, False),  # VILA1.5-3B's LLM
    }[name]
    vocab, hidden, inter, layers, heads, kv_heads, tied = dims
    return LlamaArgs(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
    )


def random_model(args: LlamaArgs) -> Llama:
    # Llama.empty skips the fp32 random init (2.7B fp32 params would need 11 GB); fill in bf16.
    model = Llama.empty(args, torch.bfloat16, "cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model


def rtn_quantize(weight: torch.Tensor, group: int) -> QuantizedWeight:
    """Per-group asymmetric min/max round-to-nearest (AWQ's integer zero-point convention)."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low).clamp(min=1e-5) / 15
    zeros = (-torch.round(low / scales)).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return QuantizedWeight(
        q.view(n, k).to(torch.uint8), scales.to(torch.bfloat16), zeros.to(torch.uint8), group
    )


def quantize_in_place(model: Llama, backend: str) -> None:
    layers = model.model.layers
    for i, layer in enumerate(tqdm(layers, desc="quantize", leave=False)):
        for parent in (layer.self_attn, layer.mlp):
            for attr in LINEARS:
                if hasattr(parent, attr):
                    sub = "self_attn" if parent is layer.self_attn else "mlp"
                    name = f"model.layers.{i}.{sub}.{attr}"
                    weight = getattr(parent, attr).weight
                    # SmolLM2's hidden size 576 is not a multiple of 128: use g64 there.
                    group = GROUP if weight.shape[1] % GROUP == 0 else GROUP // 2
                    qw = rtn_quantize(weight, group)
                    # One linear at a time: its bf16 weight is freed as soon as it is replaced.
                    quantize_model_linears(model, {name: qw}, torch.bfloat16, "cpu", backend)


def decode_speed(model: Llama, tokens: int, desc: str) -> float:
    """Seconds per decode token after a 16-token prompt; the first 2 steps are warm-up."""
    warmup = 2
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, PROMPT_LEN), generator=gen)
    cache = model.new_cache(1, PROMPT_LEN + tokens + warmup)
    with torch.inference_mode():
        logits = model(cache, 0, input_ids=prompt)
        pos = PROMPT_LEN
        times = []
        for _ in tqdm(range(warmup + tokens), desc=desc, leave=False):
            ids = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            logits = model(cache, pos, input_ids=ids)
            times.append(time.perf_counter() - start)
            pos += 1
    return sum(times[warmup:]) / tokens


def w4_against_bandwidth(model: Llama, tokens: int, rounds: int) -> tuple[float, float, float]:
    """Median W4A16 s/token, median GB/s, and the median of per-round time / bound.

    The read bandwidth of this shared VM drifts by 2x within minutes (neighbours, page
    placement), so each round is short (a few tokens) and is compared with the mean of two
    bandwidth readings taken right before and right after it, never with one taken at
    another moment.
    """
    streamed = streamed_bytes(model)
    times, bandwidths, ratios = [], [], []
    for r in range(rounds):
        before = read_bandwidth(gib=0.5, repeats=3)
        seconds = decode_speed(model, max(1, tokens // rounds), f"W4A16 round {r + 1}/{rounds}")
        bandwidth = (before + read_bandwidth(gib=0.5, repeats=3)) / 2
        times.append(seconds)
        bandwidths.append(bandwidth)
        ratios.append(seconds / (streamed / (bandwidth * 1e9)))
    return statistics.median(times), statistics.median(bandwidths), statistics.median(ratios)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N GB/s of summing a large fp32 tensor (a pure streaming read)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def kernel_ceiling(threads: int) -> float | None:
    """GB/s of packed int4 weights (with scales and zeros) the AVX-512 kernel consumes for one
    x row when the weights sit in cache (1024 x 2560, g128: ~1.4 MB); None without the kernel."""
    kernel = cpu_kernels.load()
    if kernel is None:
        return None
    n, k = 1024, 2560
    gen = torch.Generator().manual_seed(0)
    w = QuantizedWeight(
        torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
        (torch.rand(n, k // GROUP, generator=gen) * 0.01 + 1e-3).half(),
        torch.randint(0, 16, (n, k // GROUP), generator=gen, dtype=torch.uint8),
        GROUP,
    )
    packed = packing.pack_for_kernel(w)
    nbytes = sum(t.numel() * t.element_size() for t in (packed.weight, packed.scales, packed.zeros))
    x, out = torch.randn(1, k).bfloat16(), torch.empty(1, n)
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(100):
            kernel.matmul(x, packed, n, GROUP, out)
        best = min(best, (time.perf_counter() - started) / 100)
    return nbytes / best / 1e9


def streamed_bytes(model: Llama) -> int:
    """Bytes a W4A16 decode step must read: packed weights + scales/zeros + the head (16-bit,
    or the int8 table a tied head shares with the embedding on the fp32 CPU paths)."""
    total = sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, W4A16Linear)
        for b in m.buffers()
    )
    head = model.lm_head
    if isinstance(head, Int8TiedHead):
        table = head.embedding[0]
        return total + table.table.nbytes + table.scales.nbytes
    return total + head.weight.numel() * head.weight.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,3b")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps (small shape)")
    parser.add_argument("--tokens-3b", type=int, default=16, help="decode steps (3b shape)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--rounds", type=int, default=8, help="W4A16 rounds, each between two bandwidth readings"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"threads={args.threads}  read bandwidth {bandwidth:.1f} GB/s")
    ceiling = kernel_ceiling(args.threads)
    if ceiling is not None:
        print(f"int4 kernel ceiling (weights in cache): {ceiling:.1f} GB/s of packed weights")
    rows = []
    for size in args.sizes.split(","):
        tokens = args.tokens_3b if size == "3b" else args.tokens
        model = random_model(shape(size))
        bf16_bytes = weight_bytes(model)
        # a decode step reads every weight but the embedding table (unless tied to the head)
        embed = model.model.embed_tokens.weight
        w16_streamed = bf16_bytes - (0 if model.args.tie_word_embeddings else embed.nbytes)
        w16_torch = decode_speed(model, tokens, f"{size} W16A16 torch")  # PyTorch's ops only
        put_on_cpu_path(model)  # what the worker does on CPU
        body = model.model
        assert isinstance(body, NativeDecodeBody), "needs a CPU path with native kernels"
        w16 = decode_speed(model, tokens, f"{size} W16A16")
        quantize_in_place(model, args.backend)
        # as the worker does: merged q/k/v and gate/up (AVX-512 backend), int8 token table
        model.fuse_projections(fuse_w4a16)
        compress_token_embeddings(model)
        body.replan()  # the layers now hold the 4-bit linears
        body.one_call = False  # the same kernels, dispatched op by op from Python
        w4_per_op = decode_speed(model, tokens, f"{size} W4A16 per-op")
        body.one_call = True
        w4, bandwidth_near, over_bound = w4_against_bandwidth(model, tokens, args.rounds)
        streamed = streamed_bytes(model)
        bound = streamed / (bandwidth_near * 1e9)
        rows.append(
            {
                "size": size,
                "tokens": tokens,
                "w16a16_torch_ms": w16_torch * 1e3,
                "w16a16_ms": w16 * 1e3,
                "w16a16_bound_ms": w16_streamed / (bandwidth_near * 1e9) * 1e3,
                "w4a16_ms": w4 * 1e3,
                "w4a16_per_op_ms": w4_per_op * 1e3,
                "w16a16_tok_s": 1 / w16,
                "w4a16_tok_s": 1 / w4,
                "speedup": w16 / w4,
                "weight_ratio": weight_bytes(model) / bf16_bytes,
                "w4a16_streamed_mb": streamed / 1e6,
                "read_bandwidth_gb_s": bandwidth_near,
                "bound_ms": bound * 1e3,
                "measured_over_bound": over_bound,
            }
        )
        del model
    header = (
        f"{'size':6} {'W16 torch ms':>12} {'W16 ms':>8} {'W16 tok/s':>9} {'W4 ms':>8} "
        f"{'W4 tok/s':>9} {'speedup':>7} {'W4 MB':>7} {'bound ms':>8} {'W4/bound':>8} "
        f"{'W4 per-op ms':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:6} {r['w16a16_torch_ms']:12.1f} {r['w16a16_ms']:8.1f} "
            f"{r['w16a16_tok_s']:9.2f} {r['w4a16_ms']:8.1f} {r['w4a16_tok_s']:9.2f} "
            f"{r['speedup']:7.2f} {r['w4a16_streamed_mb']:7.0f} "
            f"{r['bound_ms']:8.1f} {r['measured_over_bound']:8.2f} {r['w4a16_per_op_ms']:12.1f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {
        "threads": args.threads,
        "read_bandwidth_gb_s": bandwidth,
        "int4_kernel_ceiling_gb_s": ceiling,
        "rows": rows,
    }
    (RESULTS / "decode_speed.json").write_text(json.dumps(info, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.3 for x in xs], [1e3 / r["w16a16_torch_ms"] for r in rows], 0.3,
           label="W16A16 bf16, PyTorch GEMV")  # fmt: skip
    ax.bar(list(xs), [r["w16a16_tok_s"] for r in rows], 0.3, label="W16A16 bf16, our kernel")
    ax.bar([x + 0.3 for x in xs], [r["w4a16_tok_s"] for r in rows], 0.3, label="W4A16 g128")
    ax.scatter(
        [x + 0.3 for x in xs],
        [1e3 / r["bound_ms"] for r in rows],
        marker="_",
        s=400,
        color="k",
        label="W4A16 bandwidth bound",
    )
    ax.set_xticks(list(xs), [r["size"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"CPU decode, {args.threads} threads, {bandwidth:.0f} GB/s read")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "decode_speed.png", dpi=120)
    print(f"wrote {RESULTS / 'decode_speed.png'} and decode_speed.json")


if __name__ == "__main__":
    main()
