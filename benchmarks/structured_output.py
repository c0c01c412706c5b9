"""What structured output costs (issue 27): decode speed under a JSON schema against free
decoding, the token masks' time, and a 50-property schema's compile time, cold and cached.

* Speed: the worker's use case and engine in this process (as the worker wires them, over a
  W4A16 checkpoint on this machine's CPU path), 1, 4 and 8 streams at once, each generating
  `--tokens` tokens, free and under a JSON schema whose free `story` string keeps every stream
  going to its last token. The two runs of a level alternate `--pairs` times and a level's ratio
  is the median of its pairs' ratios (these shared 2-core machines drift by tens of percent
  within minutes, so only paired figures compare).
* Masks: llguidance's fill plus our apply per token, for 1 and 8 rows, along a real answer to
  the 50-property schema, on the model's own tokenizer.
* Compile: five different 50-property schemas cold (median), then the same one again (cached).

    python benchmarks/structured_output.py                 # the demo model (SmolLM2-135M)
    python benchmarks/structured_output.py --size 3b       # the 2.7B VILA1.5-3B LLM shape
    python benchmarks/structured_output.py --xgrammar      # compile and masks beside xgrammar

Writes benchmarks/results/structured_output[-3b].{json,png}. `--xgrammar` measures only the
compile and mask costs, llguidance's and xgrammar's on the same tokenizer and answer (xgrammar is
not a dependency: `pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi`, which import without
CUDA), into structured_output-xgrammar.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_speed import write_report
from serve_load import cpu_description, shaped_checkpoints

from vilaserve.adapters.worker.torch_vila.constraints import LlguidanceConstraintCompiler
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.adapters.worker.torch_vila.token_masks import TokenMasks
from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator
from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.domain.shared.generation import OutputConstraint

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (1, 4, 8)
# One short field, then a free string longer than any run: no stream ends before its last token.
STORY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "story": {"type": "string", "minLength": 4000},
    },
    "required": ["title", "story"],
}
FIELD_KINDS = ("string", "integer", "boolean", "enum", "array")


def schema_with_50_properties(tag: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for i in range(50):
        kind = FIELD_KINDS[i % len(FIELD_KINDS)]
        properties[f"{tag}_field_{i}"] = {
            "string": {"type": "string", "maxLength": 12},
            "integer": {"type": "integer", "minimum": 0, "maximum": 1000},
            "boolean": {"type": "boolean"},
            "enum": {"enum": ["red", "green", "blue"]},
            "array": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        }[kind]
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def an_answer(schema: dict[str, Any]) -> str:
    """A valid instance of `schema_with_50_properties`, laid out as the worker's JSON is."""
    values: dict[str, Any] = {}
    for i, (name, spec) in enumerate(schema["properties"].items()):
        kind = spec.get("type", "enum")
        values[name] = {
            "string": f"value {i}",
            "integer": i * 7,
            "boolean": i % 2 == 0,
            "enum": "green",
            "array": [i, i + 1],
        }[kind]
    return json.dumps(values)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def compile_and_mask(compiler: LlguidanceConstraintCompiler, tokenizer: Any) -> dict[str, Any]:
    cold = []
    for k in range(5):
        constraint = OutputConstraint("json", json.dumps(schema_with_50_properties(f"cold{k}")))
        started = time.perf_counter()
        compiler.compile(constraint)
        cold.append(time.perf_counter() - started)
    schema = schema_with_50_properties("main")
    constraint = OutputConstraint("json", json.dumps(schema))
    compiled = compiler.compile(constraint)
    started = time.perf_counter()
    for _ in range(1000):
        compiler.compile(constraint)
    cached = (time.perf_counter() - started) / 1000
    answer = tokenizer(an_answer(schema), add_special_tokens=False)["input_ids"]
    masks: dict[str, Any] = {}
    for rows in (1, 8):
        table = TokenMasks(rows, compiled.vocab_size, torch.device("cpu"))
        guides = [compiled.guide() for _ in range(rows)]
        guided = list(enumerate(guides))
        logits = torch.randn(rows, compiled.vocab_size)
        spent = 0.0
        for token in answer:
            work = logits.clone()
            started = time.perf_counter()
            table.apply(work, guided)
            spent += time.perf_counter() - started
            for guide in guides:
                guide.consume(token)
        assert not any(g.failed for g in guides), "the sample answer left the schema"
        masks[f"{rows}_rows"] = {"ms_per_token": ms(spent / len(answer)), "tokens": len(answer)}
    return {
        "compile_cold_ms": ms(statistics.median(cold)),
        "compile_cold_each_ms": [ms(s) for s in cold],
        "compile_cached_ms": round(cached * 1000, 4),
        "mask_fill_and_apply": masks,
    }


