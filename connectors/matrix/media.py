"""Media for the sink: network URLs or inline bytes -> ``mxc://`` URIs on the homeserver."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING

import aiohttp

from topics.records import NetworkMessage

if TYPE_CHECKING:
    from connectors.matrix.client import MatrixClient

MAX_MEDIA_BYTES = 100 * 1024 * 1024


class MediaError(ValueError):
    """A media URL that must not or cannot be fetched."""


async def fetch_url(
    session: aiohttp.ClientSession, url: str, max_bytes: int = MAX_MEDIA_BYTES
) -> tuple[bytes, str]:
    """Download network media from http(s) only (never file:// or others); no token sent."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"refusing to fetch media from a {scheme}: URL (only http/https)")
    delay = 0.5
    for attempt in range(5):
        try:
            async with session.get(url) as resp:
                if resp.status >= 500 and attempt < 4:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                if resp.status != 200:
                    raise MediaError(f"media URL answered HTTP {resp.status}")
                chunks = []
                total = 0
                async for chunk in resp.content.iter_chunked(65536):
                    total += len(chunk)
                    if total > max_bytes:
                        raise MediaError(f"media is larger than {max_bytes} bytes")
                    chunks.append(chunk)
                ctype = resp.headers.get("Content-Type", "application/octet-stream")
                return b"".join(chunks), ctype.split(";")[0].strip()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if attempt == 4:
                raise MediaError(f"cannot fetch media: {type(exc).__name__}") from None
            await asyncio.sleep(delay)
            delay *= 2
    raise MediaError("cannot fetch media")


async def media_uri(client: MatrixClient, url: str, slot: asyncio.Semaphore | None = None) -> str:
    """An avatar or attachment URL as an mxc URI (uploaded once fetched)."""
    if url.startswith("mxc://"):
        return url
    data, ctype = await client.fetch_url(url)
    return await client.upload(data, ctype, slot=slot)


async def upload_message_media(
    client: MatrixClient, msg: NetworkMessage, slot: asyncio.Semaphore | None = None
) -> tuple[str, int]:
    """Upload a media message's bytes; returns (mxc URI, size in bytes)."""
    c = msg.content
    if c.data is not None:
        try:
            data = base64.b64decode(c.data, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("media 'data' is not valid base64") from None
        ctype = c.mimetype or "application/octet-stream"
    else:
        assert c.url is not None
        if c.url.startswith("mxc://"):
            return c.url, c.size or 0
        data, fetched = await client.fetch_url(c.url)
        ctype = c.mimetype or fetched
    # The slot covers the upload only: fetching from the network is not the
    # homeserver's load.
    return await client.upload(data, ctype, c.filename, slot=slot), len(data)
