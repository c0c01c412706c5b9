"""Accuracy of the embedded demo model: 16-bit vs W4A16 AWQ vs W4A16 round-to-nearest.

Two sets of pictures, answered greedily by the product's own runtime (`VilaRuntime`, its
engine and the worker's `GenerateStream`; prompts built as the OpenAI API builds them):

* held-out: 500 pictures the demo's generator draws fresh for this benchmark (its evaluation
  split: image sizes, background styles and background colours that training never saw; seed
  7, which no training or validation run uses), one question each;
* independent: 500 pictures drawn by `independent_pictures.py` (matplotlib, other colour
  values, plain and paper backgrounds, filled, outlined and sketched shapes, typed and
  handwritten words, any rotation, several aspects, re-shared (noise, blur, JPEG) or
  photographed pictures; seed 2026, set version in the JSON), each with up to three questions
  of different kinds asked in one chat as the web chat asks them: turn 1 alone, turns 2 and 3
  with the model's own earlier replies as history (the picture in the first user message).
  With `--alone` the turn-2 and turn-3 questions are also asked without history, so that what
  the history costs is measured on the same questions.

An answer counts when it equals the expected one exactly (case, surrounding space and a final
period aside). The independent summary gives accuracy per turn and over all turns, per
question kind and per look (drawing: filled / outlined / sketched / typed; finish: clean /
degraded / photographed), printed as markdown tables; the plot shows per-kind and per-look
bars for turn 1 and the turns.

    python benchmarks/demo_accuracy.py            # builds the demo if needed
    python benchmarks/demo_accuracy.py --variants 16bit,awq --skip-heldout --alone
    python benchmarks/demo_accuracy.py --resume   # after an interrupted run: only the rest

Targets (issue 5): 16-bit >= 90 % held-out, AWQ within 2 points of 16-bit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from independent_pictures import (
    DEFAULT_SEED,
    INDEPENDENT_SET_VERSION,
    IndependentExample,
    independent_examples,
)

from vilaserve.adapters.offline.demo import shapes
from vilaserve.adapters.offline.demo.build_cache import WEIGHTS_FILE
from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.application.chat.ask_image import AskAboutImages
from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator
from vilaserve.entrypoints.chat import checkpoint_precision
from vilaserve.entrypoints.offline.demo import build_demo

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "16bit": "16-bit",
    "awq": "W4A16 AWQ",
    "rtn": "W4A16 RTN",
    "awq-w8a8": "AWQ + W8A8 tower",
}
# The W8A8 tower's smoothing comes from training pictures (never an evaluation split).
SMOOTHING_PICTURES = 64
MAX_NEW_TOKENS = 16
MISSES_KEPT = 25
KIND_ORDER = ("colour", "shape", "count", "size", "position", "text")
DRAWINGS = ("filled", "outlined", "sketched", "typed")
FINISHES = ("clean", "degraded", "photographed")


async def evaluate(
    asker: AskAboutImages, examples: list[shapes.DemoExample], images: list[bytes]
) -> tuple[dict[str, list[bool]], list[dict[str, str]]]:
    """The held-out split: one question per picture."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    misses: list[dict[str, str]] = []
    for example, image in zip(examples, images, strict=True):
        reply = await asker.answer(example.question, [image], max_new_tokens=MAX_NEW_TOKENS)
        hit = shapes.normalize_answer(reply) == example.answer
        by_kind[example.question_kind].append(hit)
        if not hit and len(misses) < MISSES_KEPT:
            misses.append({"question": example.question, "expected": example.answer, "got": reply})
    return by_kind, misses


ANSWER_SETS = {
    "shape": set(shapes.SHAPES),
    "colour": set(shapes.COLOURS),
    "size": set(shapes.SIZES),
    "position": set(shapes.POSITIONS),
    "count": set(shapes.COUNTS),
    "text": set(shapes.WORDS),
}