def xgrammar_compile_and_mask(tokenizer: Any) -> dict[str, Any]:
    """The same figures as `compile_and_mask`, with xgrammar's compiler, matcher and apply, its
    JSON laid out as ours (no free whitespace)."""
    import xgrammar

    vocab = len(tokenizer)
    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id]
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    conversion_s = time.perf_counter() - started
    layout = {"any_whitespace": False, "separators": (", ", ": "), "strict_mode": True}
    cold = []
    for k in range(5):
        text = json.dumps(schema_with_50_properties(f"cold{k}"))
        started = time.perf_counter()
        compiler.compile_json_schema(text, **layout)
        cold.append(time.perf_counter() - started)
    schema = schema_with_50_properties("main")
    text = json.dumps(schema)
    compiled = compiler.compile_json_schema(text, **layout)
    started = time.perf_counter()
    for _ in range(1000):
        compiler.compile_json_schema(text, **layout)
    cached = (time.perf_counter() - started) / 1000
    answer = tokenizer(an_answer(schema), add_special_tokens=False)["input_ids"]
    masks: dict[str, Any] = {}
    for rows in (1, 8):
        bitmask = xgrammar.allocate_token_bitmask(rows, vocab)
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        logits = torch.randn(rows, vocab)
        xgrammar.apply_token_bitmask_inplace(logits.clone(), bitmask)  # its first call compiles
        spent = 0.0
        for token in answer:
            work = logits.clone()
            started = time.perf_counter()
            for row, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, row)
            xgrammar.apply_token_bitmask_inplace(work, bitmask)
            spent += time.perf_counter() - started
            for matcher in matchers:
                assert matcher.accept_token(token), "the sample answer left the schema"
        masks[f"{rows}_rows"] = {"ms_per_token": ms(spent / len(answer)), "tokens": len(answer)}
    return {
        "tokenizer_conversion_ms": ms(conversion_s),
        "compile_cold_ms": ms(statistics.median(cold)),
        "compile_cold_each_ms": [ms(s) for s in cold],
        "compile_cached_ms": round(cached * 1000, 4),
        "mask_fill_and_apply": masks,
    }


def compare_with_xgrammar() -> None:
    from vilaserve.adapters.worker.torch_vila.tokenization import load_tokenizer
    from vilaserve.entrypoints.offline.demo import build_demo

    tokenizer = load_tokenizer(build_demo("awq") / "llm")
    started = time.perf_counter()
    compiler = LlguidanceConstraintCompiler(tokenizer, [tokenizer.eos_token_id])
    conversion_ms = ms(time.perf_counter() - started)
    report = {
        "tokenizer": "SmolLM2-135M (the demo model's)",
        "vocab": len(tokenizer),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "llguidance": {"tokenizer_conversion_ms": conversion_ms}
        | compile_and_mask(compiler, tokenizer),
        "xgrammar": xgrammar_compile_and_mask(tokenizer),
    }
    out = RESULTS / "structured_output-xgrammar.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")


def decode_rate(
    runtime: VilaRuntime, compiler: Any, streams: int, tokens: int, constrained: bool
) -> tuple[float, list[str]]:
    """Tokens per second of `streams` requests run at once, from the first request in to the
    last token out (prefill included, as a user sees it)."""
    generator = EngineTextGenerator(
        Engine(runtime.model_runner, SchedulerConfig(max_num_seqs=max(LEVELS)))
    )
    use_case = GenerateStream(
        generator, runtime.vision_encoder, GenerationLimits(), constraints=compiler
    )
    extra = {"structured_outputs": {"json": STORY_SCHEMA}} if constrained else {}
    bodies = [
        {
            "prompt": f"USER: Tell story number {i} about a dragon. ASSISTANT:",
            "echo": False,
            "temperature": 0.8,
            "seed": i,
            "max_new_tokens": tokens,
            "ignore_eos": True,
            **extra,
        }
        for i in range(streams)
    ]

    async def one(body: dict[str, Any]) -> Any:
        return [chunk async for chunk in use_case.stream(use_case.prepare(body))][-1]

    async def run() -> tuple[float, list[Any]]:
        try:
            started = time.perf_counter()
            last = await asyncio.gather(*(one(b) for b in bodies))
            return time.perf_counter() - started, list(last)
        finally:
            await generator.close()

    seconds, last = asyncio.run(run())
    produced = sum(chunk.usage.completion_tokens for chunk in last)
    return produced / seconds, sorted({str(chunk.finish_reason) for chunk in last})


