"""Streams a 16-bit LLM checkpoint into a `Llama`, tensor by tensor, without a second copy.

Reading every shard into one state dict and then copying it into the model holds the weights
twice at the peak (about 30 GB for NVILA-8B in bf16). Here each tensor is read from its shard
(safetensors maps the file), copied into the model's own parameter -- cast to its dtype, moved
to its device -- and dropped, so the peak is the model plus one tensor. Names, shapes and
completeness are checked from the shards' headers first, so a wrong checkpoint fails before any
data is read, naming the tensors.

Usage::

    model = Llama.empty(LlamaArgs.from_hf_config(config), dtype, device)
    load_llm_weights(model, llm_dir)
    # LLaVA-1.5's folder also holds the projector: skip it.
    load_llm_weights(model, root, lambda k: None if ".mm_projector." in k else k)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from vilaserve.adapters.worker.torch_vila.checkpoint import safetensors_files
from vilaserve.adapters.worker.torch_vila.llama import (
    DERIVED_KEY_SUFFIXES,
    HEAD_KEY,
    Llama,
    describe_keys,
)

# Checkpoint tensor name -> our (HF Llama / Qwen2) name, or None to skip the tensor.
KeyMap = Callable[[str], str | None]
# safetensors' names of the dtypes a 16-bit checkpoint may hold; anything else (int8/int32 AWQ
# packings, ...) is not a plain weight and must not be silently cast.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def keep_key(name: str) -> str | None:
    """The identity key map: the checkpoint already uses our names."""
    return name


def load_llm_weights(
    model: Llama, directory: Path, key_map: KeyMap = keep_key, show_progress: bool = True
) -> None:
    """Fills `model` (typically `Llama.empty`) from the safetensors shards of `directory`.

    `key_map` renames a checkpoint tensor to ours or returns None to skip it (the parts of a
    multimodal checkpoint that are not the LLM). With tied embeddings a saved `lm_head.weight`
    is ignored, as HF does. Raises ValueError naming missing, unexpected, repeated, non-float
    and mis-shaped tensors before any tensor data is read.
    """
    targets = _targets(model)
    plan = _plan(Path(directory), key_map, targets, model.args.model_type)
    with torch.no_grad():
        for file, names in tqdm(
            plan.items(),
            desc=f"loading {Path(directory).name}",
            unit="shard",
            disable=not show_progress or len(plan) < 2,
        ):
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                for key, ours in names:
                    targets[ours].copy_(shard.get_tensor(key))


def _targets(model: Llama) -> dict[str, Tensor]:
    """Our tensors a checkpoint must fill, by name (views of the parameters: copying into
    them fills the model). A tied head is the embedding, so it is filled through it."""
    targets = dict(model.state_dict())
    if model.args.tie_word_embeddings:
        targets.pop(HEAD_KEY, None)
    return targets


def _plan(
    directory: Path, key_map: KeyMap, targets: dict[str, Tensor], family: str
) -> dict[Path, list[tuple[str, str]]]:
    """(checkpoint name, our name) per shard, checked against `targets` from the headers."""
    plan: dict[Path, list[tuple[str, str]]] = {}
    found: dict[str, str] = {}  # our name -> the checkpoint name that provides it
    unexpected: list[str] = []
    problems: list[str] = []
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for key in shard.keys():  # noqa: SIM118  (safe_open has no __iter__)
                ours = key_map(key)
                if ours is None or ours.endswith(DERIVED_KEY_SUFFIXES):
                    continue
                shown = key if ours == key else f"{key} (as {ours})"
                if ours not in targets:
                    # Only a tied model's saved head is expected and ignored.
                    if ours != HEAD_KEY:
                        unexpected.append(shown)
                    continue
                if ours in found:
                    problems.append(f"{ours} comes from both {found[ours]} and {key}")
                    continue
                found[ours] = key
                header = shard.get_slice(key)
                shape, dtype = tuple(header.get_shape()), header.get_dtype()
                if shape != tuple(targets[ours].shape):
                    problems.append(
                        f"{shown} has shape {shape}, expected {tuple(targets[ours].shape)}"
                    )
                elif dtype not in _FLOAT_DTYPES:
                    problems.append(f"{shown} is {dtype}, expected a float tensor")
                else:
                    plan.setdefault(file, []).append((key, ours))
    missing = sorted(targets.keys() - found.keys())
    if missing or unexpected or problems:
        details = [
            f"missing {describe_keys(missing)}",
            f"unexpected {describe_keys(sorted(unexpected))}",
            *problems[:20],
        ]
        raise ValueError(
            f"{directory}: the weights do not match the {family} layout: " + "; ".join(details)
        )
    return plan