@dataclass(frozen=True)
class Record:
    """One asked question of the independent set."""

    example: IndependentExample
    turn: int
    kind: str
    hit: bool
    well_formed: bool  # the reply is one of the kind's answers (right or wrong)
    alone_hit: bool | None  # turns 2-3: the same question asked without history


async def evaluate_independent(
    asker: AskAboutImages, examples: list[IndependentExample], alone: bool
) -> tuple[list[Record], list[dict[str, Any]]]:
    """Each picture's questions in one chat, as the web chat sends them; with `alone`, the
    follow-ups are asked once more without history."""
    records: list[Record] = []
    misses: list[dict[str, Any]] = []
    for example in examples:
        history: list[tuple[str, str]] = []
        for turn, (kind, question, expected) in enumerate(example.questions, start=1):
            reply = await asker.answer(
                question, [example.png], history=history, max_new_tokens=MAX_NEW_TOKENS
            )
            normal = shapes.normalize_answer(reply)
            alone_hit: bool | None = None
            if alone and turn > 1:
                single = await asker.answer(question, [example.png], max_new_tokens=MAX_NEW_TOKENS)
                alone_hit = shapes.normalize_answer(single) == expected
            hit = normal == expected
            records.append(Record(example, turn, kind, hit, normal in ANSWER_SETS[kind], alone_hit))
            if not hit and len(misses) < MISSES_KEPT:
                misses.append(
                    {
                        "picture": example.index,
                        "turn": turn,
                        "history": [list(pair) for pair in history],
                        "question": question,
                        "expected": expected,
                        "got": reply,
                        "drawing": example.look.drawing,
                        "finish": example.look.finish,
                    }
                )
            history.append((question, reply))
    return records, misses


def _rate(hits: Iterable[bool]) -> tuple[float, int]:
    values = list(hits)
    return (sum(values) / len(values) if values else 0.0), len(values)


def _grouped(records: list[Record], key: Callable[[Record], str]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record.hit)
    return {
        name: {"accuracy": _rate(hits)[0], "questions": len(hits)}
        for name, hits in sorted(groups.items())
    }


def _points(first: float, second: float) -> float:
    return round((first - second) * 100, 1)


def _breakdown(asked: list[Record]) -> dict[str, Any]:
    """Accuracy of some questions, over all of them, per question kind and per look."""
    accuracy, count = _rate(r.hit for r in asked)
    entry: dict[str, Any] = {
        "accuracy": accuracy,
        "questions": count,
        "well_formed": _rate(r.well_formed for r in asked)[0],
    }
    for name, key in (
        ("kind", lambda r: r.kind),
        ("drawing", lambda r: r.example.look.drawing),
        ("finish", lambda r: r.example.look.finish),
    ):
        groups = _grouped(asked, key)
        entry[f"by_{name}"] = {k: v["accuracy"] for k, v in groups.items()}
        entry[f"questions_by_{name}"] = {k: v["questions"] for k, v in groups.items()}
    return entry


