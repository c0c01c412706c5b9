"""The hardening review's findings about `vilaserve serve` (findings 4 and 6), against the real
command on the tiny checkpoint, as `test_serve.py` runs it.

4. Keys never on a command line: keys from `--api-keys-file` (mode 0600), the environment
   (`VILASERVE_API_KEYS`) or serve's legacy `--api-keys` reach the API child through its
   environment, so no child's /proc/<pid>/cmdline (what `ps` shows any user) holds one; the API
   still requires them. A keys file others can read is refused before anything starts. With
   keys, the three children share a per-run internal token, also through the environment.
6. A crashed worker no longer takes the service down: after `kill -9` of the worker, serve
   restarts it (back-off 1 s, then 2 s, ...), the API and the controller stay up, a request in
   the outage gets a 503 at once, and the restarted worker serves.

Marked `subprocess`: each test starts `vilaserve serve` (three processes, one imports torch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve import alive, ports, serve

pytestmark = pytest.mark.subprocess


def _chat(api: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{api}/v1/chat/completions", json=body, timeout=120)


def _proc(pid: int, what: str) -> list[bytes]:
    """A process's NUL-separated /proc entry (cmdline: what `ps` shows; environ: owner only)."""
    return Path(f"/proc/{pid}/{what}").read_bytes().split(b"\0")


def test_a_killed_worker_is_restarted_while_the_api_answers_503(tiny_vila_siglip: Path) -> None:
    api_port, controller_port, worker_port = ports()
    flags = ["--api-port", api_port, "--controller-port", controller_port]
    flags += ["--worker-port", worker_port, "--dtype", "float32"]
    api = f"http://127.0.0.1:{api_port}"
    model = tiny_vila_siglip.name
    with serve("--model-path", str(tiny_vila_siglip), *flags) as stack:
        stack.wait_for_line(r"^Chat: ")
        pids = stack.child_pids()
        assert _chat(api, model).status_code == 200  # the API now knows the worker's address

        os.kill(pids["worker"], signal.SIGKILL)
        died = stack.wait_for_line(r"the worker (was killed|exited)", timeout=30)
        expected = "the worker was killed by SIGKILL; restarting in 1 s (restart 1 of 5)"
        assert died == f"vilaserve serve: {expected}"

        # The outage: the restarted worker is still loading. The API answers at once, 503.
        started = time.monotonic()
        refused = _chat(api, model)
        assert refused.status_code == 503, refused.text
        assert time.monotonic() - started < 5
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert alive(pids["api"]) and alive(pids["controller"])

        stack.wait_for_line(r"the worker is serving again", timeout=240)
        restarted = stack.child_pids()["worker"]
        assert restarted != pids["worker"] and alive(restarted)
        served = _chat(api, model)
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["role"] == "assistant"
        assert {n: p for n, p in stack.child_pids().items() if n != "worker"} == {
            "controller": pids["controller"],
            "api": pids["api"],
        }

        stack.process.send_signal(signal.SIGINT)
        assert stack.process.wait(timeout=60) == 0, stack.log()
        assert not [p for p in (pids["controller"], pids["api"], restarted) if alive(p)]


def test_keys_given_on_serves_command_line_or_its_environment_stay_off_the_apis(
    tiny_vila_siglip: Path,
) -> None:
    api_port, controller_port, worker_port = ports()
    flags = ["--api-port", api_port, "--controller-port", controller_port]
    flags += ["--worker-port", worker_port, "--api-keys", "legacy-flag-key"]
    env = {"VILASERVE_API_KEYS": "env-key"}
    with serve("--model-path", str(tiny_vila_siglip), *flags, env=env) as stack:
        stack.wait_for_line(r"^Chat: ")
        _assert_keys_kept_off_command_lines(
            stack.child_pids(), f"http://127.0.0.1:{api_port}", ["legacy-flag-key", "env-key"]
        )
        warnings = [line for line in stack.lines if "--api-keys" in line]
        assert [w for w in warnings if "visible" in w and "ps" in w], stack.lines


def test_keys_from_a_file_reach_the_api_through_its_environment(
    tiny_vila_siglip: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("file-key-1\nfile-key-2, file-key-3\n")
    keys_file.chmod(0o600)
    api_port, controller_port, worker_port = ports()
    flags = ["--api-port", api_port, "--controller-port", controller_port]
    flags += ["--worker-port", worker_port, "--api-keys-file", str(keys_file)]
    with serve("--model-path", str(tiny_vila_siglip), *flags) as stack:
        stack.wait_for_line(r"^Chat: ")
        pids = stack.child_pids()
        keys = ["file-key-1", "file-key-2", "file-key-3"]
        _assert_keys_kept_off_command_lines(pids, f"http://127.0.0.1:{api_port}", keys)
        # One internal token for the run, the same in all three children, in no command line.
        tokens = {
            name: [e for e in _proc(pid, "environ") if e.startswith(b"VILASERVE_INTERNAL_TOKEN=")]
            for name, pid in pids.items()
        }
        assert all(len(found) == 1 for found in tokens.values()), tokens
        assert len({found[0] for found in tokens.values()}) == 1
        token = tokens["api"][0].partition(b"=")[2]
        assert len(token) >= 32
        assert not [n for n, pid in pids.items() if token in b" ".join(_proc(pid, "cmdline"))]


def _assert_keys_kept_off_command_lines(pids: dict[str, int], api: str, keys: list[str]) -> None:
    """No child's command line (what `ps` shows every user) holds a key; the API needs one."""
    assert sorted(pids) == ["api", "controller", "worker"]
    for name, pid in pids.items():
        argv = b" ".join(_proc(pid, "cmdline"))
        assert not [k for k in keys if k.encode() in argv], f"the {name}'s command line: {argv!r}"
        assert b"--api-keys" not in argv, f"the {name}'s command line: {argv!r}"
    assert httpx.get(f"{api}/v1/models", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-a-key"}
    assert httpx.get(f"{api}/v1/models", headers=wrong, timeout=10).status_code == 401
    for key in keys:
        reply = httpx.get(f"{api}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, (key, reply.text)


def test_a_keys_file_others_can_read_is_refused_naming_its_mode(
    tiny_vila_siglip: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("k1\n")
    keys_file.chmod(0o644)
    api_port, controller_port, worker_port = ports()
    flags = ["--api-port", api_port, "--controller-port", controller_port]
    flags += ["--worker-port", worker_port, "--api-keys-file", str(keys_file)]
    with serve("--model-path", str(tiny_vila_siglip), *flags) as stack:
        refused = stack.wait_for_line(r"api-keys-file", timeout=30)
        assert "0644" in refused and "chmod 600" in refused
        assert stack.process.wait(timeout=30) == 1
        assert "started" not in " ".join(stack.lines)
    # The API alone refuses it too (its own flag, or VILASERVE_API_API_KEYS_FILE).
    command = [sys.executable, "-m", "vilaserve.entrypoints.cli", "api", "--port", api_port]
    api = subprocess.run(
        [*command, "--api-keys-file", str(keys_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert api.returncode != 0
    assert "0644" in api.stderr and "chmod 600" in api.stderr, api.stderr