def speed(runtime: VilaRuntime, compiler: Any, tokens: int, pairs: int) -> dict[str, Any]:
    decode_rate(runtime, compiler, 1, 8, False)  # warm-up: kernels built, pages touched
    decode_rate(runtime, compiler, 1, 8, True)
    levels: dict[str, Any] = {}
    for streams in LEVELS:
        runs = []
        for _ in range(pairs):
            free, free_end = decode_rate(runtime, compiler, streams, tokens, False)
            guided, guided_end = decode_rate(runtime, compiler, streams, tokens, True)
            runs.append({"free_tok_s": round(free, 2), "json_tok_s": round(guided, 2)})
            print(f"  {streams} streams: free {free:.1f} tok/s, JSON {guided:.1f} tok/s "
                  f"(finish {free_end} / {guided_end})", flush=True)  # fmt: skip
        ratios = sorted(r["json_tok_s"] / r["free_tok_s"] for r in runs)
        levels[str(streams)] = {
            "free_tok_s": statistics.median(r["free_tok_s"] for r in runs),
            "json_tok_s": statistics.median(r["json_tok_s"] for r in runs),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
            "pairs": runs,
        }
    return levels


def plot(report: dict[str, Any], path: Path) -> None:
    levels = report["speed"]
    streams = [int(s) for s in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(streams, [levels[str(s)]["free_tok_s"] for s in streams], "o-", label="free")
    left.plot(streams, [levels[str(s)]["json_tok_s"] for s in streams], "s-", label="JSON schema")
    left.set(xlabel="streams at once", ylabel="tok/s (all streams)", xticks=streams,
             title=f"{report['model']}: decode speed")  # fmt: skip
    left.legend()
    ratios = [levels[str(s)]["ratio_median"] for s in streams]
    right.bar([str(s) for s in streams], ratios, color="tab:green")
    right.axhline(0.9, color="tab:red", linestyle="--", label="target 0.9x")
    right.set(ylim=(0, 1.1), xlabel="streams at once", ylabel="JSON / free (median of pairs)",
              title="constrained over free")  # fmt: skip
    right.legend(loc="lower right")
    cpu = report["cpu"].get("Model name", "")
    fig.suptitle(f"{cpu}, {report['cpu'].get('simd', '')}; path {report['cpu_path']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["demo", "3b"], default="demo")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per stream")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--xgrammar", action="store_true", help="compile and masks beside xgrammar")
    args = parser.parse_args()
    if args.xgrammar:
        compare_with_xgrammar()
        return
    if args.size == "3b":
        model_path, _ = shaped_checkpoints()
        tokens = args.tokens or 16
    else:
        from vilaserve.entrypoints.offline.demo import build_demo

        model_path, tokens = str(build_demo("awq")), args.tokens or 64
    runtime = VilaRuntime.load(
        VilaRuntimeOptions(model_path=model_path, precision="W4A16", kv_slots=max(LEVELS))
    )
    runner = runtime.model_runner
    started = time.perf_counter()
    compiler = LlguidanceConstraintCompiler(runner.tokenizer, sorted(runner.stop_token_ids))
    conversion_s = time.perf_counter() - started
    try:
        costs = compile_and_mask(compiler, runner.tokenizer)
        print(json.dumps(costs), flush=True)
        levels = speed(runtime, compiler, tokens, args.pairs)
    finally:
        runtime.executor.shutdown()
    report = {
        "model": "SmolLM2-135M demo (W4A16)" if args.size == "demo" else "VILA1.5-3B shape (W4A16)",
        "model_path": model_path,
        "tokens_per_stream": tokens,
        "vocab": len(runner.tokenizer),
        "cpu": cpu_description(),
        "cpu_path": runner.compute_path,
        "torch_threads": torch.get_num_threads(),
        "tokenizer_conversion_ms": ms(conversion_s),
        **costs,
        "speed": levels,
    }
    suffix = "" if args.size == "demo" else "-3b"
    write_report(report, RESULTS / f"structured_output{suffix}", plot)


if __name__ == "__main__":
    main()
