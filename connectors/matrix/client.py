"""The sink's Matrix client: mautrix's appservice API, one method per endpoint it uses.

mautrix (the mautrix bridges' own library) builds every request: the bot's and
each ghost's ``IntentAPI``, typed paths, ``ts`` massaging, its typed errors
(``mautrix.errors``). Every method runs through ``Calls.call`` (calls.py), the
retry policy that keeps sends exactly-once. Transaction ids are the caller's
(deterministic per message part) for sends and redactions alike.

Reading rooms back (``timeline``) returns the events as plain JSON: callers
compare bodies and keys, and mautrix's event classes would only convert them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson
from mautrix.api import Method, Path
from mautrix.appservice import AppServiceAPI, IntentAPI
from mautrix.errors import (
    MatrixRequestError,
    MForbidden,
    MNotFound,
    MRoomInUse,
    MUserInUse,
    make_request_error,
)
from mautrix.types import (
    EventType,
    RoomCreatePreset,
    RoomDirectoryVisibility,
    Serializable,
)

from connectors.matrix.calls import (
    MAX_500_RETRIES,
    Calls,
    MatrixUnreachable,
    Settle,
    describe,
    trace_config,
)
from connectors.matrix.fetch import MediaError, MediaPolicy, fetch_url, media_session
from connectors.matrix.state_store import BoundedStateStore

log = logging.getLogger("backflow.sink.client")

__all__ = [
    "MAX_500_RETRIES",
    "MatrixClient",
    "MatrixRequestError",
    "MatrixUnreachable",
    "MForbidden",
    "describe",
]

INTENT_CACHE = 4096  # ghost intents kept ready; each holds a few dozen bound wrappers


class MatrixClient(Calls):
    """Async appservice client. Use ``async with`` or call ``close()``."""

    def __init__(
        self,
        base_url: str,
        as_token: str,
        server_name: str,
        sender_localpart: str,
        *,
        max_retry_delay: float = 600.0,
        give_up_after: float = 600.0,
        timeout: float = 120.0,
        connections: int = 100,
        media_policy: MediaPolicy | None = None,
    ) -> None:
        super().__init__(as_token, max_retry_delay, give_up_after)
        self.base_url = base_url.rstrip("/")
        self.server_name = server_name
        self.bot = f"@{sender_localpart}:{server_name}"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=timeout),
            trace_configs=[trace_config()],
        )
        self._api = AppServiceAPI(
            self.base_url,
            bot_mxid=self.bot,
            token=as_token,
            log=logging.getLogger("backflow.sink.mautrix"),
            state_store=BoundedStateStore(),
            client_session=self._session,
            default_retry_count=0,
        )
        self._intents: OrderedDict[str, IntentAPI] = OrderedDict()
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

    def __repr__(self) -> str:
        return f"MatrixClient({self.base_url!r}, bot={self.bot!r})"

    def intent(self, user_id: str | None = None) -> IntentAPI:
        """The bot's intent, or a ghost's (``user_id`` query parameter), kept in a bounded cache."""
        if user_id is None or user_id == self.bot:
            return self._api.bot_intent()
        found = self._intents.get(user_id)
        if found is None:
            found = self._api.intent(user_id)
            self._intents[user_id] = found
            if len(self._intents) > INTENT_CACHE:
                evicted, _ = self._intents.popitem(last=False)
                self._api.children.pop(evicted, None)  # mautrix keeps one API per user
        else:
            self._intents.move_to_end(user_id)
        return found

    # ------------------------------------------------------------ endpoints

    async def versions(self) -> dict[str, Any]:
        """Check that the homeserver answers and accepts our token (one attempt)."""
        bot = self.intent()
        await self.call("versions", lambda: bot.versions(no_cache=True), retry_transient=False)
        who = await self.call("whoami", bot.whoami, retry_transient=False)
        return {"user_id": who.user_id}

    async def register(self, localpart: str) -> bool:
        """Register a ghost; False when it already existed (``M_USER_IN_USE``)."""
        body = {"type": "m.login.application_service", "username": localpart}
        body["inhibit_login"] = True  # type: ignore[assignment]
        api = self._api
        try:
            await self.call("register", lambda: api.request(Method.POST, Path.v3.register, body))
        except MUserInUse:
            registered = False
        else:
            registered = True
        # Tell mautrix, so its intent does not try again on the first call.
        await api.state_store.registered(f"@{localpart}:{self.server_name}")
        return registered

    async def registered(self, user_id: str) -> None:
        """Tell mautrix a ghost exists (our store knew), so its intent does not register it."""
        await self._api.state_store.registered(user_id)

    async def set_displayname(self, user_id: str, name: str) -> None:
        ghost = self.intent(user_id)
        await self.call("set displayname", lambda: ghost.set_displayname(name, check_current=False))

    async def set_avatar(self, user_id: str, mxc: str) -> None:
        ghost = self.intent(user_id)
        await self.call("set avatar", lambda: ghost.set_avatar_url(mxc, check_current=False))

    async def resolve_alias(self, alias: str) -> str | None:
        bot = self.intent()
        try:
            info = await self.call("resolve alias", lambda: bot.resolve_room_alias(alias))
        except MNotFound:
            return None
        return str(info.room_id)

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
        state = []
        if avatar_mxc:
            state.append({"type": "m.room.avatar", "state_key": "", "content": {"url": avatar_mxc}})
        bot = self.intent()
        existing = False

        async def make() -> str:
            return await bot.create_room(
                alias_localpart=alias_localpart,
                visibility=RoomDirectoryVisibility.PRIVATE,
                preset=RoomCreatePreset.PRIVATE,
                name=name,
                topic=topic,
                invitees=list(invite or []),
                initial_state=state,  # a list: mautrix iterates it after the call
            )

        async def settle() -> str | None:
            nonlocal existing
            room = await self.resolve_alias(alias)
            existing = room is not None
            return room

        try:
            room_id = str(await self.call("create room", make, settle=settle))
        except MRoomInUse:
            room = await self.resolve_alias(alias)
            if room is None:
                raise
            room_id, existing = room, True
        # The bot made the room, so it is in it: its intent need not join first.
        await self._api.state_store.joined(room_id, self.bot)
        return room_id, not existing

    async def set_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        """Set a room state event as the bot (a PUT: the same call again changes nothing)."""
        bot = self.intent()
        kind = EventType.find(event_type, t_class=EventType.Class.STATE)
        eid = await self.call(
            f"set {event_type}",
            lambda: bot.send_state_event(
                room_id, kind, content, state_key=state_key, ensure_joined=False
            ),
        )
        return str(eid)

    async def put_alias(self, alias_localpart: str, room_id: str) -> None:
        """Point the alias at ``room_id``, taking it from any room it pointed at before."""
        bot = self.intent()
        await self.call(
            "put alias", lambda: bot.add_room_alias(room_id, alias_localpart, override=True)
        )

    async def delete_alias(self, alias_localpart: str) -> None:
        """Remove the alias; one that does not exist is fine."""
        bot = self.intent()
        await self.call("delete alias", lambda: bot.remove_room_alias(alias_localpart))

    async def invite(self, room_id: str, user_id: str) -> None:
        bot = self.intent()
        await self.call("invite", lambda: bot.invite_user(room_id, user_id, ensure_joined=False))

    async def join(self, room_id: str, user_id: str) -> None:
        ghost = self.intent(user_id)
        await self.call("join", lambda: ghost.join_room_by_id(room_id))
        await self._api.state_store.joined(room_id, user_id)

    async def joined_members(self, room_id: str) -> set[str]:
        bot = self.intent()
        members = await self.call(
            "joined members", lambda: bot.get_joined_members(room_id, ensure_joined=False)
        )
        return set(members)

    async def send(
        self,
        room_id: str,
        event_type: str,
        content: dict[str, Any] | Serializable,
        txn_id: str,
        *,
        as_user: str | None = None,
        ts: int | None = None,
        settle: Settle[str] | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Send one event with a stable txn id and a massaged timestamp; returns its id."""
        sender = self.intent(as_user)
        kind = EventType.find(event_type, t_class=EventType.Class.MESSAGE)
        eid = await self.call(
            f"send {event_type}",
            lambda: sender.send_message_event(
                room_id, kind, content, txn_id=txn_id, timestamp=ts, ensure_joined=False
            ),
            settle=settle,
            slot=slot,
        )
        return str(eid)

    async def redact(
        self,
        room_id: str,
        event_id: str,
        txn_id: str,
        content: dict[str, Any],
        *,
        as_user: str | None = None,
        settle: Settle[str] | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Redact an event. The endpoint takes no ``ts``: redactions carry the current time.

        mautrix's ``IntentAPI.redact`` draws a random txn id, so the request is
        built on its API with our deterministic one.
        """
        api = self.intent(as_user).api
        path = Path.v3.rooms[room_id].redact[event_id][txn_id]

        async def make() -> str:
            answer = await api.request(Method.PUT, path, dict(content))
            return str(answer["event_id"])

        return await self.call("redact", make, settle=settle, slot=slot)

    async def upload(
        self,
        data: bytes,
        content_type: str,
        filename: str | None = None,
        slot: asyncio.Semaphore | None = None,
    ) -> str:
        """Upload to the media repository; returns the ``mxc://`` URI."""
        bot = self.intent()
        uri = await self.call(
            "upload",
            lambda: bot.upload_media(data, mime_type=content_type, filename=filename),
            slot=slot,
        )
        return str(uri)

    async def download(self, mxc: str) -> bytes:
        """Fetch media back from the homeserver (authenticated media endpoint)."""
        if not mxc.startswith("mxc://"):
            raise MediaError(f"not an mxc URI: {mxc!r}")
        bot = self.intent()
        try:
            return await self.call("download", lambda: bot.download_media(mxc))
        except aiohttp.ClientResponseError as exc:
            raise make_request_error(exc.status, "", "M_UNKNOWN", self.scrub(exc.message)) from None

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
        """One page of ``/messages`` as plain JSON."""
        params: dict[str, Any] = {"dir": direction, "limit": str(limit)}
        if start:
            params["from"] = start
        if filter:
            params["filter"] = orjson.dumps(filter).decode()
        api = self.intent(as_user).api
        path = Path.v3.rooms[room_id].messages
        return await self.call(
            "read messages", lambda: api.request(Method.GET, path, query_params=params)
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

    async def get(self, *segments: str, as_user: str | None = None) -> dict[str, Any]:
        """A GET under ``/_matrix/client/v3``, each segment quoted (reading state back)."""
        path = Path.v3
        for segment in segments:
            path = path[segment]
        api = self.intent(as_user).api
        return await self.call("get", lambda: api.request(Method.GET, path))
