"""`vilaserve train-demo-vision` and `build-demo`: the embedded demo model's offline commands.

Torch and transformers are imported inside the commands, only when they are needed: a cached
`build-demo` answers in well under a second.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from vilaserve.adapters.offline.demo.build_cache import (
    MODEL_DIR_NAME,
    PROVENANCE_FILE,
    VARIANTS,
    WEIGHTS_FILE,
    Variant,
    is_built,
    variant_dir,
)
from vilaserve.entrypoints.shared.logging_setup import configure_logging

if TYPE_CHECKING:
    from vilaserve.adapters.offline.awq_quantizer import AwqReport
    from vilaserve.adapters.offline.demo.awq_search import SearchKey


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from vilaserve.adapters.offline.demo.training import TrainConfig
    from vilaserve.adapters.offline.gguf_import import default_cache_dir

    defaults = TrainConfig()
    add = parser.add_argument
    add("--seed", type=int, default=defaults.seed, help="seed of the init and of the pictures")
    add(
        "--instruction-steps",
        type=int,
        default=defaults.instruction_steps,
        help="stage 0: steps learning the free image tokens through the LLM",
    )
    add("--instruction-lr", type=float, default=defaults.instruction_lr)
    add(
        "--instruction-turns",
        type=_shares,
        default=defaults.instruction_turns,
        help="stages 0 and 2: shares of chats with 1, 2, 3... questions (e.g. 0.5,0.25,0.25)",
    )
    add(
        "--instruction-quantized-llm",
        default=BUILD_AWQ,
        help=f"stage 0 also fits through this W4A16 AWQ demo checkpoint; {BUILD_AWQ!r} (the "
        "default): quantize the LLM here exactly as `build-demo` will; 'none': 16-bit only",
    )
    add(
        "--instruction-init",
        default=defaults.instruction_init,
        help="stage 0 starts from an earlier stage 0's vectors (its work dir's instruction.pt)",
    )
    add(
        "--instruction-from-init",
        action="store_true",
        help="skip stage 0: the vectors are what --stage1-init-weights makes its free tokens",
    )
    add(
        "--stage1-init-weights",
        default=defaults.stage1_init_weights,
        help="stage 1 starts from these trained weights (.safetensors) instead of a fresh init",
    )
    add("--stage1-steps", type=int, default=defaults.stage1_steps, help="tower pre-training steps")
    add("--stage1-batch", type=int, default=defaults.stage1_batch, help="pictures per stage-1 step")
    add("--stage1-lr", type=float, default=defaults.stage1_lr)
    add(
        "--stage1-everyday-share",
        type=float,
        default=defaults.stage1_everyday_share,
        help="stages 1 and 2: the share of pictures in the everyday style (the rest: original)",
    )
    add("--stage2-steps", type=int, default=defaults.stage2_steps, help="steps through the LLM")
    add("--stage2-batch", type=int, default=defaults.stage2_batch, help="pictures per stage-2 step")
    add("--stage2-lr", type=float, default=defaults.stage2_lr)
    add("--tower-lr-scale", type=float, default=defaults.tower_lr_scale, help="stage 2")
    add("--caption-weight", type=float, default=defaults.caption_weight, help="stage 2")
    add("--validate-every", type=int, default=defaults.validate_every)
    add("--validation-size", type=int, default=defaults.validation_size, help="stages 1 and 2")
    add(
        "--instruction-validation-size",
        type=int,
        default=defaults.instruction_validation_size,
        help="stage 0's held-out scenes per LLM",
    )
    add(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default=defaults.dtype,
        help="the frozen LLMs' dtype (auto: bf16 where the CPU computes it natively, else fp32)",
    )
    add("--threads", type=int, default=defaults.threads, help="torch threads (0: default)")
    add("--device", default=defaults.device, help="stage 1's device: cpu or cuda")
    add("--loader-workers", type=int, default=defaults.loader_workers, help="stage 1 drawers")
    add(
        "--output",
        type=Path,
        help="trained weights (.safetensors; default: the work dir's demo_vision.safetensors). "
        "The committed weights are replaced by hand, and only by weights that beat them on "
        "benchmarks/independent_pictures.py",
    )
    add(
        "--work-dir",
        type=Path,
        default=default_cache_dir().parent / "demo-train",
        help="checkpoints (a run's state; continued with --resume)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run whose state --work-dir holds (stopped at any point: it is "
        "saved every --checkpoint-minutes); without it such a work dir is refused",
    )
    add(
        "--export-state",
        type=Path,
        metavar="PATH",
        help="only write the tower and projector of the run --work-dir holds (stopped or "
        "still going) to PATH (.safetensors), to evaluate or start another run from",
    )
    add(
        "--checkpoint-minutes",
        type=float,
        default=defaults.checkpoint_minutes,
        help="save the run's state at least this often",
    )
    add("--no-progress", action="store_true", help="no progress bars")


def _shares(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 0.5,0.25,0.25") from exc
    if not shares or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r}: shares must be >= 0 and add up to 1")
    return shares


def run_train(args: argparse.Namespace, argv: list[str]) -> None:
    from vilaserve.adapters.offline.demo.training import (
        TrainConfig,
        TrainingStateExists,
        train_demo_vision,
    )
    from vilaserve.adapters.offline.gguf_import import ensure_smollm2_hf

    configure_logging("text")
    if args.export_state:
        from vilaserve.adapters.offline.demo.training import export_state

        where = export_state(args.work_dir, args.export_state)
        print(f"wrote {args.export_state} (stage {where['stage']}, step {where['step']})")
        return
    llm_dir = ensure_smollm2_hf()
    quantized = args.instruction_quantized_llm
    if quantized == BUILD_AWQ:
        quantized = str(_quantized_like_the_build(llm_dir, args.work_dir, args.threads))
    # Every option named like a TrainConfig field sets it (the rest keep their defaults).
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given["instruction_quantized_llm"] = "" if quantized == "none" else quantized
    config = TrainConfig(**given)
    command = shlex.join(["vilaserve", *argv])
    output = args.output or args.work_dir / "demo_vision.safetensors"
    try:
        report = train_demo_vision(
            config, llm_dir, output, args.work_dir, command, not args.no_progress, args.resume
        )
    except TrainingStateExists as exc:
        raise SystemExit(f"vilaserve train-demo-vision: {exc}") from None
    print(f"wrote {output} ({report.stage_seconds})", file=sys.stderr)


BUILD_AWQ = "build"


def _quantized_like_the_build(llm_hf_dir: Path, work_dir: Path, threads: int) -> Path:
    """The W4A16 AWQ demo LLM exactly as `build-demo --variant awq` makes it (same
    calibration and settings; the search reads only the LLM, so an untrained vision tower
    beside it changes nothing), made once in `work_dir`. Stage 0 must fit its vectors through
    this very build: fitted through another AWQ calibration they lose a third of the answers."""
    import torch

    from vilaserve.adapters.offline.demo.checkpoint import write_demo_checkpoint
    from vilaserve.adapters.offline.demo.vision_model import new_demo_vision
    from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint

    if threads:
        torch.set_num_threads(threads)
    target = work_dir / "awq-llm" / MODEL_DIR_NAME
    if is_built(target):
        return target
    sixteen_bit = work_dir / "16bit-llm" / MODEL_DIR_NAME
    if not is_built(sixteen_bit):
        hidden = int(VilaCheckpoint.open(llm_hf_dir).llm_config["hidden_size"])
        untrained = new_demo_vision(hidden, seed=0).trained_state()
        write_demo_checkpoint(sixteen_bit, llm_hf_dir, untrained, training_steps=0)
    _quantize(sixteen_bit, target, search=True)
    return target


# --- build-demo ------------------------------------------------------------------------------

QUANT_GROUP_SIZE = 64  # SmolLM2's hidden size 576 is not a multiple of 128
CALIBRATION_LINES = 256
# 16 blocks of 256 tokens: the demo's questions are short, and the AWQ search over 30 layers
# then takes minutes on two cores (64 blocks: four times as long). A build applies the shipped
# result of that search instead (adapters/offline/demo/awq_search.py): changing any of these
# settings, or the calibration text, needs `build-demo --search --save-search`.
CALIBRATION_SAMPLES = 16
CALIBRATION_SEQLEN = 256
CALIBRATION_SHUFFLE_SEED = 0  # the quantizer's shuffle of the calibration lines


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--variant",
        choices=VARIANTS,
        default="awq",
        help="16bit, awq (W4A16 AWQ, the default) or rtn (W4A16 round-to-nearest)",
    )
    add("--cache-dir", type=Path, default=None, help="default: ~/.cache/vilaserve/demo")
    add(
        "--search",
        action="store_true",
        help="awq: run the AWQ search (and rebuild) instead of applying the shipped result",
    )
    add(
        "--save-search",
        action="store_true",
        help="with --search: write the result over the shipped one (its file and JSON sidecar)",
    )


def run_build(args: argparse.Namespace) -> Path:
    """Prints the built directory's path on stdout (and nothing else there)."""
    if args.save_search and not (args.search and args.variant == "awq"):
        raise SystemExit("vilaserve build-demo: --save-search needs --search and --variant awq")
    path = build_demo(args.variant, args.cache_dir, args.search, args.save_search)
    print(path)
    return path


