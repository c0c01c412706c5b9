"""API server settings: environment variables (`VILASERVE_API_*`) overridden by flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vilaserve.application.api.image_inputs import DEFAULT_MAX_IMAGE_BYTES
from vilaserve.application.api.model_router import DEFAULT_ADDRESS_TTL_S, DEFAULT_INFO_TTL_S
from vilaserve.domain.api.remote_images import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_REMOTE_IMAGE_BYTES,
)


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VILASERVE_API_", extra="ignore")

    controller_address: str = "http://localhost:21001"
    host: str = "127.0.0.1"
    port: int = 8000
    # Comma-separated bearer keys; empty: no key needed. Env: VILASERVE_API_API_KEYS.
    api_keys: str = ""
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

    max_concurrent_requests: int = Field(256, ge=1)
    controller_timeout_s: float = Field(5.0, gt=0)
    worker_timeout_s: float = Field(300.0, gt=0)  # longest silence tolerated from a worker
    worker_address_ttl_s: float = Field(DEFAULT_ADDRESS_TTL_S, ge=0)
    model_info_ttl_s: float = Field(DEFAULT_INFO_TTL_S, ge=0)
    log_format: Literal["json", "text"] = "json"

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return _comma_list(self.api_keys)

    @property
    def image_domain_list(self) -> tuple[str, ...]:
        return tuple(d.lower().rstrip(".") for d in _comma_list(self.image_domains))
