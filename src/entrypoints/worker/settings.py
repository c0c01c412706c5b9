"""Worker settings: environment variables (`VILASERVE_*`) overridden by command-line flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vilaserve.domain.shared.generation import DEFAULT_MAX_NEW_TOKENS_CAP


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VILASERVE_", extra="ignore")

    model_path: str
    model_name: str | None = None
    model_type: str = "LLaMa"  # accepted for TinyChat compatibility; the checkpoint decides
    quant_path: str | None = None
    vision_tower: str | None = None  # LLaVA-1.5: local folder of its mm_vision_tower
    precision: Literal["W16A16", "W4A16"] = "W16A16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    conv_template: str | None = None
    # W4A16: the token embedding table in int8 with per-row scales (8) or as stored (16).
    embedding_bits: Literal[8, 16] = 8
    # The vision tower's linears in int8 weights x 7-bit activations (vision_w8a8.py), with the
    # smoothing factors `vilaserve quantize --smooth-vision-tower` wrote beside them.
    quantize_vision_tower: Literal["none", "w8a8"] = "none"

    host: str = "127.0.0.1"
    port: int = 21002
    worker_address: str | None = None
    controller_address: str = "http://localhost:21001"
    register_with_controller: bool = True
    multi_modal: bool | None = None  # None: multimodal when the checkpoint has a vision tower

    # Requests that run at once (FastChat's meaning): the engine's batch. `max_queue_length`
    # more may wait (pictures being encoded, prompts tokenized, queued for the batch); beyond
    # both, a request is refused at once. `max_num_seqs` (sequences per step) may only lower
    # the batch below `limit_model_concurrency`; the others wait, counted in the queue.
    limit_model_concurrency: int = Field(8, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)  # positions computed per step
    # While other sequences decode, a step's prompt chunk is sized to keep it within
    # `max_itl_slowdown` x a decode-only step, and at most `prefill_chunk` positions.
    prefill_chunk: int = Field(512, ge=1)
    max_itl_slowdown: float = Field(2.5, gt=1.0)
    kv_slots: int | None = Field(None, ge=1)  # KV-cache rows (default: 2 x max_num_seqs)
    max_model_len: int | None = Field(None, ge=2)  # positions per KV row (default: context)
    max_queue_length: int = Field(64, ge=0)
    stream_interval: int = Field(1, ge=1)
    max_new_tokens_cap: int = Field(DEFAULT_MAX_NEW_TOKENS_CAP, ge=1)
    max_images: int = Field(16, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_request_pixels: int = Field(256_000_000, ge=1)  # all images of one request
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # a larger body gets 413
    # A body without pictures needs far less: a larger one gets 413 before its text is read.
    max_text_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Longer prompts are refused before tokenizing (default: 32 x the model's context).
    max_prompt_chars: int | None = Field(None, ge=1)
    # Slow clients: a request head must arrive whole within header_timeout_s, a body may not
    # pause longer than body_timeout_s, and beyond max_connections open ones new connections
    # are refused (503) unread.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(4096, ge=1)
    image_cache_mb: int = Field(256, ge=0)  # projected embeddings of recent images; 0: off
    # CPU: run one compute thread fewer for each core other processes on the host take.
    adaptive_threads: bool = True

    # Sent to the controller on registration and heartbeats (Authorization: Bearer).
    registration_secret: str | None = None  # env: VILASERVE_REGISTRATION_SECRET
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: time in-flight requests get
    heartbeat_interval_s: float = Field(15.0, gt=0)
    heartbeat_retry_max_s: float = Field(30.0, gt=0)
    # The stack's internal token (env VILASERVE_INTERNAL_TOKEN; `vilaserve serve` makes one
    # when the API has keys): required on every route but /health.
    internal_token: str | None = None
    # Extra names (comma-separated) the worker may be called by; bound to loopback it answers
    # only to this machine's names and its --worker-address (no DNS rebinding).
    allowed_hosts: str = ""
    log_format: Literal["json", "text"] = "json"

    @property
    def running_sequences(self) -> int:
        """The engine's batch: `max_num_seqs`, but never more requests than
        `limit_model_concurrency` run at once."""
        return min(self.max_num_seqs or self.limit_model_concurrency, self.limit_model_concurrency)

    @property
    def max_requests(self) -> int:
        """Requests the worker holds at once, running and waiting; the next is refused."""
        return self.limit_model_concurrency + self.max_queue_length

    @property
    def cache_rows(self) -> int:
        # From --max-num-seqs as given: one above the limit still sizes the prefix cache.
        seqs = self.max_num_seqs or self.limit_model_concurrency
        return max(self.kv_slots or 2 * seqs, seqs)

    @property
    def advertised_address(self) -> str:
        if self.worker_address:
            return self.worker_address.rstrip("/")
        return f"http://localhost:{self.port}"
