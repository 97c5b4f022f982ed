"""Portal rooms: find or create the room, keep ghosts joined, announce RoomCreated.

A rebuild (``CreateRoom.rebuild``, from ``backflow replay --mode rebuild``)
gives a portal a fresh room: it is created under a temporary alias (the
idempotency key, as the portal alias is for a first room) and becomes the
portal's room, so the sends after the command fill it. ``finish_rebuild``
then sends ``m.room.tombstone`` into the old room, moves the portal's alias
to the new one and drops the temporary alias. Every step is idempotent, so a
rebuild interrupted anywhere resumes when its commands are applied again.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer

from connectors.matrix.client import MatrixClient, MatrixRequestError, MForbidden
from connectors.matrix.fetch import MediaError
from connectors.matrix.ghosts import Ghosts, alias_localpart
from connectors.matrix.media import media_uri
from connectors.matrix.queues import PortalQueue, RoomState
from connectors.matrix.settle import settle_startup
from connectors.matrix.stats import SinkStats
from connectors.matrix.store import SinkStore
from topics import bus
from topics.logs import fields
from topics.records import CreateRoom, RoomCreated

log = logging.getLogger("backflow.sink")

TOMBSTONE_BODY = "This room has been rebuilt: its history continues in a new room."


class RebuildRefused(Exception):
    """A rebuild command the sink cannot apply (dead-lettered: it is permanent)."""


class Rooms:
    """Everything about a portal's room except its messages."""

    def __init__(
        self,
        client: MatrixClient,
        store: SinkStore,
        ghosts: Ghosts,
        stats: SinkStats,
        producer: AIOKafkaProducer,
        portal_events: str,
        alias_prefix: str,
        alias_templates: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.ghosts = ghosts
        self.stats = stats
        self.producer = producer
        self.portal_events = portal_events
        self.alias_prefix = alias_prefix
        self.alias_templates = alias_templates or {}
        self.server = client.server_name

    async def ensure_member(self, room: RoomState, user_id: str) -> None:
        """Make sure ``user_id`` is joined before it speaks (invite if needed)."""
        if room.joined is None:
            room.joined = await self.client.joined_members(room.room_id)
        if user_id in room.joined:
            return
        try:
            await self.client.join(room.room_id, user_id)
        except MForbidden:
            try:
                await self.client.invite(room.room_id, user_id)
            except MForbidden as inv:
                if "already" not in (inv.message or ""):  # "already in the room" is fine
                    raise
            await self.client.join(room.room_id, user_id)
        room.joined.add(user_id)

    async def state(self, portal: PortalQueue, network: str, portal_id: str) -> RoomState:
        """The portal's room, loaded from the store (or created if it never was)."""
        if portal.room is None:
            room_id = await self.store.room(portal.key)
            if room_id is None:
                # A send before its CreateRoom (should not happen): make the room
                # rather than lose the message.
                await self.create(portal, CreateRoom(network=network, portal=portal_id))
                assert portal.room is not None
                return portal.room
            alias = alias_localpart(
                self.alias_prefix, network, portal_id, self.server, self.alias_templates
            )
            portal.room = RoomState(room_id, f"#{alias}:{self.server}")
            portal.room.last_event = await self.store.newest_event(room_id)
        return portal.room

    async def _avatar(self, cmd: CreateRoom) -> str | None:
        if not cmd.avatar_url:
            return None
        try:
            return await media_uri(self.client, cmd.avatar_url)
        except (MediaError, MatrixRequestError) as exc:
            log.warning("room avatar for %s not set: %s", cmd.key, exc, extra=fields(cmd.key))
            return None

    async def create(self, portal: PortalQueue, cmd: CreateRoom) -> None:
        """Find or create the room (the alias is the idempotency key), join members."""
        if cmd.finish_rebuild is not None:
            await self.finish_rebuild(portal, cmd, cmd.finish_rebuild)
            return
        if cmd.rebuild is not None:
            await self.start_rebuild(portal, cmd, cmd.rebuild)
            return
        key = cmd.key
        ghosts, local, alias = await self._members_and_alias(cmd)
        room_id = await self.store.room(key)
        if room_id is None:
            avatar = await self._avatar(cmd)
            room_id, created = await self.client.create_room(
                local, name=cmd.name, topic=cmd.topic, invite=ghosts, avatar_mxc=avatar
            )
            await self.store.save_room(key, cmd.network, cmd.portal, room_id, alias)
            if created:
                self.stats.rooms_created += 1
                log.info(
                    "portal %s: created room %s (%s)",
                    key,
                    room_id,
                    alias,
                    extra=fields(key, room=room_id),
                )
            else:
                self.stats.rooms_found += 1
                log.info(
                    "portal %s: found existing room %s (%s)",
                    key,
                    room_id,
                    alias,
                    extra=fields(key, room=room_id),
                )
        else:
            self.stats.rooms_found += 1
        room = portal.room
        if room is None or room.room_id != room_id:
            room = portal.room = RoomState(room_id, alias)
            room.last_event = await self.store.newest_event(room_id)
        # Members join now, before any of them speaks (joins take no ts).
        for ghost in ghosts:
            await self.ensure_member(room, ghost)
        await settle_startup(self.client, self.store, self.stats, portal.key, room)
        last_ts = await self.store.last_bridged_ts(room_id, key)
        event = RoomCreated(
            network=cmd.network,
            portal=cmd.portal,
            room_id=room_id,
            alias=alias,
            last_bridged_ts=last_ts,
        )
        future = await bus.send(self.producer, self.portal_events, event)
        await future

    # ------------------------------------------------------------ rebuilds

    def _rebuild_alias(self, cmd: CreateRoom, name: str) -> str:
        """The new room's temporary alias localpart while its history goes in."""
        return alias_localpart(
            self.alias_prefix,
            cmd.network,
            f"{cmd.portal}/rebuild-{name}",
            self.server,
            self.alias_templates,
        )

    async def _members_and_alias(self, cmd: CreateRoom) -> tuple[list[str], str, str]:
        """The portal's member ghosts (registered, profiles set), its alias localpart and alias."""
        ghosts = [
            await self.ghosts.ensure(cmd.network, m.id, m.name, m.avatar_url)
            for m in cmd.members
        ]
        local = alias_localpart(
            self.alias_prefix, cmd.network, cmd.portal, self.server, self.alias_templates
        )
        return ghosts, local, f"#{local}:{self.server}"

    async def start_rebuild(self, portal: PortalQueue, cmd: CreateRoom, name: str) -> None:
        """Give the portal a fresh room (or find the one this rebuild made before)."""
        key = cmd.key
        ghosts, local, alias = await self._members_and_alias(cmd)
        row = await self.store.rebuild(key, name)
        if row is not None and row["new_room"] is not None:
            room_id = row["new_room"]  # applied before (redelivered, or resumed)
        else:
            old = row["old_room"] if row is not None else await self.store.room(key)
            if old is None:
                raise RebuildRefused(f"portal {key} has no room to rebuild")
            await self.store.start_rebuild(key, name, old)
            room_id, created = await self.client.create_room(
                self._rebuild_alias(cmd, name),
                name=cmd.name,
                topic=cmd.topic,
                invite=ghosts,
                avatar_mxc=await self._avatar(cmd),
            )
            await self.store.rebuilt(key, name, cmd.network, cmd.portal, room_id, alias)
            self.stats.rooms_created += int(created)
            log.info(
                "portal %s: rebuild %s into room %s (was %s)",
                key,
                name,
                room_id,
                old,
                extra=fields(key, room=room_id),
            )
        room = portal.room = RoomState(room_id, alias)
        room.last_event = await self.store.newest_event(room_id)
        for ghost in ghosts:
            await self.ensure_member(room, ghost)
        await settle_startup(self.client, self.store, self.stats, key, room)

    async def finish_rebuild(self, portal: PortalQueue, cmd: CreateRoom, name: str) -> None:
        """Tombstone the old room towards the new one, move the portal's alias there."""
        key = cmd.key
        row = await self.store.rebuild(key, name)
        if row is None or row["new_room"] is None:
            raise RebuildRefused(f"rebuild {name} of portal {key} was never started")
        if row["finished_at"] is not None:
            return
        old, new = row["old_room"], row["new_room"]
        local = alias_localpart(
            self.alias_prefix, cmd.network, cmd.portal, self.server, self.alias_templates
        )
        alias = f"#{local}:{self.server}"
        await self.client.set_state(
            old, "m.room.tombstone", {"body": TOMBSTONE_BODY, "replacement_room": new}
        )
        await self.client.put_alias(local, new)
        await self.client.set_state(new, "m.room.canonical_alias", {"alias": alias})
        await self.client.delete_alias(self._rebuild_alias(cmd, name))
        await self.store.finish_rebuild(key, name)
        log.info(
            "portal %s: rebuild %s finished: %s replaces %s",
            key,
            name,
            new,
            old,
            extra=fields(key, room=new),
        )
