"""WikiText-2 perplexity of a causal LM through a plain `forward_logits(ids) -> logits` callable.

Convention (also printed by the CLI, because perplexities are only comparable under one):

* the whole test file is read as-is (raw text, LF line endings, lines joined exactly as in the
  file) and tokenized ONCE; special tokens are added only if the tokenizer itself adds them
  (no BOS for SmolLM2 / GPT-2-style tokenizers);
* the token stream is cut into non-overlapping windows of `window` tokens; the trailing
  partial window is dropped; with `max_windows` only the first N windows are scored;
* each window is run independently (fresh context), and the loss covers every position of
  the window except the first (which has no context in the window): `window - 1` predictions
  per window;
* perplexity = exp(mean NLL over all scored tokens), NLL in nats, summed in float64.

The forward callable keeps the metric independent of the model implementation, so the same
function scores fp16/bf16/fp32 models here and W4A16 models elsewhere.

CLI::

    python benchmarks/perplexity.py --model-dir <hf dir> [--windows N] [--window 512]
        [--dtype float32 bfloat16 float16] [--corpus PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

CORPUS_NAME = "wikitext-2-raw-test.txt"
CONVENTION = (
    "whole file tokenized once (no BOS unless the tokenizer adds it); non-overlapping "
    "windows of {window} tokens (trailing partial window dropped); loss on all positions "
    "but the first of each window; ppl = exp(mean NLL)"
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def tokenize_corpus(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one 1-D LongTensor of token ids (the tokenizer's own specials only)."""
    # verbose=False: the text is far longer than model_max_length on purpose (it is windowed).
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def wikitext2_perplexity(
    forward_logits: Callable[[Tensor], Tensor],
    tokenizer: Any,
    text: str,
    window: int = 512,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> float:
    """Perplexity of `text` under the module docstring's convention.

    `forward_logits` maps input ids [1, T] to logits [1, T, vocab] (any float dtype; the loss is
    taken in fp32). Raises ValueError when the text yields no full window.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = tokenize_corpus(tokenizer, text)
    n_windows = ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    total_nll = 0.0
    total_tokens = 0
    for w in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not show_progress):
        chunk = ids[w * window : (w + 1) * window].unsqueeze(0)
        with torch.inference_mode():
            logits = forward_logits(chunk)
        # Position t predicts token t + 1: scoring targets 1..window-1 skips the first token.
        nll = F.cross_entropy(
            logits[0, :-1].float(), chunk[0, 1:].to(logits.device), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += window - 1
    return math.exp(total_nll / total_tokens)


def default_corpus() -> Path:
    """`$VILASERVE_SHARED/corpora/...`, else the `shared/` folder beside the repository."""
    shared = os.environ.get("VILASERVE_SHARED")
    root = Path(shared) if shared else Path(__file__).resolve().parents[1].parent / "shared"
    return root / "corpora" / CORPUS_NAME


def llama_forward(model_dir: Path, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Our own `Llama` loaded from a plain HF Llama folder, as a forward_logits callable."""
    from vilaserve.adapters.worker.torch_vila.checkpoint import load_state_dict
    from vilaserve.adapters.worker.torch_vila.llama import Llama
    from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs

    config = json.loads((model_dir / "config.json").read_text())
    model = Llama.empty(LlamaArgs.from_hf_config(config), dtype=dtype, device="cpu")
    model.load_hf_state_dict(load_state_dict(model_dir))
    model.eval()

    def forward(ids: Tensor) -> Tensor:
        # A fresh cache per window: windows are scored independently.
        cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
        return model(cache, 0, input_ids=ids, last_only=False)

    return forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="plain HF Llama folder")
    parser.add_argument("--windows", type=int, default=None, help="score only the first N")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=sorted(_DTYPES), help="one or more"
    )
    parser.add_argument("--corpus", type=Path, default=None, help=f"path to {CORPUS_NAME}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    corpus = args.corpus or default_corpus()
    if not corpus.is_file():
        print(
            f"error: corpus {corpus} not found; pass --corpus or set VILASERVE_SHARED to the "
            "shared folder holding corpora/" + CORPUS_NAME,
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text = corpus.read_text(encoding="utf-8")
    n_tokens = tokenize_corpus(tokenizer, text).numel()
    full = n_tokens // args.window
    used = full if args.windows is None else min(full, args.windows)
    print(f"convention: {CONVENTION.format(window=args.window)}")
    print(
        f"corpus: {corpus} ({n_tokens} tokens, {full} full windows of {args.window}; "
        f"scoring {used} windows = {used * (args.window - 1)} predicted tokens)"
    )
    for name in args.dtype:
        dtype = _DTYPES[name]
        forward = llama_forward(args.model_dir, dtype)
        start = time.perf_counter()
        ppl = wikitext2_perplexity(forward, tokenizer, text, args.window, args.windows)
        elapsed = time.perf_counter() - start
        print(
            f"{args.model_dir.name} {dtype}: ppl {ppl:.4f} "
            f"(window {args.window}, {used} windows, {elapsed:.1f} s, {torch.get_num_threads()} "
            "threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
