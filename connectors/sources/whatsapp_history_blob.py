"""Raw WhatsApp ``HistorySync`` blobs: ``backflow import whatsapp-history-blob PATH``.

PATH is one blob or a folder of them (read in name order; nothing outside
the folder, links included). A blob is a protobuf ``HistorySync``,
zlib-compressed as WhatsApp serves it or already inflated; both are read.

The blob is walked at the wire level, one top-level field at a time, through
a streaming inflater: only one ``Conversation`` is ever decoded and held, so
memory is bounded by the largest conversation (``MAX_CONVERSATION_BYTES``),
not by the blob. A first pass collects the push names and the phone-number
to LID mappings (they follow the conversations in the blob), a second one
converts the conversations. Messages come newest first in a conversation;
they are published oldest first, a timestamp later than its newer neighbour
clamped to it as mautrix-whatsapp does (not in chats with comments).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from google.protobuf.message import DecodeError

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.scope import ExportFolder
from connectors.sources.wa_bridge_db import BridgeDB
from connectors.sources.wa_content import FUTURE_SKEW_S, NETWORK, Context, Refused, convert
from connectors.sources.wa_ids import LID, USER, NotAJid, chat_of, non_ad, server_of, user_of
from connectors.sources.wa_names import Names
from connectors.sources.wa_proto import CLASSES, Conversation
from connectors.sources.whatsapp_history import skipped_chat
from topics.records import MIN_TS, PortalInfo

MAX_CONVERSATION_BYTES = 64 * 1024 * 1024
MAX_NAME_ENTRIES = 200_000  # push names / LID mappings kept from one blob
CHUNK = 64 * 1024
CONVERSATIONS, PUSHNAMES, LID_MAPPINGS, SYNC_TYPE = 2, 7, 15, 1


class Corrupt(ValueError):
    """The bytes are not a HistorySync (or stop in the middle of a field)."""


class Inflated:
    """The blob's bytes, inflated on the fly when zlib-compressed; ``offset`` counts them."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.offset = handle, 0
        self.buffer, self.pos = bytearray(), 0
        head = handle.read(2)
        compressed = len(head) == 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        self.inflater = zlib.decompressobj() if compressed else None
        self.pending = head  # raw bytes not yet inflated (or plain bytes)

    def _more(self) -> bool:
        inflater = self.inflater
        if inflater is not None and inflater.unconsumed_tail:
            raw = inflater.unconsumed_tail
        else:
            raw = self.pending or self.handle.read(CHUNK)
        self.pending = b""
        if inflater is None:
            self.buffer += raw
            return bool(raw)
        if not raw:
            tail = inflater.flush()
            self.buffer += tail
            if not tail and not inflater.eof:
                raise Corrupt("the zlib stream is cut short")
            return bool(tail)
        try:  # bounded output per call: a zip bomb inflates a chunk at a time
            data = inflater.decompress(raw, CHUNK)
        except zlib.error as exc:
            raise Corrupt(f"zlib: {exc}") from None
        self.buffer += data
        return True

    def read(self, n: int) -> bytes:
        while len(self.buffer) - self.pos < n and self._more():
            pass
        out = bytes(self.buffer[self.pos : self.pos + n])
        self.pos += len(out)
        self.offset += len(out)
        if self.pos > 1 << 20:  # drop what was read (amortized: once per MiB)
            del self.buffer[: self.pos]
            self.pos = 0
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            got = self.read(min(n, CHUNK))
            if not got:
                raise Corrupt("the blob ends inside a field")
            n -= len(got)

    def varint(self) -> int | None:
        """The next varint; None at a clean end of the blob."""
        value = shift = 0
        for i in range(10):
            byte = self.read(1)
            if not byte:
                if i == 0:
                    return None
                raise Corrupt("the blob ends inside a varint")
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
        raise Corrupt("a varint longer than 10 bytes")


