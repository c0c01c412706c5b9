"""What the engine reports as it runs; the worker's /metrics adapter listens (tests need not)."""

from __future__ import annotations

from typing import Protocol

from vilaserve.domain.worker.first_token import FirstTokenParts


class FirstTokenObserver(Protocol):
    def first_token_parts(self, parts: FirstTokenParts) -> None:
        """Once per request, when its first token is out: where its time to it went."""


class EngineObserver(FirstTokenObserver, Protocol):
    def step(self, *, tokens: int, decodes: int, seconds: float) -> None: ...

    def load(self, *, running: int, waiting: int, kv_usage: float) -> None: ...

    def admitted(self, *, prompt_tokens: int, reused_tokens: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, *, reason: str, generated: int) -> None: ...


class NoObserver:
    def step(self, *, tokens: int, decodes: int, seconds: float) -> None:
        pass

    def load(self, *, running: int, waiting: int, kv_usage: float) -> None:
        pass

    def admitted(self, *, prompt_tokens: int, reused_tokens: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def first_token_parts(self, parts: FirstTokenParts) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass

    def finished(self, *, reason: str, generated: int) -> None:
        pass
