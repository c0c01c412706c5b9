"""Which http(s) image URLs the API may fetch: a domain allow-list, public addresses only, a
time limit, a size cap."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
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
    # Loopback, private, link-local (cloud metadata at 169.254.169.254 included) and other
    # non-public addresses are refused unless this is on: the server must not fetch for a
    # client what only the server can reach.
    allow_private: bool = False

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

    def check_addresses(self, host: str, addresses: Sequence[str], label: str) -> None:
        """Raises `BadRequest` when `host` resolved to any non-public address (checked after
        DNS resolution, at every redirect). The message does not say what is there."""
        if self.allow_private:
            return
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                raise BadRequest(
                    f"{label}: the host {host!r} is not a public address; this server fetches "
                    "images from public hosts only"
                )


def _shown(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
