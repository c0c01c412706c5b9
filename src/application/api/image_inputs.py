"""The images of a chat request as the worker takes them: data URLs.

Data URLs pass through after a cheap shape and size check (the worker decodes and verifies
them); http(s) URLs are fetched only when the server allows remote images, within its policy.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

from vilaserve.domain.api.errors import BadRequest, PayloadTooLarge
from vilaserve.domain.api.ports import ImageFetcher

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # the worker's own default limit


class ImageResolver:
    def __init__(
        self, fetcher: ImageFetcher | None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    ) -> None:
        self._fetcher = fetcher
        self._max_bytes = max_image_bytes

    async def resolve(self, urls: Sequence[str]) -> tuple[str, ...]:
        return tuple(await asyncio.gather(*(self._one(u, i) for i, u in enumerate(urls))))

    async def _one(self, url: str, index: int) -> str:
        label = f"image {index + 1}"
        head = url[:16].lower()
        if head.startswith("data:"):
            return self._checked_data_url(url, label)
        if head.startswith(("http://", "https://")):
            if self._fetcher is None:
                raise BadRequest(
                    f"{label} is an http(s) URL, but this server does not fetch remote images "
                    "(start it with --allow-remote-images); send a data URL "
                    "(data:image/png;base64,...) instead"
                )
            image = await self._fetcher.fetch(url)
            if len(image.data) > self._max_bytes:
                raise PayloadTooLarge(f"{label} is larger than {self._max_bytes} bytes")
            encoded = base64.b64encode(image.data).decode("ascii")
            return f"data:{image.media_type};base64,{encoded}"
        raise BadRequest(
            f"{label}: image_url must be a data URL (data:image/png;base64,...) or an http(s) URL"
        )

    def _checked_data_url(self, url: str, label: str) -> str:
        header, sep, data = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise BadRequest(f"{label}: a data URL must carry base64 data ('...;base64,')")
        media_type = header[5:].split(";")[0].lower()
        if media_type and not media_type.startswith("image/"):
            raise BadRequest(f"{label}: the data URL holds {media_type!r}, not an image")
        if len(data) * 3 // 4 > self._max_bytes:
            raise PayloadTooLarge(f"{label} is larger than {self._max_bytes} bytes")
        return url
