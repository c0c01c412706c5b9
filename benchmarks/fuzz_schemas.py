"""Schemathesis on the OpenAPI schemas of the worker, the controller and the API, with a large
budget: the suite's `tests/unit/test_fuzz_schemas.py` (fakes behind each service's container;
no 5xx, errors in the service's own shape, the service still serving afterwards), run with
`--examples` generated cases per operation instead of the suite's few.

    python benchmarks/fuzz_schemas.py --examples 2000

Writes benchmarks/results/fuzz_schemas.{json,png} and prints the JSON summary: operations,
cases sent per operation (schemathesis' coverage cases plus `--examples` random ones), their
HTTP statuses, failures, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from serve_load import cpu_description

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SUITE = ROOT / "tests" / "unit" / "test_fuzz_schemas.py"
SERVICE_OF = {
    "test_worker_schema": "worker",
    "test_controller_schema": "controller",
    "test_api_schema": "api",
}


class Outcomes:
    """A pytest plugin: each operation's test outcome and, on failure, its report."""

    def __init__(self) -> None:
        self.by_label: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.when == "setup" and report.failed):
            return
        name, _, operation = report.nodeid.split("::")[-1].partition("[")
        label = f"{SERVICE_OF.get(name, name)} {operation.rstrip(']')}"
        entry = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
        if report.failed:
            entry["failure"] = str(report.longrepr)[-3000:]
        self.by_label[label] = entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="random cases per operation")
    parser.add_argument("-k", default="", help="pytest -k expression (e.g. 'worker')")
    args = parser.parse_args()

    import pytest

    stats_file = Path(tempfile.mkstemp(prefix="fuzz-schemas-", suffix=".json")[1])
    os.environ["SCHEMA_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["SCHEMA_FUZZ_STATS"] = str(stats_file)
    outcomes = Outcomes()
    pytest_args = [str(SUITE), "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    if args.k:
        pytest_args += ["-k", args.k]
    started = time.perf_counter()
    exit_code = pytest.main(pytest_args, plugins=[outcomes])
    wall_s = time.perf_counter() - started
    stats: dict[str, dict[str, Any]] = json.loads(stats_file.read_text() or "{}")
    stats_file.unlink()

    per_operation = {
        label: {**stats.get(label, {"cases": 0}), **outcome}
        for label, outcome in sorted(outcomes.by_label.items())
    }
    failed = [label for label, entry in per_operation.items() if entry["outcome"] == "failed"]
    report = {
        "cpu": cpu_description(),
        "command": f"python benchmarks/fuzz_schemas.py --examples {args.examples}"
        + (f" -k {args.k!r}" if args.k else ""),
        "examples_per_operation": args.examples,
        "operations": len(per_operation),
        "cases": sum(int(e.get("cases", 0)) for e in per_operation.values()),
        "resent_cases": sum(
            sum(e.get("resent_statuses", {}).values()) for e in per_operation.values()
        ),
        "failures": len(failed),
        "failed_operations": failed,
        "wall_s": round(wall_s, 1),
        "pytest_exit_code": int(exit_code),
        "per_operation": per_operation,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz_schemas.json").write_text(json.dumps(report, indent=2) + "\n")

    labels = list(per_operation)
    cases = [int(per_operation[label].get("cases", 0)) for label in labels]
    colors = ["tab:red" if label in failed else "tab:blue" for label in labels]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.2))
    ax.barh(labels, cases, color=colors)
    ax.invert_yaxis()
    ax.set(
        xlabel="cases sent (coverage + random; red: a failure found)",
        title=f"schemathesis, {args.examples} random examples per operation: "
        f"{len(failed)} failing of {len(labels)}",
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(RESULTS / "fuzz_schemas.png", dpi=110)
    summary = {k: v for k, v in report.items() if k != "per_operation"}
    print(json.dumps(summary, indent=2))
    sys.exit(0 if not failed and exit_code == 0 else 1)


if __name__ == "__main__":
    main()