def summarize_independent(records: list[Record]) -> dict[str, Any]:
    """Per turn and over all turns: accuracy per question kind, per drawing (filled /
    outlined / sketched / typed) and per finish (clean / degraded / photographed)."""
    summary: dict[str, Any] = {}
    for turn in (1, 2, 3):
        asked = [r for r in records if r.turn == turn]
        if not asked:
            continue
        entry = _breakdown(asked)
        accuracy = entry["accuracy"]
        if turn > 1:
            first = summary["turn1"]
            entry["minus_turn1_points"] = _points(accuracy, first["accuracy"])
            entry["by_kind_minus_turn1_points"] = {
                k: _points(v, first["by_kind"][k])
                for k, v in entry["by_kind"].items()
                if k in first["by_kind"]
            }
            paired = [r for r in asked if r.alone_hit is not None]
            if paired:
                alone_accuracy, _ = _rate(bool(r.alone_hit) for r in paired)
                alone_by_kind: dict[str, list[bool]] = defaultdict(list)
                for r in paired:
                    alone_by_kind[r.kind].append(bool(r.alone_hit))
                entry["same_questions_alone"] = {
                    "accuracy": alone_accuracy,
                    "by_kind": {k: _rate(v)[0] for k, v in sorted(alone_by_kind.items())},
                }
                entry["minus_alone_points"] = _points(accuracy, alone_accuracy)
        summary[f"turn{turn}"] = entry
    if records:
        summary["all_turns"] = _breakdown(records)
    first_turn = [r for r in records if r.turn == 1]
    summary["turn1_by_scene"] = _grouped(first_turn, lambda r: r.example.scene.kind)
    summary["turn1_by_background"] = _grouped(first_turn, lambda r: r.example.look.background_style)
    summary["turn1_by_drawing"] = _grouped(first_turn, lambda r: r.example.look.drawing)
    summary["turn1_by_degradation"] = _grouped(first_turn, _degradation)
    summary["turn1_by_paper"] = _grouped(first_turn, lambda r: r.example.look.paper)
    summary["turn1_by_aspect"] = _grouped(
        first_turn,
        lambda r: "aspect <= 1.25" if r.example.look.aspect <= 1.25 else "aspect > 1.25",
    )
    return summary


def _degradation(record: Record) -> str:
    look = record.example.look
    if look.finish == "photographed":
        return "photographed"
    if look.jpeg_quality is not None:
        return "jpeg"
    if look.noise_sigma or look.blur_radius:
        return "noise / blur"
    return "clean"


def load_asker(path: Path, variant: str) -> tuple[VilaRuntime, AskAboutImages]:
    """As `vilaserve chat` asks: the runtime's model runner behind an engine."""
    w8a8 = variant.endswith("-w8a8")
    if w8a8:
        smooth_demo_tower(path)
    options = VilaRuntimeOptions(
        model_path=str(path),
        precision=checkpoint_precision(path),
        vision_quantization="w8a8" if w8a8 else "none",
    )
    runtime = VilaRuntime.load(options)
    engine = Engine(runtime.model_runner, SchedulerConfig(max_num_seqs=1))
    asker = AskAboutImages(
        EngineTextGenerator(engine), runtime.vision_encoder, renderer=JinjaChatTemplateRenderer()
    )
    return runtime, asker


def paths_key(paths: dict[str, Path]) -> str:
    """The build key the variants' folders sit under (`<key>/<variant>/vila-demo`)."""
    return next(iter(paths.values())).parent.parent.name if paths else ""