def build_demo(
    variant: Variant = "awq",
    cache_dir: Path | None = None,
    force_search: bool = False,
    save_search: bool = False,
    weights: Path = WEIGHTS_FILE,
) -> Path:
    """The demo checkpoint for `variant`, built on first use and cached (a later call only
    hashes the committed weights and checks the folder). The AWQ variant applies the shipped
    search result where it fits this build; `force_search` searches (and rebuilds) anyway,
    `save_search` then ships what it found. `weights`: other trained weights than the
    committed ones (a candidate to evaluate), built beside them under their own key."""
    target = variant_dir(variant, cache_dir, weights)
    force_search = force_search and variant == "awq"
    if is_built(target) and not force_search:
        return target
    configure_logging("text")
    sixteen_bit = variant_dir("16bit", cache_dir, weights)
    if not is_built(sixteen_bit):
        _say(f"building the demo model in {sixteen_bit.parent.parent} (first run only)")
        from vilaserve.adapters.offline.demo.checkpoint import write_demo_checkpoint
        from vilaserve.adapters.offline.demo.vision_model import (
            load_weights,
            weights_aspect_ratio,
        )

        steps = _training_steps(weights.with_suffix(".json"))
        from vilaserve.adapters.offline.gguf_import import ensure_smollm2_hf

        write_demo_checkpoint(
            sixteen_bit,
            ensure_smollm2_hf(),
            load_weights(weights),
            steps,
            weights_aspect_ratio(weights),
        )
    if variant != "16bit":
        _quantize(sixteen_bit, target, variant == "awq", force_search, save_search)
    return target


