"""`vilaserve serve --ray auto` as a user runs it: a local Ray cluster of its own, one replica
of the tiny random checkpoint, the API in front; the replicas' states in its log; Ctrl-C
stops it all."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason='needs the [ray] extra: pip install -e ".[ray]"')

from servers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.subprocess]

START_S = 300.0  # a Ray cluster, then a replica that imports torch, on a busy 2-core box


def test_serve_on_ray_answers_logs_its_replicas_and_stops_on_ctrl_c(
    tiny_vila_siglip: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "vilaserve.entrypoints.cli", "serve", "--ray", "auto",
        "--model-path", str(tiny_vila_siglip), "--dtype", "float32", "--replica-cpus", "1",
        "--api-port", str(port), "--log-format", "text",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
                break
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.5)
        assert [m["id"] for m in models] == ["VILA1.5-tiny-siglip"]
        body = {
            "model": "VILA1.5-tiny-siglip",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4,
            "ignore_eos": True,
        }
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "vilaserve serve: replicas: 1 running (healthy)" in text, text[-3000:]
    assert "vilaserve serve: stopped" in text, text[-3000:]
