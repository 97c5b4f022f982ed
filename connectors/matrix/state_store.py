"""What mautrix's intents remember about rooms and ghosts, bounded in memory."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mautrix.appservice import ASStateStore
from mautrix.client.state_store import MemoryStateStore
from mautrix.types import RoomID, UserID


class BoundedStateStore(ASStateStore, MemoryStateStore):
    """mautrix's in-memory stores: what the intents learn (registrations, power levels).

    Bounded, because the number of rooms and ghosts comes from the input: the
    rooms least recently written and the registrations least recently asked
    about are forgotten past a cap. Forgetting costs one request later (the
    power levels read again, an idempotent join or register), never an event.
    MemoryStateStore keeps each room in the five dicts of ``_ROOM_MAPS``;
    ``tests/connectors/matrix/test_units.py`` notices if that changes.
    """

    _ROOM_MAPS = ("members", "full_member_list", "power_levels", "encryption", "create")

    def __init__(self, max_rooms: int = 10_000, max_users: int = 100_000) -> None:
        ASStateStore.__init__(self)
        MemoryStateStore.__init__(self)
        self.max_rooms, self.max_users = max_rooms, max_users
        self._rooms: OrderedDict[str, None] = OrderedDict()
        self._users: OrderedDict[str, None] = OrderedDict()

    def _touch(self, room_id: str) -> None:
        self._rooms[room_id] = None
        self._rooms.move_to_end(room_id)
        while len(self._rooms) > self.max_rooms:
            old, _ = self._rooms.popitem(last=False)
            for name in self._ROOM_MAPS:
                getattr(self, name).pop(old, None)

    async def is_registered(self, user_id: UserID) -> bool:
        if user_id in self._users:
            self._users.move_to_end(user_id)
            return True
        return False

    async def registered(self, user_id: UserID) -> None:
        self._users[user_id] = None
        self._users.move_to_end(user_id)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)

    async def set_member(self, room_id: RoomID, user_id: UserID, member: Any) -> None:
        self._touch(room_id)
        await super().set_member(room_id, user_id, member)

    async def set_membership(self, room_id: RoomID, user_id: UserID, membership: Any) -> None:
        self._touch(room_id)
        await super().set_membership(room_id, user_id, membership)

    async def set_members(self, room_id: RoomID, *args: Any, **kwargs: Any) -> None:
        self._touch(room_id)
        await super().set_members(room_id, *args, **kwargs)

    async def set_power_levels(self, room_id: RoomID, content: Any) -> None:
        self._touch(room_id)
        await super().set_power_levels(room_id, content)

    async def set_encryption_info(self, room_id: RoomID, content: Any) -> None:
        self._touch(room_id)
        await super().set_encryption_info(room_id, content)

    async def set_create(self, event: Any) -> None:
        room_id = event.room_id if hasattr(event, "room_id") else event.get("room_id")
        if room_id:
            self._touch(room_id)
        await super().set_create(event)
