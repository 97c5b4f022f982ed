"""A thin Matrix Application Service client on one aiohttp session.

Why our own instead of ``mautrix``: the sink needs exactly a dozen endpoints,
full control of transaction ids and ``ts``, and a hook to settle in-doubt
sends before a retry (a retried txn id is not deduplicated after a homeserver
restart). That is less code here than bending a framework to it.

Retry policy (``request``):

* 429 ``M_LIMIT_EXCEEDED``: wait ``Retry-After`` (header, seconds) or
  ``retry_after_ms`` (body), capped at ``max_retry_delay``, and try again. The
  homeserver rejected the request before doing anything, so this is safe.
* 502/503/504, connection errors and timeouts: transient; capped exponential
  backoff with jitter, forever (nothing is dropped). Before each retry an
  optional ``settle`` callback can look up whether the first attempt landed.
* 500: retried a few times (a restarting homeserver), then permanent.
* other 4xx: ``MatrixError`` carrying ``errcode``/``error``, never retried.

The appservice token only travels in the ``Authorization`` header; every
message we build is scrubbed of it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL

from connectors.matrix.fetch import MediaError, MediaPolicy, fetch_url, media_session

log = logging.getLogger("backflow.sink.client")

CLIENT = "/_matrix/client/v3"
MEDIA_UPLOAD = "/_matrix/media/v3/upload"
MEDIA_DOWNLOAD = "/_matrix/client/v1/media/download"
_TRANSIENT_STATUS = frozenset({502, 503, 504, 408})
MAX_500_RETRIES = 5

Settle = Callable[[], Awaitable[dict[str, Any] | None]]


class MatrixError(Exception):
    """A permanent homeserver error for one request (4xx other than 429)."""

    def __init__(self, status: int, errcode: str, error: str, method: str, path: str) -> None:
        self.status = status
        self.errcode = errcode
        self.error = error
        self.method = method
        self.path = path
        super().__init__(f"{method} {path}: HTTP {status} {errcode}: {error}")


class MatrixUnreachable(Exception):
    """The homeserver does not answer at all (used for startup checks)."""


def q(segment: str) -> str:
    """Percent-encode one path segment (room ids, aliases, event ids ...)."""
    return quote(segment, safe="")


class MatrixClient:
    """Async appservice client. Use ``async with`` or call ``close()``."""

    def __init__(
        self,
        base_url: str,
        as_token: str,
        server_name: str,
        sender_localpart: str,
        *,
        max_retry_delay: float = 600.0,
        timeout: float = 120.0,
        connections: int = 100,
        media_policy: MediaPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = as_token
        self.server_name = server_name
        self.bot = f"@{sender_localpart}:{server_name}"
        self.max_retry_delay = max_retry_delay
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )
        self.stats = {"requests": 0, "rate_limited": 0, "transient": 0}
        # Network media gets its own session: its resolver refuses non-public
        # addresses, which the homeserver (often on localhost) must not be.
        self.media_policy = media_policy or MediaPolicy()
        self._media: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> MatrixClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()
        if self._media is not None:
            await self._media.close()

    def scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def __repr__(self) -> str:
        return f"MatrixClient({self.base_url!r}, bot={self.bot!r})"

    # ------------------------------------------------------------ transport

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        as_user: str | None = None,
        settle: Settle | None = None,
        retry_transient: bool = True,
        slot: asyncio.Semaphore | None = None,
    ) -> dict[str, Any]:
        """One API call with the retry policy described in the module docstring.

        ``slot`` (the sink's per-room concurrency semaphore) is held only while
        an attempt is on the wire: waiting out a 429 or a backoff gives it back,
        so a rate-limited room does not keep another room from sending.
        """
        query = dict(params or {})
        if as_user is not None and as_user != self.bot:
            query["user_id"] = as_user
        url = self.base_url + path + (("?" + urlencode(query)) if query else "")
        headers = {"Authorization": f"Bearer {self._token}"}
        body: bytes | None = data
        if json is not None:
            body = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        elif content_type:
            headers["Content-Type"] = content_type
        attempt = 0
        errors_500 = 0
        while True:
            self.stats["requests"] += 1
            problem: str
            wait: float | None = None
            try:
                async with slot or nullcontext(), self._session.request(
                    method, URL(url, encoded=True), data=body, headers=headers
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    if 200 <= status < 300:
                        return orjson.loads(raw) if raw else {}
                    payload = _json_object(raw)
                    errcode = str(payload.get("errcode", "M_UNKNOWN"))
                    error = self.scrub(
                        str(payload.get("error", raw[:200].decode("utf-8", "replace")))
                    )
                    if status == 429:
                        self.stats["rate_limited"] += 1
                        delay = _retry_after(resp.headers.get("Retry-After"), payload)
                        delay = min(delay, self.max_retry_delay)
                        log.debug("429 on %s %s, waiting %.2fs", method, path, delay)
                        wait = delay
                    elif status in _TRANSIENT_STATUS or (
                        status >= 500 and errors_500 < MAX_500_RETRIES
                    ):
                        if status not in _TRANSIENT_STATUS:
                            errors_500 += 1
                        problem = f"HTTP {status} {errcode}: {error}"
                    else:
                        raise MatrixError(status, errcode, error, method, path)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                problem = self.scrub(f"{type(exc).__name__}: {exc}")
            if wait is not None:
                await asyncio.sleep(wait)  # outside the slot
                continue  # rejected before any effect: safe to repeat
            # Transient failure: the request may or may not have taken effect.
            self.stats["transient"] += 1
            if not retry_transient:
                raise MatrixUnreachable(f"{method} {path}: {problem}")
            delay = min(self.max_retry_delay, 0.25 * 2**attempt) * random.uniform(0.8, 1.2)
            attempt += 1
            log.warning(
                "%s %s failed (%s); retry %d in %.1fs", method, path, problem, attempt, delay
            )
            await asyncio.sleep(delay)
            if settle is not None:
                found = await settle()
                if found is not None:
                    return found

    # ------------------------------------------------------------ endpoints

    async def versions(self) -> dict[str, Any]:
        """Check that the homeserver answers and accepts our token (one attempt)."""
        await self.request("GET", "/_matrix/client/versions", retry_transient=False)
        return await self.request("GET", f"{CLIENT}/account/whoami", retry_transient=False)

    async def register(self, localpart: str) -> bool:
        """Register a ghost; False when it already existed (``M_USER_IN_USE``)."""
        try:
            await self.request(
                "POST",
                f"{CLIENT}/register",
                json={
                    "type": "m.login.application_service",
                    "username": localpart,
                    "inhibit_login": True,
                },
            )
            return True
        except MatrixError as exc:
            if exc.errcode == "M_USER_IN_USE":
                return False
            raise

    async def set_displayname(self, user_id: str, name: str) -> None:
        await self.request(
            "PUT",
            f"{CLIENT}/profile/{q(user_id)}/displayname",
            json={"displayname": name},
            as_user=user_id,
        )

    async def set_avatar(self, user_id: str, mxc: str) -> None:
        await self.request(
            "PUT",
            f"{CLIENT}/profile/{q(user_id)}/avatar_url",
            json={"avatar_url": mxc},
            as_user=user_id,
        )

    async def resolve_alias(self, alias: str) -> str | None:
        try:
            data = await self.request("GET", f"{CLIENT}/directory/room/{q(alias)}")
        except MatrixError as exc:
            if exc.errcode == "M_NOT_FOUND" or exc.status == 404:
                return None
            raise
        return str(data["room_id"])

    async def create_room(
        self,
        alias_localpart: str,
        *,
        name: str | None = None,
        topic: str | None = None,
        invite: list[str] | None = None,
        avatar_mxc: str | None = None,
    ) -> tuple[str, bool]:
        """(room id, created). The alias is the idempotency key: a second call finds the room."""
        alias = f"#{alias_localpart}:{self.server_name}"
        body: dict[str, Any] = {
            "room_alias_name": alias_localpart,
            "preset": "private_chat",
            "visibility": "private",
            "invite": invite or [],
        }
        if name:
            body["name"] = name
        if topic:
            body["topic"] = topic
        if avatar_mxc:
            body["initial_state"] = [
                {"type": "m.room.avatar", "state_key": "", "content": {"url": avatar_mxc}}
            ]

        async def settle() -> dict[str, Any] | None:
            room = await self.resolve_alias(alias)
            return {"room_id": room, "_existing": True} if room else None

        try:
            data = await self.request("POST", f"{CLIENT}/createRoom", json=body, settle=settle)
        except MatrixError as exc:
            if exc.errcode != "M_ROOM_IN_USE":
                raise
            room = await self.resolve_alias(alias)
            if room is None:
                raise
            return room, False
        return str(data["room_id"]), not data.get("_existing", False)

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request("POST", f"{CLIENT}/rooms/{q(room_id)}/invite", json={"user_id": user_id})

    async def join(self, room_id: str, user_id: str) -> None:
        await self.request("POST", f"{CLIENT}/join/{q(room_id)}", json={}, as_user=user_id)

    async def joined_members(self, room_id: str) -> set[str]:
        data = await self.request("GET", f"{CLIENT}/rooms/{q(room_id)}/joined_members")
        return set((data.get("joined") or {}).keys())

    async def send(
        self,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        txn_id: str,
        *,
        as_user: str | None = None,
        ts: int | None = None,
        settle: Settle | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Send one event with a stable txn id and a massaged timestamp; returns its id."""
        params: dict[str, Any] = {}
        if ts is not None:
            params["ts"] = ts
        data = await self.request(
            "PUT",
            f"{CLIENT}/rooms/{q(room_id)}/send/{q(event_type)}/{q(txn_id)}",
            params=params,
            json=content,
            as_user=as_user,
            settle=settle,
            slot=slot,
        )
        return str(data["event_id"])

    async def redact(
        self,
        room_id: str,
        event_id: str,
        txn_id: str,
        content: dict[str, Any],
        *,
        as_user: str | None = None,
        settle: Settle | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Redact an event. The endpoint takes no ``ts``: redactions carry the current time."""
        data = await self.request(
            "PUT",
            f"{CLIENT}/rooms/{q(room_id)}/redact/{q(event_id)}/{q(txn_id)}",
            json=content,
            as_user=as_user,
            settle=settle,
            slot=slot,
        )
        return str(data["event_id"])

    async def upload(
        self,
        data: bytes,
        content_type: str,
        filename: str | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Upload to the media repository; returns the ``mxc://`` URI."""
        params = {"filename": filename} if filename else None
        result = await self.request(
            "POST", MEDIA_UPLOAD, params=params, data=data, content_type=content_type, slot=slot
        )
        return str(result["content_uri"])

    async def download(self, mxc: str) -> bytes:
        """Fetch media back from the homeserver (authenticated media endpoint)."""
        if not mxc.startswith("mxc://"):
            raise MediaError(f"not an mxc URI: {mxc!r}")
        server, _, media_id = mxc[len("mxc://") :].partition("/")
        url = f"{self.base_url}{MEDIA_DOWNLOAD}/{q(server)}/{q(media_id)}"
        headers = {"Authorization": f"Bearer {self._token}"}
        async with self._session.get(URL(url, encoded=True), headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                payload = _json_object(raw)
                raise MatrixError(
                    resp.status,
                    str(payload.get("errcode", "M_UNKNOWN")),
                    self.scrub(str(payload.get("error", ""))),
                    "GET",
                    MEDIA_DOWNLOAD,
                )
            return raw

    async def fetch_url(self, url: str) -> tuple[bytes, str]:
        """Download network media under ``media_policy`` (see ``fetch.fetch_url``); no token."""
        if self._media is None:
            self._media = media_session(self.media_policy)
        return await fetch_url(self._media, url, self.media_policy)

    async def messages(
        self,
        room_id: str,
        *,
        direction: str = "b",
        start: str | None = None,
        limit: int = 100,
        as_user: str | None = None,
        filter: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"dir": direction, "limit": limit}
        if start:
            params["from"] = start
        if filter:
            params["filter"] = orjson.dumps(filter).decode()
        return await self.request(
            "GET", f"{CLIENT}/rooms/{q(room_id)}/messages", params=params, as_user=as_user
        )

    async def timeline(
        self, room_id: str, *, as_user: str | None = None, types: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Every event of a room, oldest first (paginates /messages forwards)."""
        events: list[dict[str, Any]] = []
        token: str | None = None
        flt = {"types": types} if types else None
        while True:
            page = await self.messages(
                room_id, direction="f", start=token, limit=500, as_user=as_user, filter=flt
            )
            chunk = page.get("chunk") or []
            events.extend(chunk)
            token = page.get("end")
            if not chunk or not token:
                return events


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _retry_after(header: str | None, payload: dict[str, Any]) -> float:
    """Seconds to wait after a 429: Retry-After header first, then retry_after_ms."""
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
    ms = payload.get("retry_after_ms")
    if isinstance(ms, int | float) and not isinstance(ms, bool):
        return max(0.0, ms / 1000)
    return 1.0
