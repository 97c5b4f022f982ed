"""Media for the sink: network URLs or inline bytes -> ``mxc://`` URIs on the homeserver."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING

from connectors.matrix.fetch import MediaError
from topics.records import NetworkMessage

if TYPE_CHECKING:
    from connectors.matrix.client import MatrixClient

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
