"""Which http(s) image URLs the API may fetch: a domain allow-list, a time limit, a size cap."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from vilaserve.domain.api.errors import BadRequest

DEFAULT_FETCH_TIMEOUT_S = 5.0  # vLLM's VLLM_IMAGE_FETCH_TIMEOUT
DEFAULT_MAX_REMOTE_IMAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class RemoteImagePolicy:
    """`domains` empty means any host; an entry also admits its subdomains."""

    domains: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_REMOTE_IMAGE_BYTES
    max_redirects: int = 3

    @classmethod
    def from_list(cls, domains: str, **limits: float) -> RemoteImagePolicy:
        names = tuple(d.strip().lower().rstrip(".") for d in domains.split(",") if d.strip())
        return cls(domains=names, **limits)  # type: ignore[arg-type]

    def check(self, url: str, label: str) -> None:
        """Raises `BadRequest` unless `url` is an http(s) URL on an allowed host."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"{label}: {_shown(url)} is not an http(s) URL with a host")
        host = parts.hostname.lower().rstrip(".")
        if self.domains and not any(host == d or host.endswith("." + d) for d in self.domains):
            raise BadRequest(
                f"{label}: the host {host!r} is not in this server's image domain allow-list"
            )


def _shown(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