# The quantizer recipe of the demo build: the committed instruction vectors were fitted through
# this very build.
DEMO_RECIPE = "llm-awq"


def _quantize(
    source: Path,
    target: Path,
    search: bool,
    force_search: bool = False,
    save_search: bool = False,
) -> None:
    """W4A16 `target` from the 16-bit `source`: AWQ when `search` (the shipped search result
    applied where it fits, unless `force_search`), else round-to-nearest."""
    import tempfile
    import time

    from vilaserve.adapters.offline.awq_quantizer import AwqReport
    from vilaserve.adapters.offline.demo.calibration import calibration_lines
    from vilaserve.entrypoints.offline import quantize

    target.parent.mkdir(parents=True, exist_ok=True)
    calibration = target.parent.parent / "calibration.txt"
    calibration.write_text("\n".join(calibration_lines(CALIBRATION_LINES)) + "\n")
    given = _shipped_search(calibration) if search and not force_search else None
    method = "AWQ" if search else "round-to-nearest"
    if given is not None:
        method = "AWQ, the shipped search result applied"
    _say(f"quantizing the demo LLM to 4 bits ({method}, group {QUANT_GROUP_SIZE})")
    record = AwqReport()
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        quantize.quantize_checkpoint(
            argparse.Namespace(
                model_path=str(source),
                output=str(staging),
                w_bit=4,
                group_size=QUANT_GROUP_SIZE,
                calib=str(calibration),
                n_samples=CALIBRATION_SAMPLES,
                seqlen=CALIBRATION_SEQLEN,
                no_search=not search,
                # The committed instruction vectors were fitted through this very build.
                recipe=DEMO_RECIPE,
                export_tinychat=False,
                device="auto",
                seed=CALIBRATION_SHUFFLE_SEED,
            ),
            warn_little_calibration=False,  # small on purpose: see CALIBRATION_SAMPLES
            given=given,
            record=record,
        )
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if save_search:
        from vilaserve.adapters.offline.demo.awq_search import write_shipped_result

        write_shipped_result(
            record,
            _search_key(calibration),
            "vilaserve build-demo --variant awq --search --save-search",
            {
                "text": "vilaserve.adapters.offline.demo.calibration.calibration_lines",
                "lines": CALIBRATION_LINES,
                "blocks": f"{CALIBRATION_SAMPLES} lines taken, {CALIBRATION_SEQLEN}-token blocks",
            },
            time.perf_counter() - started,
        )
        _say("wrote the shipped AWQ search result (commit it with the weights)")


def _search_key(calibration: Path) -> SearchKey:
    import hashlib

    from vilaserve.adapters.offline.demo.awq_search import SearchKey
    from vilaserve.adapters.offline.gguf_import import SMOLLM2_WHEEL_SHA256

    return SearchKey(
        smollm2_wheel_sha256=SMOLLM2_WHEEL_SHA256,
        calibration_sha256=hashlib.sha256(calibration.read_bytes()).hexdigest(),
        recipe=DEMO_RECIPE,
        w_bit=4,
        group_size=QUANT_GROUP_SIZE,
        n_samples=CALIBRATION_SAMPLES,
        seqlen=CALIBRATION_SEQLEN,
        seed=CALIBRATION_SHUFFLE_SEED,
    )


def _shipped_search(calibration: Path) -> AwqReport | None:
    """The shipped search result if it was made for this build, else None (said in a line)."""
    from vilaserve.adapters.offline.demo.awq_search import shipped_result

    result, why_not = shipped_result(_search_key(calibration))
    if result is None:
        _say(f"searching the AWQ scales and clips (minutes): {why_not}")
    return result


def _training_steps(provenance_file: Path = PROVENANCE_FILE) -> int:
    try:
        provenance = json.loads(provenance_file.read_text(encoding="utf-8"))
        config = provenance["config"]
        return int(config["stage1_steps"]) + int(config["stage2_steps"])
    except (OSError, ValueError, KeyError):
        return 1


def _say(text: str) -> None:
    print(f"vilaserve: {text}", file=sys.stderr, flush=True)
