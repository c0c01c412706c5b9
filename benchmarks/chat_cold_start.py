"""Cold start of `vilaserve chat`: process start to answer, the demo model, one picture.

Runs `python -m vilaserve.entrypoints.cli chat --image docs/demo-example.png "What shape is
this?"` as a fresh subprocess `--runs` times (after `--warmup` uncounted runs; the demo model
must be built already: the first `vilaserve chat` builds it) and records the wall time of each
whole run. Results are merged by label into the JSON, so that two trees (e.g. before and after a
change) plot side by side:

    python benchmarks/chat_cold_start.py --label after
    python benchmarks/chat_cold_start.py --label before --src /tmp/coldstart_before/src
    # both, alternating run by run (fairer on a busy machine than one after the other):
    python benchmarks/chat_cold_start.py --labels before=/tmp/coldstart_before/src,after=

`--src` runs another checkout's `src/` as `vilaserve`: the editable install maps `vilaserve`
onto this checkout's `src/` with a finder that comes after `sys.path`, so a folder holding a
`vilaserve` link to that `src/`, put on PYTHONPATH, wins (the JSON records which `src/` each
label really imported, and its commit).

Writes benchmarks/results/chat_cold_start.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGE = ROOT / "docs" / "demo-example.png"
QUESTION = "What shape is this?"


def machine() -> dict[str, Any]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    avx512 = sorted(f for f in fields.get("Flags", "").split() if f.startswith("avx512"))
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "avx512": bool(avx512),
        "avx512_flags": avx512,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def revision(src: Path) -> str:
    """The commit of the tree behind `src`, marked when it has uncommitted changes."""
    git = ["git", "-C", str(src)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def environment(src: Path | None, shim: Path, threads: int) -> dict[str, str]:
    """The child's environment: with `src`, `vilaserve` imports from that tree."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if src is not None:
        link = shim / "vilaserve"
        if not link.exists():
            link.symlink_to(src.resolve(), target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    return env


def refuse_beside_a_stack(port: int = 8000) -> None:
    """`vilaserve chat` asks a stack it finds on the API's port instead of loading the model:
    with one up, this benchmark would time that, not a cold start."""
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.3)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(
                f"something listens on 127.0.0.1:{port} (a running stack?): `vilaserve chat` "
                "would ask it instead of starting cold; stop it first"
            )


def run_once(env: dict[str, str], image: Path, question: str) -> tuple[float, str]:
    command = [sys.executable, "-m", "vilaserve.entrypoints.cli", "chat"]
    command += ["--image", str(image), question]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout.strip()


def where_from(env: dict[str, str]) -> str:
    """The `src/` the child actually imports `vilaserve` from (so a label cannot lie)."""
    probe = "import vilaserve; print(list(vilaserve.__path__)[0])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    return str(Path(out.stdout.strip()).resolve())


def summary(times: list[float], answer: str, src: str, command: str) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "runs_s": [round(t, 3) for t in times],
        "answer": answer,
        "src": src,
        "revision": revision(Path(src)),
        "command": command,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per thread setting (their timings differ by seconds on a busy machine)."""
    panels: dict[str, list[str]] = {}
    for label, result in results.items():
        panels.setdefault(str(result.get("omp_num_threads", "default")), []).append(label)
    width = sum(1.6 * len(labels) + 1.5 for labels in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, width), 4.2), squeeze=False)
    for ax, (threads, labels) in zip(axes[0], panels.items(), strict=True):
        medians = [results[label]["median_s"] for label in labels]
        colours = ["#999" if "before" in label else "#2a6" for label in labels]
        bars = ax.bar(range(len(labels)), medians, color=colours)
        for i, label in enumerate(labels):
            runs = results[label]["runs_s"]
            ax.scatter([i] * len(runs), runs, color="black", s=10, zorder=3)
        ax.bar_label(bars, labels=[f"{m:.2f} s" for m in medians], label_type="center")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
        ax.set_ylim(0, max(results[label]["max_s"] for label in labels) * 1.15)
        ax.set_ylabel("process start to answer (s)")
        title = "torch's default threads" if threads == "default" else f"OMP_NUM_THREADS={threads}"
        ax.set_title(title, fontsize=10)
    fig.suptitle("vilaserve chat, demo model, cold start (median; dots: runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="runs per tree not counted")
    parser.add_argument("--label", default="current", help="results are merged by label")
    parser.add_argument("--src", type=Path, default=None, help="run this tree's src/ instead")
    parser.add_argument(
        "--labels",
        default=None,
        help="several trees at once, interleaved run by run: label=src,... (src '' = this tree)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for the runs (0: torch's default). On a machine other work keeps "
        "busy, torch's thread team waits on preempted threads and the load's timing swings by "
        "seconds; one thread steadies it (the imports, most of a cold start, are one thread)",
    )
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()
    refuse_beside_a_stack()

    if args.labels:
        trees = []
        for item in args.labels.split(","):
            label, _, src = item.partition("=")
            trees.append((label, Path(src) if src else None))
    else:
        trees = [(args.label, args.src)]

    path = RESULTS / "chat_cold_start.json"
    report = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    command = f"python -m vilaserve.entrypoints.cli chat --image {args.image} {args.question!r}"
    with tempfile.TemporaryDirectory() as tmp:
        envs = {}
        for i, (label, src) in enumerate(trees):
            shim = Path(tmp) / str(i)
            shim.mkdir()
            envs[label] = environment(src, shim, args.threads)
        imported = {label: where_from(env) for label, env in envs.items()}
        times: dict[str, list[float]] = {label: [] for label, _ in trees}
        answers: dict[str, str] = {}
        # The warm-up writes the trees' bytecode caches and fills the page cache.
        for run in range(-args.warmup, args.runs):
            for label, _ in trees:  # interleaved: every tree sees the same machine load
                seconds, answers[label] = run_once(envs[label], args.image, args.question)
                if run >= 0:
                    times[label].append(seconds)
                kind = "warm-up" if run < 0 else f"run {run + 1}"
                print(f"{label:<10} {kind:>7}: {seconds:6.2f} s  {answers[label]!r}", flush=True)
    for label, _ in trees:
        report["results"].pop(label, None)  # re-measured labels move to the end, in run order
        report["results"][label] = {
            **summary(times[label], answers[label], imported[label], command),
            "omp_num_threads": envs[label].get("OMP_NUM_THREADS", "default"),
        }
        print(
            f"{label:<10} median {report['results'][label]['median_s']:.2f} s "
            f"(src {imported[label]})"
        )
    report["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report["results"], RESULTS / "chat_cold_start.png")
    print(f"wrote {path} and chat_cold_start.png")


if __name__ == "__main__":
    main()
