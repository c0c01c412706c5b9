"""Controller settings: environment variables (`VILASERVE_CONTROLLER_*`) overridden by flags."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# FastChat's defaults; TinyChat and LLaVA expire after 30 s (their workers beat every 15 s).
FASTCHAT_HEART_BEAT_EXPIRATION_S = 90.0
FASTCHAT_WORKER_API_TIMEOUT_S = 100.0


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VILASERVE_CONTROLLER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 21001
    dispatch_method: Literal["lottery", "shortest_queue"] = "shortest_queue"
    # A worker whose last heartbeat is older than this is gone; keep it > 2x the workers'
    # heartbeat interval so that one lost heartbeat is forgiven.
    heart_beat_expiration: float = Field(FASTCHAT_HEART_BEAT_EXPIRATION_S, gt=0)
    # How long a proxied generation may wait for the worker's next frame.
    worker_api_timeout: float = Field(FASTCHAT_WORKER_API_TIMEOUT_S, gt=0)
    # Status polls (registration without a status, /refresh_all_workers).
    worker_status_timeout: float = Field(5.0, gt=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # a larger body gets 413
    # A body without pictures needs far less: a larger one gets 413 before it is parsed.
    max_text_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Slow clients: a request head must arrive whole within header_timeout_s, a body may not
    # pause longer than body_timeout_s, and beyond max_connections open ones new connections
    # are refused (503) unread.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(4096, ge=1)
    # Workers must send it (Authorization: Bearer) to register and heart-beat; unset: anyone
    # who reaches the controller may (FastChat's behaviour). Env: VILASERVE_REGISTRATION_SECRET.
    registration_secret: str | None = Field(
        None, validation_alias=AliasChoices("registration_secret", "VILASERVE_REGISTRATION_SECRET")
    )
    # The stack's internal token (env VILASERVE_INTERNAL_TOKEN; `vilaserve serve` makes one
    # when the API has keys): required from every caller but workers registering and heart-beating
    # (they show the registration secret); sent to the workers.
    internal_token: str | None = Field(
        None, validation_alias=AliasChoices("internal_token", "VILASERVE_INTERNAL_TOKEN")
    )
    # Extra names (comma-separated) the controller may be called by; bound to loopback it
    # answers only to this machine's names (no DNS rebinding); bound to all interfaces, to any.
    allowed_hosts: str = ""
    log_format: Literal["json", "text"] = "json"

    @property
    def expiry_check_interval_s(self) -> float:
        """A few sweeps per expiration: a dead worker is forgotten at most ~1/3 late (FastChat
        sweeps once per expiration, so up to 2x). Dispatch ignores expired workers anyway."""
        return max(self.heart_beat_expiration / 3, 0.05)
