"""Fetching images given as http(s) URLs: allow-listed hosts, public addresses only (checked
after DNS resolution), a time limit, a size cap.

Redirects are followed by hand so that every hop is checked again (a permitted host must not
bounce the server to an internal address). Not covered: a name that resolves differently
between the check and the connection (DNS rebinding); `--image-domains` closes that too.
"""

from __future__ import annotations

import asyncio

import httpx

from vilaserve.domain.api.errors import BadRequest, PayloadTooLarge
from vilaserve.domain.api.ports import FetchedImage, ImageFetcher
from vilaserve.domain.api.remote_images import RemoteImagePolicy

_REDIRECTS = {301, 302, 303, 307, 308}


class HttpImageFetcher(ImageFetcher):
    def __init__(self, policy: RemoteImagePolicy) -> None:
        self._policy = policy
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(policy.timeout_s), follow_redirects=False
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> FetchedImage:
        try:
            return await asyncio.wait_for(self._fetch(url), self._policy.timeout_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise BadRequest(
                f"fetching the image at {url!r:.120} took longer than {self._policy.timeout_s:g} s"
            ) from None

    async def _fetch(self, url: str) -> FetchedImage:
        current = url
        for _ in range(self._policy.max_redirects + 1):
            self._policy.check(current, "image URL")
            await self._check_resolved(current)
            try:
                async with self._client.stream("GET", current) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        current = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise BadRequest(
                            f"the image at {current!r:.120} could not be fetched "
                            f"(HTTP {response.status_code})"
                        )
                    return await self._read(response, current)
            except httpx.HTTPError as exc:
                # One message whatever failed: which error it was would tell a client what
                # listens (or not) behind that address.
                raise BadRequest(f"the image at {current!r:.120} could not be fetched") from exc
        raise BadRequest(
            f"the image at {url!r:.120} redirects more than {self._policy.max_redirects} times"
        )

    async def _check_resolved(self, url: str) -> None:
        parsed = httpx.URL(url)
        host = parsed.host
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parsed.port or (443 if parsed.scheme == "https" else 80)
            )
        except OSError as exc:
            raise BadRequest(f"the image at {url!r:.120} could not be fetched") from exc
        self._policy.check_addresses(host, [str(info[4][0]) for info in infos], "image URL")

    async def _read(self, response: httpx.Response, url: str) -> FetchedImage:
        media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise BadRequest(f"the URL {url!r:.120} is {media_type!r}, not an image")
        limit = self._policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the image at {url!r:.120} is larger than {limit} bytes")
        data = bytearray()
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > limit:
                raise PayloadTooLarge(f"the image at {url!r:.120} is larger than {limit} bytes")
        if not data:
            raise BadRequest(f"the image at {url!r:.120} is empty")
        return FetchedImage(bytes(data), media_type or "image/png")
