"""`vilaserve quantize`: AWQ (or plain RTN) 4-bit quantization of a VILA checkpoint's LLM.

The vision tower and projector are copied unchanged; `llm/` becomes a Hugging Face AWQ
directory (GEMM packing, `quantization_config`), optionally with TinyChat's v2 `.pt` beside it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vilaserve.adapters.offline.awq_checkpoint_writing import (
    save_hf_awq_directory,
    save_tinychat_checkpoint,
)
from vilaserve.adapters.offline.awq_quantizer import (
    RECIPES,
    AwqReport,
    apply_awq,
    calibration_blocks,
    search_awq,
)
from vilaserve.adapters.offline.awq_search_file import load_awq_search, save_awq_search
from vilaserve.adapters.worker.torch_vila.checkpoint import VilaCheckpoint
from vilaserve.adapters.worker.torch_vila.device import resolve_device
from vilaserve.adapters.worker.torch_vila.layout import detect_layout
from vilaserve.adapters.worker.torch_vila.runtime import load_llm
from vilaserve.adapters.worker.torch_vila.tokenization import load_tokenizer
from vilaserve.entrypoints.shared.logging_setup import configure_logging

log = logging.getLogger(__name__)

# Text we report perplexity on must never be what the scales were fitted to.
EVALUATION_CORPORA = ("wikitext-2-raw-test", "wiki.test")
# Fewer calibration blocks than this draws a warning (llm-awq's pile default gives ~60 of 512).
FEW_CALIBRATION_BLOCKS = 16
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model-path", required=True, help="VILA checkpoint (or plain Llama folder) to quantize")
    add("--output", required=True, help="directory to write the quantized checkpoint to")
    add("--w-bit", type=int, default=4, choices=[4], help="weight bits (4)")
    add("--group-size", type=int, default=128, choices=[32, 64, 128], help="quantization group")
    add("--calib", required=True, help="calibration text file (never the evaluation text)")
    add("--n-samples", type=int, default=128, help="calibration lines (short lines: take many)")
    add("--seqlen", type=int, default=512, help="tokens per calibration block")
    add("--no-search", action="store_true", help="plain round-to-nearest (no AWQ search)")
    add(
        "--recipe",
        default="vilaserve",
        choices=sorted(RECIPES),
        help="the search: llm-awq's exactly, or ours (adds GQA v->o scales, duo scaling and "
        "two-sided clipping; slower, closer to 16-bit)",
    )
    add("--export-tinychat", action="store_true", help="also write TinyChat's *-awq-v2.pt")
    add(
        "--load-search",
        metavar="FILE",
        help="apply this saved AWQ search result (--save-search) instead of searching",
    )
    add("--save-search", metavar="FILE", help="also save the AWQ search result (.safetensors)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to search")
    add("--seed", type=int, default=0, help="calibration shuffle seed")
    add(
        "--smooth-vision-tower",
        metavar="PICTURES",
        help="folder of calibration pictures: also write the vision tower's SmoothQuant factors "
        "(for the worker's --quantize-vision-tower w8a8)",
    )
    add("--smooth-alpha", type=float, default=0.5, help="SmoothQuant's migration strength")


def quantize_checkpoint(
    args: argparse.Namespace,
    warn_little_calibration: bool = True,
    given: AwqReport | None = None,
    record: AwqReport | None = None,
) -> Path:
    """Quantizes `args.model_path` into `args.output`. The AWQ search runs unless a result is
    `given` (or `args.load_search` names one): then that result is applied. `record`, if any,
    receives the result applied (`args.save_search` also writes it to a file)."""
    calib = Path(args.calib)
    if any(name in calib.name for name in EVALUATION_CORPORA):
        raise SystemExit(f"{calib} is evaluation text; calibrate on something else")
    # Any layout the worker serves: LLaVA's LLM shares its shards with the projector.
    layout = detect_layout(args.model_path, vision_tower=None, need_vision=False)
    checkpoint = layout.checkpoint
    output = Path(args.output)
    started = time.perf_counter()
    device = resolve_device(args.device)
    # The search runs in fp32: its losses compare tiny differences.
    model = load_llm(checkpoint, torch.float32, device, layout.llm_key_map)
    config = RECIPES[args.recipe](
        group_size=args.group_size,
        w_bit=args.w_bit,
        search_scales=not args.no_search,
        search_clip=not args.no_search,
    )
    # Callers that build their own Namespace (the demo build) may leave these options out.
    load_search = getattr(args, "load_search", None)
    if given is None and load_search:
        given, _ = load_awq_search(Path(load_search))
    if given is not None:
        result = given
    elif args.no_search:
        result = AwqReport()  # round-to-nearest: nothing to search
    else:
        blocks = _calibration(args, layout.tokenizer_dir, warn_little_calibration)
        result = search_awq(model, blocks.to(device), config)
    quantized, plain = apply_awq(model, result, config)
    if record is not None:
        record.scale_searches.extend(result.scale_searches)
        record.clips.update(result.clips)
    save_search = getattr(args, "save_search", None)
    if save_search:
        save_awq_search(Path(save_search), result)
    llm_out = write_layout(checkpoint, output)
    save_hf_awq_directory(llm_out, quantized, plain, dict(checkpoint.llm_config), args.group_size)
    if args.export_tinychat:
        name = f"{checkpoint.root.name.lower()}-w4-g{args.group_size}-awq-v2.pt"
        save_tinychat_checkpoint(llm_out / name, quantized, plain, args.group_size)
    pictures = getattr(args, "smooth_vision_tower", None)
    if pictures:
        smooth_vision_tower(args.model_path, pictures, getattr(args, "smooth_alpha", 0.5), output)
    log.info(
        "quantized",
        extra={
            "output": str(output),
            "method": "rtn"
            if args.no_search
            else f"awq ({args.recipe}{', search applied' if given is not None else ''})",
            "group_size": args.group_size,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return output


def _calibration(args: argparse.Namespace, tokenizer_dir: Path, warn_little: bool) -> torch.Tensor:
    """The calibration blocks the search reads (only a search needs the tokenizer)."""
    blocks = calibration_blocks(
        load_tokenizer(tokenizer_dir),
        Path(args.calib).read_text(),
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    if warn_little and blocks.shape[0] < FEW_CALIBRATION_BLOCKS:
        # llm-awq's n_samples counts documents; a file of short lines (verse, chat turns) then
        # gives a few hundred tokens. (More text of the wrong domain is no cure: SmolLM2 on
        # WikiText-2 did worse with 73 blocks of Shakespeare than with 2.)
        log.warning(
            "little calibration text: scales fitted to a few blocks follow that text; give more "
            "(--n-samples: lines taken), from the domain the model will serve",
            extra={
                "calibration_blocks": int(blocks.shape[0]),
                "calibration_tokens": int(blocks.numel()),
                "n_samples": args.n_samples,
                "suggested_blocks": FEW_CALIBRATION_BLOCKS,
            },
        )
    return blocks


def smooth_vision_tower(model_path: str, pictures_dir: str, alpha: float, output: Path) -> Path:
    """SmoothQuant factors of the tower, from the pictures in `pictures_dir`, in fp32 on the
    CPU, written into the output's copy of the tower."""
    from vilaserve.adapters.offline.vision_smoothing import (
        calibrate_vision_smoothing,
        picture_files,
    )
    from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline

    layout = detect_layout(model_path, vision_tower=None)
    if layout.vision is None:
        raise SystemExit(f"{model_path}: no vision tower to smooth")
    llm_hidden = int(layout.checkpoint.llm_config["hidden_size"])
    pipeline = VisionPipeline.from_layout(layout.vision, llm_hidden, torch.float32, "cpu")
    pictures = [p.read_bytes() for p in picture_files(Path(pictures_dir))]
    target = output / layout.vision.tower.weights_dir.name
    path = calibrate_vision_smoothing(pipeline, pictures, target, alpha)
    log.info("vision tower smoothing written", extra={"path": str(path), "pictures": len(pictures)})
    return path


def write_layout(checkpoint: VilaCheckpoint, output: Path) -> Path:
    """Copies everything but the LLM weights; returns the folder the LLM goes into."""
    output.mkdir(parents=True, exist_ok=True)
    if checkpoint.llm_dir == checkpoint.root:  # a plain LLM folder: it *is* the LLM
        llm_out = output
    else:
        llm_out = output / "llm"
        llm_out.mkdir(exist_ok=True)
        shutil.copy2(checkpoint.root / "config.json", output / "config.json")
        for part in (checkpoint.vision_dir, checkpoint.projector_dir):
            if part is not None:
                shutil.copytree(part, output / part.name, dirs_exist_ok=True)
    for name in TOKENIZER_FILES:
        source = checkpoint.llm_dir / name
        if source.is_file():
            shutil.copy2(source, llm_out / name)
    return llm_out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_quantize_arguments(parser)
    configure_logging("text")
    print(quantize_checkpoint(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
