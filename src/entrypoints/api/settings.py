"""API server settings: environment variables (`VILASERVE_API_*`) overridden by flags."""

from __future__ import annotations

import os
import stat
from typing import Literal

from pydantic import AliasChoices, Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vilaserve.application.api.image_inputs import DEFAULT_MAX_IMAGE_BYTES
from vilaserve.application.api.model_router import DEFAULT_ADDRESS_TTL_S, DEFAULT_INFO_TTL_S
from vilaserve.domain.api.remote_images import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_REMOTE_IMAGE_BYTES,
)


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def read_api_keys_file(path: str) -> tuple[str, ...]:
    """The keys in `path` (one a line, or comma-separated). Raises ValueError when the file
    cannot be read, holds no key, or group or others may read or change it (keys are secrets,
    and a key added by someone else would be let in)."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-keys-file {path}: cannot read it ({exc})") from exc
    if mode & 0o077:
        raise ValueError(
            f"--api-keys-file {path}: mode {mode:04o} lets group or others read or change it; "
            f"chmod 600 {path}"
        )
    keys = tuple(key for line in text.splitlines() for key in _comma_list(line))
    if not keys:
        raise ValueError(f"--api-keys-file {path}: no key in it (one a line, or comma-separated)")
    return keys


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VILASERVE_API_", extra="ignore", populate_by_name=True
    )

    controller_address: str = "http://localhost:21001"
    host: str = "127.0.0.1"
    port: int = 8000
    # Comma-separated bearer keys; empty: no key needed. Env: VILASERVE_API_API_KEYS or
    # VILASERVE_API_KEYS. As a flag they are visible to `ps`: the env or api_keys_file is better.
    api_keys: str = Field(
        "", validation_alias=AliasChoices("VILASERVE_API_API_KEYS", "VILASERVE_API_KEYS")
    )
    # More keys, from a file only its owner may read (read_api_keys_file), at startup.
    api_keys_file: str = ""
    _file_keys: tuple[str, ...] = PrivateAttr(())
    # With keys set, /metrics asks for one too unless this is on (a scraper without a key).
    public_metrics: bool = False
    web_chat: bool = True  # serve the chat page at / (it asks the user for a key when needed)

    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False  # fetch from loopback / private addresses too
    image_domains: str = ""  # comma-separated allow-list; empty: any host (when allowed)
    image_fetch_timeout_s: float = Field(DEFAULT_FETCH_TIMEOUT_S, gt=0)
    max_remote_image_bytes: int = Field(DEFAULT_MAX_REMOTE_IMAGE_BYTES, ge=1)
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # A request without pictures needs far less: a larger one gets 413 before it is parsed.
    max_text_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Slow clients: a request head must arrive whole within header_timeout_s, a body may not
    # pause longer than body_timeout_s, and beyond max_connections open ones new connections
    # are refused (503) unread.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(4096, ge=1)

    max_concurrent_requests: int = Field(256, ge=1)
    controller_timeout_s: float = Field(5.0, gt=0)
    worker_timeout_s: float = Field(300.0, gt=0)  # longest silence tolerated from a worker
    worker_address_ttl_s: float = Field(DEFAULT_ADDRESS_TTL_S, ge=0)
    model_info_ttl_s: float = Field(DEFAULT_INFO_TTL_S, ge=0)
    # The stack's internal token (env VILASERVE_INTERNAL_TOKEN; `vilaserve serve` makes one
    # when the API has keys): sent to the controller and the workers.
    internal_token: str | None = Field(
        None, validation_alias=AliasChoices("internal_token", "VILASERVE_INTERNAL_TOKEN")
    )
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _read_keys_file(self) -> ApiSettings:
        if self.api_keys_file:
            self._file_keys = read_api_keys_file(self.api_keys_file)
        return self

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*_comma_list(self.api_keys), *self._file_keys)))

    @property
    def image_domain_list(self) -> tuple[str, ...]:
        return tuple(d.lower().rstrip(".") for d in _comma_list(self.image_domains))
