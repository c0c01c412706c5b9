"""Image payloads as clients send them: raw base64 (LLaVA, TinyChat) or data URLs (OpenAI)."""

from __future__ import annotations

import base64
import binascii

from vilaserve.domain.shared.errors import InvalidImage

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


def decode_image_payload(
    payload: str, index: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> bytes:
    """The image file bytes of one payload; `index` (0-based) names it in errors."""
    label = f"image {index + 1}"
    data = payload.strip()
    if data.startswith(("http://", "https://")):
        raise InvalidImage(
            f"{label} is a URL; the worker takes base64 image data, not URLs to fetch"
        )
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImage(f"{label} is a data URL without ';base64,' data")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InvalidImage(f"{label} is larger than the limit of {max_bytes} bytes")
    compact = "".join(data.split())
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"{label} is not valid base64 ({exc})") from exc
    if not raw:
        raise InvalidImage(f"{label} is empty")
    return raw
