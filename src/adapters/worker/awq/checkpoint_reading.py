"""Reading whole AWQ checkpoints into canonical weights: TinyChat's `torch.save`d `.pt` and
Hugging Face / AutoAWQ safetensors folders. Each layer's packing is read by `formats.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vilaserve.adapters.worker.awq.formats import (
    AwqFormatError,
    detect_layer_format,
    unpack_layer,
)
from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

# Sub-tensor names of one quantized Linear in any of the formats.
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "scaled_zeros", "bias")


def _split_modules(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Groups `<module>.qweight` & co. per module; every other tensor is returned as plain."""
    modules = {key.removesuffix(".qweight") for key in state if key.endswith(".qweight")}
    grouped: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in grouped and leaf in _QUANT_SUFFIXES:
            grouped[module][leaf] = tensor
        else:
            plain[key] = tensor
    return grouped, plain


def _unpack_all(
    source: Path,
    state: Mapping[str, torch.Tensor],
    group_size: int,
    config: Mapping[str, Any] | None,
    expected_shapes: Mapping[str, tuple[int, int]] | None,
    infer_group: bool,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    grouped, plain = _split_modules(state)
    quantized: dict[str, QuantizedWeight] = {}
    for module in sorted(grouped):
        parts = grouped[module]
        expected = None if expected_shapes is None else expected_shapes.get(module)
        try:
            fmt = detect_layer_format(parts, config)
            quantized[module] = unpack_layer(fmt, parts, group_size, expected, infer_group)
        except AwqFormatError as err:
            raise err.located(module, source) from None
        except ValueError as err:  # e.g. QuantizedWeight's own checks, unsupported padding
            raise AwqFormatError(f"{module}.qweight", str(err), source) from None
    return quantized, plain


def load_tinychat_checkpoint(
    path: Path,
    group_size: int = 128,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A TinyChat / llm-awq `torch.save(state_dict)` (v2; v1 and v0 detected per layer).

    Returns canonical weights keyed by module name and every other tensor (embeddings, the
    AWQ-rescaled norms, lm_head) as stored, keyed by its HF name. `group_size` is a hint: the
    files carry none, so when the padded scales do not fit it, g32/g64/g128 are tried.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # unpickling/zip errors come in many types
        raise ValueError(
            f"{path}: not a readable torch checkpoint (expected a torch.save'd state dict of "
            f"tensors): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path}: expected a state dict (mapping of name -> tensor), got {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is {type(value).__name__}, expected a tensor")
    if not any(key.endswith(".qweight") for key in state):
        raise ValueError(f"{path}: no '*.qweight' tensors, expected an AWQ quantized state dict")
    return _unpack_all(path, state, group_size, None, expected_shapes, infer_group=True)


def _awq_settings(config_path: Path) -> tuple[dict[str, Any], int, str]:
    """(config, group size, version) from an HF/AutoAWQ config.json; refuses what we can't run."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: unreadable config.json: {err}") from None
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        raise ValueError(f"{config_path}: no quantization_config, expected quant_method 'awq'")
    method = str(quant.get("quant_method", "")).lower()
    if method != "awq":
        raise ValueError(f"{config_path}: quant_method is {method!r}, expected 'awq'")
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{config_path}: bits/w_bit is {bits!r}, only 4-bit AWQ is supported")
    group = quant.get("group_size", quant.get("q_group_size"))
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise ValueError(f"{config_path}: group_size is {group!r}, expected a positive int")
    if quant.get("zero_point", True) is not True:
        raise ValueError(f"{config_path}: zero_point is {quant.get('zero_point')!r}, expected true")
    version = str(quant.get("version", "gemm") or "gemm").lower()
    if version not in ("gemm", "gemv"):
        raise ValueError(
            f"{config_path}: version is {version!r}, only 'gemm' and 'gemv' are supported"
        )
    return config, group, version


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: unreadable shard index: {err}") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            # VILA's AWQ repos ship the fp16 index next to a `.pt`: say so instead of ENOENT.
            raise ValueError(
                f"{index}: lists shard {missing[0].name} which does not exist (a stale fp16 index?)"
            )
        return shards
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files")
    return files


def _read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of all shards, and the shard each came from (for error messages)."""
    state: dict[str, torch.Tensor] = {}
    owners: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if key in state:
                        raise ValueError(f"{file}: tensor {key} also appears in {owners[key]}")
                    state[key] = handle.get_tensor(key)
                    owners[key] = file
        except ValueError:
            raise
        except Exception as err:  # SafetensorError and friends for corrupt files
            raise ValueError(
                f"{file}: not a readable safetensors file: {type(err).__name__}: {err}"
            ) from None
    return state, owners


def load_hf_awq_directory(
    directory: Path,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """A Hugging Face / AutoAWQ AWQ model folder (single or sharded safetensors)."""
    directory = Path(directory)
    config, group, _version = _awq_settings(directory / "config.json")
    state, owners = _read_safetensors(_safetensors_files(directory))
    # Errors name the shard that holds the module's qweight, so split the state by that shard.
    grouped, _ = _split_modules(state)
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module = key.rpartition(".")[0]
        file = owners[f"{module}.qweight"] if module in grouped else owners[key]
        by_file.setdefault(file, {})[key] = tensor
    quantized: dict[str, QuantizedWeight] = {}
    plain: dict[str, torch.Tensor] = {}
    for file, part in by_file.items():
        q, p = _unpack_all(file, part, group, config, expected_shapes, infer_group=False)
        quantized.update(q)
        plain.update(p)
    return quantized, plain
