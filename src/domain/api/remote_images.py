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
            if not _is_public(ipaddress.ip_address(address.split("%")[0])):
                raise BadRequest(
                    f"{label}: the host {host!r} is not a public address; this server fetches "
                    "images from public hosts only"
                )


# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it: NAT64's well-known
# prefix (RFC 6052), IPv4-translated (SIIT, RFC 6145) and IPv4-compatible (deprecated). Python
# calls some of them global whatever IPv4 address they carry (and which, varies by version), so
# the IPv4 address they lead to is what is checked.
_LAST_32_BITS_IS_IPV4 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
# Local-use NAT64 (RFC 8215) translates into a site's own IPv4 network: never public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a public unicast address; for an IPv6 form that leads to an IPv4 address
    (IPv4-mapped, NAT64, SIIT, IPv4-compatible, 6to4), whether that IPv4 address is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        embedded = ip.ipv4_mapped if ip.ipv4_mapped is not None else ip.sixtofour
        if embedded is None and any(ip in network for network in _LAST_32_BITS_IS_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if embedded is not None:  # what it reaches is that IPv4 address (through a translator)
            return _is_public(embedded)
    return ip.is_global and not ip.is_multicast


def _shown(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