def fields(blob: Inflated, wanted: set[int]) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, offset, bytes or varint) of the wanted top-level fields."""
    while True:
        at = blob.offset  # where the field's tag starts (in the inflated bytes)
        tag = blob.varint()
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value = blob.varint()
            if value is None:
                raise Corrupt("the blob ends inside a field")
            if number in wanted:
                yield number, at, value
        elif wire == 2:
            size = blob.varint()
            if size is None:
                raise Corrupt("the blob ends inside a field")
            if number in wanted and size <= MAX_CONVERSATION_BYTES:
                data = blob.read(size)
                if len(data) < size:
                    raise Corrupt("the blob ends inside a field")
                yield number, at, data
            else:
                if number in wanted:
                    yield number, at, size  # over the cap: the caller rejects it
                blob.skip(size)
        elif wire in (1, 5):
            blob.skip(8 if wire == 1 else 4)
        else:
            raise Corrupt(f"wire type {wire} at byte {at}: not a HistorySync")


class _NoDatabase(BridgeDB):
    """Names for a blob come from the blob itself."""

    def rows(self, sql: str, params: Any = ()) -> list[tuple]:
        return []


class WhatsAppHistoryBlobSource(Source):
    name = "whatsapp-history-blob"
    network = NETWORK
    description = "WhatsApp HistorySync protobuf blobs (zlib or not): a file or a folder of them"

    def read(self) -> Iterator[SourceItem]:
        own = self.options.get("own_jid", "")
        try:
            own_jid = non_ad(own if "@" in own else f"{own}@{USER}")
        except NotAJid:
            raise SourceError(
                "option own_jid: the account's own JID or phone number is needed for its own "
                "messages (-o own_jid=15551234567)"
            ) from None
        for path in self._files():
            yield from self._blob(path, own_jid)

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: no such file or folder")
        folder = ExportFolder(self.path)
        found = sorted(p for p in self.path.iterdir() if not p.name.startswith("."))
        files = [p for p in found if folder.contains(p)]
        if not files:
            raise SourceError(f"{self.path}: no history-sync blobs in this folder")
        return files

    def _blob(self, path: Path, own_jid: str) -> Iterator[SourceItem]:
        names = Names(_NoDatabase(str(path)))
        try:
            self._names(path, names)
        except Corrupt:
            pass  # the names before the damage still help; pass 2 reports where it is
        identity = names.identity(own_jid)
        ctx = Context(identity=identity, name_of=names.name_of, stats=self.stats)
        with path.open("rb") as handle:
            self.track(handle, path.stat().st_size)
            blob = Inflated(handle)
            n = 0
            try:
                for _number, at, data in fields(blob, {CONVERSATIONS}):
                    n += 1
                    where = f"{path.name} conversation {n} (byte {at})"
                    if isinstance(data, int):
                        yield Rejected(where, f"{data} bytes, over {MAX_CONVERSATION_BYTES}")
                        continue
                    yield from self._conversation(data, where, names, ctx)
            except Corrupt as exc:
                yield Rejected(
                    f"{path.name} byte {blob.offset}",
                    f"not a HistorySync blob from here: {exc} (rest not read)",
                )

    def _names(self, path: Path, names: Names) -> None:
        """Pass 1: push names, LID mappings and the sync type."""
        pushname, mapping = CLASSES["Pushname"], CLASSES["PnLidMapping"]
        with path.open("rb") as handle:
            for number, _at, data in fields(Inflated(handle), {SYNC_TYPE, PUSHNAMES, LID_MAPPINGS}):
                if number == SYNC_TYPE:
                    self.stats[f"sync_type_{data}"] = self.stats.get(f"sync_type_{data}", 0) + 1
                    continue
                if isinstance(data, int) or len(names.extra) >= MAX_NAME_ENTRIES:
                    continue
                try:
                    if number == PUSHNAMES:
                        entry = pushname.FromString(data)
                        if isinstance(entry.id, str) and isinstance(entry.pushname, str):
                            names.extra[non_ad(entry.id)] = entry.pushname[:255]
                    else:
                        entry = mapping.FromString(data)
                        pn, lid = non_ad(entry.pn_jid), non_ad(entry.lid_jid)
                        if server_of(pn) == USER and server_of(lid) == LID:
                            names.extra_lid[user_of(pn)] = user_of(lid)
                            names.extra_pn[user_of(lid)] = user_of(pn)
                except (DecodeError, NotAJid, TypeError):
                    self.stats["names_unreadable"] = self.stats.get("names_unreadable", 0) + 1

    def _conversation(
        self, data: bytes, where: str, names: Names, ctx: Context
    ) -> Iterator[SourceItem]:
        try:
            conv = Conversation.FromString(data)
            chat = chat_of(conv.id, ctx.identity, reroute=True)
        except DecodeError as exc:
            yield Rejected(where, f"not a Conversation ({exc})", data[:4096])
            return
        except (NotAJid, TypeError) as exc:
            yield Rejected(where, f"field 'ID': {exc}", data[:4096])
            return
        if skipped_chat(chat):
            self.stats["chats_skipped"] = self.stats.get("chats_skipped", 0) + 1
            return
        title = conv.display_name or conv.name
        if isinstance(title, str) and title:
            names.extra.setdefault(chat, title[:255])
        last = conv.last_msg_timestamp * 1000 or None  # ranks it (max_initial_conversations)
        if last is not None and not MIN_TS <= last <= (ctx.now_s + FUTURE_SKEW_S) * 1000:
            last = None
        yield PortalInfo(
            network=NETWORK, portal=chat, name=names.portal_name(chat), last_activity_ts=last
        )
        infos = [m.message for m in conv.messages]  # newest first
        if not any(i.HasField("comment_metadata") for i in infos):
            newer = None  # clamp as mautrix does (mautrix/whatsapp#946)
            for info in infos:
                if newer is not None and info.message_timestamp > newer:
                    info.message_timestamp = newer
                    self.stats["timestamps_clamped"] = self.stats.get("timestamps_clamped", 0) + 1
                if info.message_timestamp:
                    newer = info.message_timestamp
        key = f"{NETWORK}:{chat}"
        for i in range(len(infos) - 1, -1, -1):
            info = infos[i]
            at = f"{where} message {i + 1} ({info.key.id if isinstance(info.key.id, str) else ''})"
            self.at = at
            self.stats["messages_read"] = self.stats.get("messages_read", 0) + 1
            try:
                records = list(convert(info, chat, ctx))
            except Refused as exc:
                yield Rejected(at, str(exc), info.SerializeToString()[:4096], key)
                continue
            yield from records
