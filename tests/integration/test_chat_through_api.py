"""`vilaserve chat` asks a running stack when it serves the model chat would load.

A fake OpenAI-compatible server (FastAPI on real uvicorn, loopback) stands in for the stack in
most tests, and the in-process path is replaced by a recorder so that each test shows which way
the question went. The last tests use the real stack and the real in-process path.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from servers import ApiStack, ServerThread, free_port, serving_stack

from vilaserve.entrypoints import chat

ROOT = Path(__file__).resolve().parents[2]
PICTURE = ROOT / "docs" / "demo-example.png"


class FakeOpenAiApi:
    """`/v1/models` and a streamed `/v1/chat/completions`, recording the completion bodies."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.pieces: list[str] = ["st", "ar"]
        self.error_after_pieces: str | None = None  # an OpenAI error event after the pieces
        self.completion_status = 200
        self.required_key: str | None = None
        self.model_listings = 0
        self.completions: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.get("/v1/models")(self._models)
        self.app.post("/v1/chat/completions")(self._complete)

    def _refused(self, request: Request) -> Response | None:
        if self.required_key and request.headers.get("authorization") != (
            f"Bearer {self.required_key}"
        ):
            return JSONResponse({"error": {"message": "the API key is not valid"}}, 401)
        return None

    async def _models(self, request: Request) -> Response:
        self.model_listings += 1
        refused = self._refused(request)
        if refused is not None:
            return refused
        cards = [{"id": name, "object": "model", "owned_by": "fake"} for name in self.models]
        return JSONResponse({"object": "list", "data": cards})

    async def _complete(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.completions.append(await request.json())
        if self.completion_status != 200:
            error = {"error": {"message": "the question was refused"}}
            return JSONResponse(error, self.completion_status)
        return StreamingResponse(self._events(), media_type="text/event-stream")

    async def _events(self) -> AsyncIterator[bytes]:
        def event(data: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        yield event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for piece in self.pieces:
            yield event({"choices": [{"index": 0, "delta": {"content": piece}}]})
        if self.error_after_pieces:
            yield event({"error": {"message": self.error_after_pieces}})
        else:
            yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield b"data: [DONE]\n\n"


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeOpenAiApi, str]]:
    fake = FakeOpenAiApi()
    with ServerThread(fake.app) as server:
        yield fake, server.url


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The questions that went to the in-process path (which answers "loaded here")."""
    calls: list[argparse.Namespace] = []

    def record(args: argparse.Namespace, images: list[bytes]) -> int:
        calls.append(args)
        print("loaded here")
        return 0

    monkeypatch.setattr(chat, "ask_in_process", record)
    monkeypatch.delenv(chat.API_KEYS_ENV, raising=False)
    return calls


def run_chat(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    chat.add_chat_arguments(parser)
    return chat.run_chat(parser.parse_args(argv))


def checkpoint(tmp_path: Path, name: str, awq: bool = False) -> Path:
    """A directory that names a model (chat reads only `llm/config.json` before deciding)."""
    llm = tmp_path / name / "llm"
    llm.mkdir(parents=True)
    config: dict[str, Any] = {"model_type": "llama"}
    if awq:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (llm / "config.json").write_text(json.dumps(config))
    return tmp_path / name


def test_answers_through_the_api_when_it_lists_the_model(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["another", "vila-test"]
    model = checkpoint(tmp_path, "vila-test")
    argv = ["--api-url", url, "--model-path", str(model), "--image", str(PICTURE)]
    code = run_chat(*argv, "--max-new-tokens", "7", "What shape is this?")
    out, err = capsys.readouterr()
    assert (code, out, err, in_process) == (0, "star\n", "", [])
    (body,) = fake.completions
    assert body["model"] == "vila-test"
    assert (body["max_tokens"], body["temperature"], body["stream"]) == (7, 0.0, True)


def test_sends_the_picture_as_a_data_url_before_the_question(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    model = checkpoint(tmp_path, "vila-test")
    run_chat("--api-url", url, "--model-path", str(model), "--image", str(PICTURE), "Where?")
    (message,) = fake.completions[0]["messages"]
    expected_url = "data:image/png;base64," + base64.b64encode(PICTURE.read_bytes()).decode()
    assert message == {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": expected_url}},
            {"type": "text", "text": "Where?"},
        ],
    }


def test_asks_for_the_name_the_worker_gives_an_awq_checkpoint(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test-4bit-AWQ"]
    model = checkpoint(tmp_path, "vila-test", awq=True)
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 0
    assert [body["model"] for body in fake.completions] == ["vila-test-4bit-AWQ"]
    assert in_process == []


@pytest.mark.parametrize(
    ("argv", "name"),
    [((), "vila-demo-4bit-AWQ"), (("--precision", "W16A16"), "vila-demo")],
)
def test_without_a_model_path_asks_for_the_demo_as_make_demo_serves_it(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    argv: tuple[str, ...],
    name: str,
) -> None:
    fake, url = fake_api
    fake.models = [name]
    assert run_chat("--api-url", url, *argv, "What shape is this?") == 0
    assert [body["model"] for body in fake.completions] == [name]
    assert in_process == []


def test_falls_back_with_one_line_when_the_api_serves_another_model(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-demo"]
    model = checkpoint(tmp_path, "vila-test")
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 0
    out, err = capsys.readouterr()
    assert out == "loaded here\n"
    assert len(in_process) == 1
    assert fake.completions == []
    assert len(err.splitlines()) == 1
    assert "serves vila-demo, not vila-test" in err


def test_falls_back_silently_when_nothing_listens(
    in_process: list[argparse.Namespace], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    model = checkpoint(tmp_path, "vila-test")
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 0
    assert capsys.readouterr() == ("loaded here\n", "")
    assert len(in_process) == 1


def test_in_process_flag_never_asks_the_api(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    model = checkpoint(tmp_path, "vila-test")
    assert run_chat("--api-url", url, "--model-path", str(model), "--in-process", "Hi?") == 0
    assert capsys.readouterr() == ("loaded here\n", "")
    assert (fake.model_listings, fake.completions, len(in_process)) == (0, [], 1)


def test_a_keyed_api_takes_the_first_key_of_the_environment(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    fake.required_key = "first-key"
    model = checkpoint(tmp_path, "vila-test")
    monkeypatch.setenv(chat.API_KEYS_ENV, " first-key , second-key")
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 0
    assert capsys.readouterr() == ("star\n", "")
    assert in_process == []


def test_a_keyed_api_without_the_key_is_said_and_falls_back(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    fake.required_key = "the-key"
    model = checkpoint(tmp_path, "vila-test")
    argv = ["--api-url", url, "--model-path", str(model)]
    assert run_chat(*argv, "--api-key", "wrong", "Hello?") == 0
    out, err = capsys.readouterr()
    assert out == "loaded here\n"
    assert "401" in err and len(err.splitlines()) == 1
    assert run_chat(*argv, "--api-key", "the-key", "Hello?") == 0
    assert capsys.readouterr() == ("star\n", "")


def test_a_refused_question_falls_back_with_the_reason(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    fake.completion_status = 503
    model = checkpoint(tmp_path, "vila-test")
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 0
    out, err = capsys.readouterr()
    assert out == "loaded here\n"
    assert "the question was refused" in err and len(err.splitlines()) == 1


def test_an_error_after_the_answer_began_is_reported_not_asked_again(
    fake_api: tuple[FakeOpenAiApi, str],
    in_process: list[argparse.Namespace],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    fake.error_after_pieces = "the worker died"
    model = checkpoint(tmp_path, "vila-test")
    assert run_chat("--api-url", url, "--model-path", str(model), "Hello?") == 1
    out, err = capsys.readouterr()
    assert out == "star"
    assert err == "\nerror: the worker died\n"  # as the in-process path reports a failure
    assert in_process == []


@pytest.mark.subprocess
def test_the_answer_through_the_api_imports_no_torch(
    fake_api: tuple[FakeOpenAiApi, str], tmp_path: Path
) -> None:
    fake, url = fake_api
    fake.models = ["vila-test"]
    model = checkpoint(tmp_path, "vila-test")
    argv = ["--api-url", url, "--model-path", str(model), "--image", str(PICTURE), "Hi?"]
    env = {key: value for key, value in os.environ.items() if key != chat.API_KEYS_ENV}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vilaserve.entrypoints.cli", "chat", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (done.returncode, done.stdout) == (0, "star\n"), done.stderr[-2000:]
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", done.stderr, flags=re.MULTILINE)
    assert "httpx" in imported  # the report was read: the answer did come through the client
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")]
    assert heavy == []


def test_the_stack_answers_as_the_model_loaded_here(
    tiny_vila_siglip: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real worker and API, against the real in-process path: the same printed answer."""
    monkeypatch.delenv(chat.API_KEYS_ENV, raising=False)
    argv = ["--model-path", str(tiny_vila_siglip), "--image", str(PICTURE)]
    argv += ["--max-new-tokens", "12", "What is in the picture?"]
    assert run_chat("--in-process", *argv) == 0
    loaded_here = capsys.readouterr().out

    def not_here(args: argparse.Namespace, images: list[bytes]) -> int:
        raise AssertionError("the question should have gone to the running stack")

    monkeypatch.setattr(chat, "ask_in_process", not_here)
    stack: ApiStack
    with serving_stack(tiny_vila_siglip, dtype="auto") as stack:
        assert run_chat("--api-url", stack.api_url, *argv) == 0
    through_api, err = capsys.readouterr()
    assert "vilaserve chat:" not in err  # (the worker loading here writes its progress there)
    assert through_api == loaded_here
    assert len(loaded_here.strip()) > 0
