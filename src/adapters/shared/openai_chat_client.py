"""Asking a running OpenAI-compatible API about pictures: how `vilaserve chat` uses a stack that
already holds the model instead of loading it (seconds) in its own process.

Synchronous on purpose: one question, one streamed answer, nothing to overlap. Whether a stack
is there at all costs at most the connect timeout, so the caller can fall back quickly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

DEFAULT_CONNECT_TIMEOUT_S = 0.3  # loopback answers in well under a millisecond
LISTING_TIMEOUT_S = 10.0  # /v1/models may ask a worker for its details first
ANSWER_PIECE_TIMEOUT_S = 300.0  # between two pieces of the answer (a busy CPU is slow)

# Magic bytes of the formats the worker decodes; the API accepts any `image/*` data URL.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


class ApiUnreachable(Exception):
    """Nothing answered at the API's address (refused, or no connection within the timeout)."""


class ApiUnusable(Exception):
    """The API answered but cannot answer this question; the message says why. Nothing of an
    answer has been delivered, so the caller may still ask elsewhere."""


class ApiAnswerBroke(Exception):
    """The answer failed after part of it was delivered; the message says why."""


def image_media_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    # The worker reads the picture from its bytes, not from this label (the in-process path
    # labels every picture PNG too); the API only requires an image type.
    return "image/png"


def image_data_url(data: bytes) -> str:
    return f"data:{image_media_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


def user_message(question: str, images: Sequence[bytes]) -> dict[str, Any]:
    """The user turn as the in-process chat builds it (application/chat/ask_image.py): the
    pictures before the question, or the plain question when there is no picture."""
    if not images:
        return {"role": "user", "content": question}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(data)}} for data in images
    ]
    if question:
        parts.append({"type": "text", "text": question})
    return {"role": "user", "content": parts}


def _error_message(response: httpx.Response) -> str:
    """OpenAI's `{"error": {"message": ...}}` when the body has it, else the status line."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}"
    return f"{response.status_code}: {message}"


class OpenAiChatClient:
    """The chat endpoints of the API at `base_url` (e.g. `http://127.0.0.1:8000`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # No proxy from the environment: a proxy would accept every connection, and the quick
        # "is a stack there?" answer would become a slow failure.
        self._http = httpx.Client(headers=headers, trust_env=False, transport=transport)

    def __enter__(self) -> OpenAiChatClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _timeout(self, read_s: float) -> httpx.Timeout:
        return httpx.Timeout(read_s, connect=self._connect_timeout_s)

    def served_models(self) -> list[str]:
        """The ids `/v1/models` lists. Raises ApiUnreachable when nothing answers, ApiUnusable
        when something answers but not with a model list."""
        url = f"{self._base_url}/v1/models"
        try:
            response = self._http.get(url, timeout=self._timeout(LISTING_TIMEOUT_S))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiUnreachable(f"nothing answers at {self._base_url}: {exc}") from exc
        except httpx.HTTPError as exc:
            reason = f"the API at {self._base_url} failed to list its models: {exc}"
            raise ApiUnusable(reason) from exc
        if response.status_code != 200:
            reason = _error_message(response)
            raise ApiUnusable(f"the API at {self._base_url} answered /v1/models with {reason}")
        try:
            return [str(card["id"]) for card in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiUnusable(f"{url} did not answer with an OpenAI model list") from exc

    def ask(
        self,
        model: str,
        question: str,
        images: Sequence[bytes] = (),
        *,
        max_tokens: int,
        temperature: float,
    ) -> Iterator[str]:
        """Yields the answer piece by piece, streamed from `/v1/chat/completions`. Raises
        ApiUnusable while nothing has been yielded yet, ApiAnswerBroke after."""
        body = {
            "model": model,
            "messages": [user_message(question, images)],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        url = f"{self._base_url}/v1/chat/completions"
        delivered = False
        try:
            with self._http.stream(
                "POST", url, json=body, timeout=self._timeout(ANSWER_PIECE_TIMEOUT_S)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise ApiUnusable(
                        f"the API at {self._base_url} refused the question: "
                        f"{_error_message(response)}"
                    )
                for piece in _answer_pieces(response.iter_lines()):
                    delivered = True
                    yield piece
        except (httpx.HTTPError, _StreamError) as exc:
            if delivered:
                raise ApiAnswerBroke(str(exc)) from exc
            raise ApiUnusable(f"the API at {self._base_url} failed the question: {exc}") from exc


class _StreamError(Exception):
    """An error event in the stream, or an event that is not OpenAI's."""


def _answer_pieces(lines: Iterator[str]) -> Iterator[str]:
    """The text of each `data:` event of an OpenAI chat completion stream, up to `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, other fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise _StreamError(f"an event that is not JSON: {data[:80]!r}") from exc
        if "error" in event:
            error = event["error"]
            raise _StreamError(error.get("message") if isinstance(error, dict) else str(error))
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text
    raise _StreamError("the stream ended before [DONE]")