def smooth_demo_tower(path: Path) -> None:
    """SmoothQuant factors for the demo's tower from its training split, written once beside
    the tower (only `--quantize-vision-tower w8a8` reads them)."""
    from vilaserve.adapters.offline.vision_smoothing import calibrate_vision_smoothing
    from vilaserve.adapters.worker.torch_vila.layout import detect_layout
    from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
    from vilaserve.adapters.worker.torch_vila.vision_w8a8 import SMOOTHING_FILE

    tower_dir = path / "vision_tower"
    if (tower_dir / SMOOTHING_FILE).is_file():
        return
    layout = detect_layout(str(path), vision_tower=None)
    assert layout.vision is not None
    hidden = int(layout.checkpoint.llm_config["hidden_size"])
    pipeline = VisionPipeline.from_layout(layout.vision, hidden, torch.float32, "cpu")
    pictures = [e.png() for e in shapes.examples("train", 11, SMOOTHING_PICTURES)]
    calibrate_vision_smoothing(pipeline, pictures, tower_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="held-out pictures")
    parser.add_argument("--seed", type=int, default=7, help="eval-split seed")
    parser.add_argument("--independent-n", type=int, default=500, help="independent pictures")
    parser.add_argument("--independent-seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--skip-heldout", action="store_true")
    parser.add_argument("--skip-independent", action="store_true")
    parser.add_argument(
        "--alone",
        action="store_true",
        help="also ask the turn-2 and turn-3 questions without history (about 1.6x the work)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep what --out already holds for the same settings; measure only the rest",
    )
    parser.add_argument("--variants", default="16bit,awq,rtn")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="trained weights to evaluate instead of the committed ones (a candidate, e.g. "
        "from `train-demo-vision --export-state`); built under their own key",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_accuracy.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    heldout = [] if args.skip_heldout else list(shapes.examples("eval", args.seed, args.n))
    images = [e.png() for e in heldout]
    started = time.perf_counter()
    independent = (
        []
        if args.skip_independent
        else independent_examples(args.independent_seed, args.independent_n)
    )
    if independent:
        print(
            f"{len(independent)} independent pictures drawn in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    # Every build first: weights that change during the run cannot mix into it.
    paths = {
        variant: build_demo(
            variant.removesuffix("-w8a8"),  # type: ignore[arg-type]
            weights=args.weights or WEIGHTS_FILE,
        )
        for variant in args.variants.split(",")
    }
    settings = {
        "pictures": len(heldout),
        "split": "eval",
        "seed": args.seed,
        "independent": {
            "pictures": len(independent),
            "seed": args.independent_seed,
            "drawn_by": "benchmarks/independent_pictures.py",
            "version": INDEPENDENT_SET_VERSION,
            "questions_by_turn": {
                str(t): sum(len(e.questions) >= t for e in independent) for t in (1, 2, 3)
            },
            "follow_ups_also_asked_alone": args.alone,
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        # Which weights answered: the build key hashes the file.
        "weights": {"file": str(args.weights or WEIGHTS_FILE), "build": paths_key(paths)},
    }
    results: dict[str, dict[str, Any]] = {}
    if args.resume and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if all(previous.get(key) == value for key, value in settings.items()):
            results = {v: r for v, r in previous["results"].items() if v in paths}
            print(f"resuming: {', '.join(results) or 'nothing'} from {args.out}", flush=True)
    for variant, path in paths.items():
        result: dict[str, Any] = results.get(variant) or {
            "label": LABELS[variant],
            "model_path": str(path),
        }
        results[variant] = result
        todo_heldout = bool(heldout) and "accuracy" not in result
        todo_independent = bool(independent) and "independent" not in result
        if not (todo_heldout or todo_independent):
            continue
        runtime, asker = load_asker(path, variant)
        if todo_heldout:
            started = time.perf_counter()
            by_kind, misses = asyncio.run(evaluate(asker, heldout, images))
            every = [hit for hits in by_kind.values() for hit in hits]
            result |= {
                "accuracy": sum(every) / len(every),
                "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
                "questions_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
                "seconds": round(time.perf_counter() - started, 1),
                "misses": misses,
            }
            print(f"{LABELS[variant]:<12} held-out {result['accuracy']:.1%}", flush=True)
            write_report(args.out, settings, results)  # a long run keeps what it has
        if todo_independent:
            started = time.perf_counter()
            records, misses = asyncio.run(
                evaluate_independent(asker, independent, alone=args.alone)
            )
            result["independent"] = summarize_independent(records) | {
                "seconds": round(time.perf_counter() - started, 1),
                "misses": misses,
            }
            turns = "  ".join(
                f"turn {t} {result['independent'][f'turn{t}']['accuracy']:.1%}"
                for t in (1, 2, 3)
                if f"turn{t}" in result["independent"]
            )
            print(f"{LABELS[variant]:<12} independent {turns}", flush=True)
            write_report(args.out, settings, results)
        runtime.executor.shutdown()
        del runtime, asker

    results = {v: results[v] for v in paths}  # in the order asked for, resumed or not
    report_text(results, args, heldout, independent)
    write_report(args.out, settings, results)
    print(f"results: {args.out}")
    plot(results, args.out.with_suffix(".png"))


def write_report(path: Path, settings: dict[str, Any], results: dict[str, Any]) -> None:
    report = settings | {
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def report_text(
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    heldout: list[shapes.DemoExample],
    independent: list[IndependentExample],
) -> None:
    if heldout:
        print(f"\n{len(heldout)} held-out pictures (eval split, seed {args.seed}), exact answers:")
        for result in results.values():
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in result["by_kind"].items())
            print(f"  {result['label']:<12} {result['accuracy']:.1%}   ({kinds})")
    if independent:
        print(
            f"\n{len(independent)} independent pictures (seed {args.independent_seed}), "
            "one chat each, exact answers:"
        )
        for result in results.values():
            summary = result["independent"]
            for turn in (1, 2, 3):
                entry = summary.get(f"turn{turn}")
                if entry is None:
                    continue
                kinds = ", ".join(
                    f"{k} {v:.0%} ({entry['questions_by_kind'][k]})"
                    for k, v in entry["by_kind"].items()
                )
                extra = ""
                if turn > 1:
                    extra = f"  {entry['minus_turn1_points']:+.1f} pt vs turn 1"
                    if "minus_alone_points" in entry:
                        extra += (
                            f", {entry['minus_alone_points']:+.1f} pt vs the same questions "
                            f"alone ({entry['same_questions_alone']['accuracy']:.1%})"
                        )
                print(
                    f"  {result['label']:<12} turn {turn}: {entry['accuracy']:.1%} of "
                    f"{entry['questions']}{extra}\n      {kinds}; one-word replies "
                    f"{entry['well_formed']:.0%}"
                )
        print()
        print(independent_tables(results))


def independent_tables(results: dict[str, dict[str, Any]]) -> str:
    """Two markdown tables, a row per build and turn (and all turns): exact answers per
    question kind, then per look; each cell `percent (questions)`."""
    looks = ("filled", "outlined", "sketched", "typed", "clean", "degraded", "photographed")
    kind_rows, look_rows = [], []
    for result in results.values():
        summary = result.get("independent")
        if not summary:
            continue
        for key, turn in (("turn1", "1"), ("turn2", "2"), ("turn3", "3"), ("all_turns", "all")):
            entry = summary.get(key)
            if entry is None:
                continue
            lead = [result["label"], turn, _cell(entry["accuracy"], entry["questions"])]
            kind_rows.append(
                lead
                + [
                    _cell(entry["by_kind"].get(k), entry["questions_by_kind"].get(k, 0))
                    for k in KIND_ORDER
                ]
            )
            by_look = entry.get("by_drawing", {}) | entry.get("by_finish", {})
            asked = entry.get("questions_by_drawing", {}) | entry.get("questions_by_finish", {})
            look_rows.append(lead + [_cell(by_look.get(k), asked.get(k, 0)) for k in looks])
    head = ["build", "turn", "all"]
    return (
        "Per question kind (exact answers, % (questions)):\n\n"
        + _markdown([*head, *KIND_ORDER], kind_rows)
        + "\n\nPer look (drawing: filled / outlined / sketched / typed word; finish: clean / "
        "degraded = noise, blur or JPEG / photographed):\n\n"
        + _markdown([*head, *looks], look_rows)
    )


def _cell(accuracy: float | None, questions: int) -> str:
    return "-" if accuracy is None or not questions else f"{accuracy:.1%} ({questions})"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[str] = []
    if any("by_kind" in r for r in results.values()):
        panels.append("heldout")
    if any("independent" in r for r in results.values()):
        panels += ["independent", "looks", "turns"]
    if not panels:
        return
    widths = {"heldout": 8, "independent": 8, "looks": 8, "turns": 5}
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(sum(widths[p] for p in panels), 4.2),
        gridspec_kw={"width_ratios": [widths[p] for p in panels]},
        squeeze=False,
    )
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "heldout":
            by_kind = {v: r for v, r in results.items() if "by_kind" in r}
            _kind_bars(
                ax,
                {v: (r["by_kind"], r["accuracy"]) for v, r in by_kind.items()},
                results,
                "Held-out pictures (demo generator's eval split)",
            )
        elif panel == "independent":
            first = {
                v: (r["independent"]["turn1"]["by_kind"], r["independent"]["turn1"]["accuracy"])
                for v, r in results.items()
                if "independent" in r
            }
            _kind_bars(ax, first, results, "Independent pictures, turn 1 (asked alone)", KIND_ORDER)
        elif panel == "looks":
            looks = {
                v: (
                    r["independent"]["turn1"].get("by_drawing", {})
                    | r["independent"]["turn1"].get("by_finish", {}),
                    r["independent"]["turn1"]["accuracy"],
                )
                for v, r in results.items()
                if "independent" in r
            }
            _kind_bars(
                ax,
                looks,
                results,
                "Independent pictures, turn 1, per drawing and finish",
                (*DRAWINGS, *FINISHES),
            )
        else:
            _turn_bars(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _kind_bars(
    ax: Any,
    values: dict[str, tuple[dict[str, float], float]],
    results: dict[str, dict[str, Any]],
    title: str,
    order: tuple[str, ...] = (),
) -> None:
    present = {k for by_kind, _ in values.values() for k in by_kind}
    kinds = [k for k in order if k in present] + sorted(present - set(order))
    width = 0.8 / max(len(values), 1)
    for i, (variant, (by_kind, overall)) in enumerate(values.items()):
        heights = [by_kind.get(k, 0.0) * 100 for k in kinds] + [overall * 100]
        positions = [j + i * width for j in range(len(kinds) + 1)]
        label = f"{results[variant]['label']} ({overall:.1%})"
        ax.bar(positions, heights, width, label=label)
    ax.set_xticks([j + width * (len(values) - 1) / 2 for j in range(len(kinds) + 1)])
    ax.set_xticklabels([*kinds, "all"], fontsize=8)
    ax.axhline(90, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact answers (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)


def _turn_bars(ax: Any, results: dict[str, dict[str, Any]]) -> None:
    """Per build: turns 1-3 in one chat; beside turns 2-3, the same questions asked alone."""
    shown = {v: r["independent"] for v, r in results.items() if "independent" in r}
    turns = [t for t in (1, 2, 3) if any(f"turn{t}" in s for s in shown.values())]
    width = 0.8 / max(len(shown), 1)
    colours = plt_colours()
    for i, (variant, summary) in enumerate(shown.items()):
        colour = colours[i % len(colours)]
        for j, turn in enumerate(turns):
            entry = summary.get(f"turn{turn}")
            if entry is None:
                continue
            x = j + i * width
            label = results[variant]["label"] if j == 0 else None
            ax.bar(x, entry["accuracy"] * 100, width * 0.9, color=colour, label=label)
            ax.text(
                x, entry["accuracy"] * 100 + 1, f"{entry['accuracy']:.0%}", ha="center", fontsize=7
            )
            alone = entry.get("same_questions_alone")
            if alone:
                ax.plot(
                    [x - width * 0.45, x + width * 0.45],
                    [alone["accuracy"] * 100] * 2,
                    color="black",
                    linewidth=1.2,
                    linestyle=":",
                    label="same questions alone" if i == 0 and j == 1 else None,
                )
    ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(turns))])
    ax.set_xticklabels([f"turn {t}" for t in turns])
    ax.set_ylim(0, 105)
    ax.set_title("Independent pictures, one chat: turns 1-3", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)


def plt_colours() -> list[str]:
    import matplotlib.pyplot as plt

    return list(plt.rcParams["axes.prop_cycle"].by_key()["color"])


if __name__ == "__main__":
    main()
