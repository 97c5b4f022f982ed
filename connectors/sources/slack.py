"""Slack workspace exports: the ``.zip`` (or its unpacked folder) from Settings > Import/Export.

Layout: ``users.json``, ``channels.json`` (+ ``groups.json``, ``dms.json``,
``mpims.json`` when the export has them) and one ``<folder>/<YYYY-MM-DD>.json``
array of messages per conversation and day. Day files are read one at a time,
so memory is bounded by the largest day, not the workspace.

Mapping:
- portal = conversation id (``C…``, ``G…``, ``D…``); folder = name (id for DMs).
- message id = the Slack ``ts`` string, unique per channel; files attached to a
  message are extra parts (``part`` 1, 2, … after the text, or from 0 when the
  message has no text).
- ``thread_ts`` != ``ts``: ``thread`` and ``reply_to`` = ``thread_ts``.
- reactions: one ``reaction`` record per user per emoji, id
  ``{ts}:react:{name}:{user}``, at the message's time (the export has no
  reaction times); emoji names become Unicode when known, else ``:name:``.
- ``edited``: the export only has the final text, which is imported as is (an
  edit record would repeat it with nothing to replace).
- joins, leaves, topic/purpose/name changes, pins: ``notice``; ``me_message``:
  ``emote``; deleted messages and tombstones: skipped.
- files: a ``text`` message linking to ``url_private``: exports carry no file
  bytes, and fetching the URL needs a Slack token that neither the export nor
  the sink has, so a link is what survives; files without a URL: a notice.
"""

from __future__ import annotations

import html
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from connectors.source import Rejected, Source, SourceError, SourceItem
from connectors.sources.scope import (
    ZIP_DAMAGE,
    ExportFolder,
    OutsideExport,
    UnreadableEntry,
    check_entry,
)
from connectors.sources.slack_mrkdwn import Mrkdwn, emoji
from connectors.sources.stream import Capped, InvalidJSON, TooLarge, array_items, why_not
from topics.records import Content, Member, NetworkMessage, PortalInfo, Sender

CONVERSATION_FILES = ("channels.json", "groups.json", "mpims.json", "dms.json")
SKIP_SUBTYPES = frozenset({"message_deleted", "tombstone", "message_changed", "message_replied"})
NOTICE_SUBTYPES = frozenset(
    {
        "channel_join",
        "channel_leave",
        "group_join",
        "group_leave",
        "channel_topic",
        "channel_purpose",
        "channel_name",
        "group_topic",
        "group_purpose",
        "group_name",
        "channel_archive",
        "channel_unarchive",
        "group_archive",
        "group_unarchive",
        "pinned_item",
        "unpinned_item",
        "reminder_add",
    }
)
# What the parser reads of each entry (connectors/sources/shape.py); an entry
# of another shape is rejected with the field named instead of crashing.
_PROFILE = {"display_name": str, "real_name": str, "name": str}
USER_SHAPE = {"id": str, "name": str, "real_name": str, "profile": _PROFILE}
CONVERSATION_SHAPE = {
    "id": str,
    "name": str,
    "members": [str],
    "topic": {"value": str},
    "purpose": {"value": str},
}
_FILE = {"id": str, "name": str, "title": str, "mode": str, "url_private": str, "permalink": str}
MESSAGE_SHAPE = {
    "type": str,
    "subtype": str,
    "hidden": bool,
    "ts": str,
    "thread_ts": str,
    "user": str,
    "text": str,
    "bot_id": str,
    "username": str,
    "bot_profile": {"name": str},
    "user_profile": _PROFILE,
    "attachments": [{"fallback": str, "text": str}],
    "files": [_FILE],
    "file": _FILE,  # old file_share / file_comment messages: one file, singular
    "comment": {"user": str, "comment": str},  # old file_comment: the author is here
    "reactions": [{"name": str, "users": [str]}],
}
# Files are streamed entry by entry; the caps only bound what one file may cost
# (a day file of a busy channel is a few MB; a bomb expands to gigabytes).
MAX_DAY_FILE_BYTES = 64 * 1024 * 1024
MAX_LIST_FILE_BYTES = 256 * 1024 * 1024
_DAY_FILE = re.compile(r"^(?P<folder>[^/]+)/(?P<day>\d{4}-\d{2}-\d{2})\.json$")
_TS = re.compile(r"^\d{1,12}(\.\d{1,9})?$")


def ts_ms(ts: str) -> int:
    """Slack's "1700000000.123456" (seconds as a decimal string) to integer ms, no floats."""
    sec, _, frac = ts.partition(".")
    return int(sec) * 1000 + int((frac + "000")[:3])


def _excerpt(entry: Any) -> str:
    """An entry as JSON for a dead letter (bounded there; never raises)."""
    try:
        return json.dumps(entry)[:4000]
    except (TypeError, ValueError, RecursionError):
        return repr(type(entry))


class _Export:
    """A Slack export as a zip or a folder: JSON files by name, day files by folder."""

    def __init__(self, path: Path, track: Callable[[IO[bytes], int], None]) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        self.folder: ExportFolder | None = None
        self.refused: list[str] = []  # links out of the export folder: never read
        names: list[str] = []
        if path.is_dir():
            self.folder = ExportFolder(path)
            for found in sorted(path.rglob("*.json")):
                name = found.relative_to(path).as_posix()
                if self.folder.contains(found):
                    names.append(name)
                elif found.is_symlink():
                    self.refused.append(name)
        elif path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise SourceError(f"{path.name}: not a readable zip ({exc})") from None
            if self.zip.fp is not None:  # the progress bar follows the archive position
                track(self.zip.fp, path.stat().st_size)
            names = [i.filename for i in self.zip.infolist() if not i.is_dir()]
        else:
            raise SourceError(f"{path}: no such file or directory")
        # Some tools wrap the export in one top-level folder: find it by users.json.
        roots = sorted(
            (n for n in names if PurePosixPath(n).name in ("users.json", "channels.json")),
            key=lambda n: n.count("/"),
        )
        if not roots:
            raise SourceError(f"{path.name}: not a Slack export (no users.json or channels.json)")
        parent = PurePosixPath(roots[0]).parent.as_posix()
        self.prefix = "" if parent == "." else parent + "/"
        self.days: dict[str, list[str]] = {}
        for name in names:
            if not name.startswith(self.prefix) or ".." in name.split("/"):
                continue
            m = _DAY_FILE.match(name[len(self.prefix) :])
            if m:
                self.days.setdefault(m.group("folder"), []).append(m.group("day"))
        for days in self.days.values():
            days.sort()
        self.names = {n[len(self.prefix) :] for n in names if n.startswith(self.prefix)}

    def open(self, name: str) -> IO[bytes]:
        full = self.prefix + name
        if self.zip is not None:
            return self.zip.open(check_entry(self.zip.getinfo(full)))
        assert self.folder is not None
        located = self.folder.locate(full)  # OutsideExport for a link out of the folder
        if located is None:
            raise FileNotFoundError(full)
        return located.open("rb")

    def items(self, name: str, limit: int) -> Iterator[Any]:
        """The entries of a JSON array file, streamed and read up to ``limit`` bytes.

        Raises ValueError (not JSON, not an array, TooLarge, OutsideExport,
        UnreadableEntry) or ZIP_DAMAGE; entries before the damage were yielded.
        """
        with self.open(name) as handle:
            yield from array_items(Capped(handle, limit, name))

    def metadata(self, name: str, shape: dict[str, Any]) -> Iterator[dict[str, Any] | Rejected]:
        """The entries of a top-level list file (users.json, channels.json …) of ``shape``.

        Absent means empty; an entry of another shape is a Rejected naming it.
        """
        if name not in self.names:
            return
        try:
            for index, entry in enumerate(self.items(name, MAX_LIST_FILE_BYTES)):
                reason = why_not(entry, shape)
                if reason is None:
                    yield entry
                else:
                    yield Rejected(f"{name}[{index}]", reason, _excerpt(entry))
        except (ValueError, *ZIP_DAMAGE) as exc:
            raise SourceError(f"{self.path.name}: cannot read {name}: {exc}") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


# ---------------------------------------------------------------- source


class SlackSource(Source):
    name = "slack"
    network = "slack"
    description = "Slack workspace export (.zip or its unpacked folder)"

    def read(self) -> Iterator[SourceItem]:
        export = _Export(self.path, self.track)
        try:
            yield from self._read(export)
        finally:
            export.close()

    def _read(self, export: _Export) -> Iterator[SourceItem]:
        for name in export.refused:
            yield Rejected(name, "a link to a file outside the export folder: not read")
        stats = self.stats
        for key in ("messages", "reactions", "files_linked", "skipped"):
            stats.setdefault(key, 0)
        names_option = self.options.get("names", "display")
        if names_option not in ("display", "real"):
            raise SourceError(f"option names must be display or real, got {names_option!r}")
        self.users: dict[str, str] = {}
        for user in export.metadata("users.json", USER_SHAPE):
            if isinstance(user, Rejected):
                yield user
                continue
            profile = user.get("profile") or {}
            display = profile.get("display_name")
            real = profile.get("real_name") or user.get("real_name")
            first, second = (real, display) if names_option == "real" else (display, real)
            name = first or second or user.get("name")
            if isinstance(user.get("id"), str):
                self.users[user["id"]] = name or user["id"]
        conversations: list[tuple[str, dict[str, Any]]] = []
        for filename in CONVERSATION_FILES:
            for conv in export.metadata(filename, CONVERSATION_SHAPE):
                if isinstance(conv, Rejected):
                    yield conv
                elif isinstance(conv.get("id"), str):
                    conversations.append((filename, conv))
        channel_names = {c["id"]: c.get("name") or c["id"] for _, c in conversations}
        self.mrkdwn = Mrkdwn(self.users, channel_names)
        only = {c.strip().lstrip("#") for c in self.options.get("channels", "").split(",")}
        only.discard("")

        done: set[str] = set()
        for filename, conv in conversations:
            folder = conv.get("name") if filename != "dms.json" else conv["id"]
            if folder not in export.days and conv["id"] in export.days:
                folder = conv["id"]
            if only and not ({conv["id"], folder} & only):
                continue
            done.add(folder)
            yield self._portal(conv, filename)
            yield from self._conversation(export, conv["id"], folder)
        # Folders no list mentions (partial exports): the folder name is all we know.
        for folder in sorted(set(export.days) - done):
            if only and folder not in only:
                continue
            yield PortalInfo(network=self.network, portal=folder, name=folder)
            yield from self._conversation(export, folder, folder)

    def _portal(self, conv: dict[str, Any], filename: str) -> PortalInfo:
        members = tuple(
            Member(id=u, name=self.users.get(u))
            for u in conv.get("members") or ()
            if isinstance(u, str)
        )
        if filename == "dms.json" or not conv.get("name"):
            name = ", ".join(m.name or m.id for m in members) or conv["id"]
        else:
            name = conv["name"]
        topic = None
        for key in ("topic", "purpose"):
            value = (conv.get(key) or {}).get("value")
            if value:
                topic = self.mrkdwn.render(value)[0]
                break
        return PortalInfo(
            network=self.network, portal=conv["id"], name=name, topic=topic, members=members
        )

    def _conversation(self, export: _Export, portal: str, folder: str) -> Iterator[SourceItem]:
        for day in export.days.get(folder, ()):
            name = f"{folder}/{day}.json"
            read = 0
            try:
                for index, msg in enumerate(export.items(name, MAX_DAY_FILE_BYTES)):
                    read = index + 1
                    where = f"{name}[{index}]"
                    reason = why_not(msg, MESSAGE_SHAPE)
                    if reason is not None:
                        yield Rejected(where, reason, _excerpt(msg))
                        continue
                    yield from self._message(portal, msg, where)
            except (OutsideExport, UnreadableEntry) as exc:
                yield Rejected(name, f"not read: {exc}")
            except (TooLarge, InvalidJSON) as exc:
                yield Rejected(name, f"{exc} (after {read} messages)")
            except ValueError as exc:  # the top level is not an array
                yield Rejected(name, f"day file {exc}")
            except ZIP_DAMAGE as exc:
                raise SourceError(f"{self.path.name}: damaged archive at {name}: {exc}") from None

    def _sender(self, msg: dict[str, Any]) -> Sender | None:
        # Old file_comment messages carry their author in the comment.
        user = msg.get("user") or (msg.get("comment") or {}).get("user")
        if msg.get("subtype") == "bot_message" or (not user and msg.get("bot_id")):
            bot = msg.get("bot_profile") or {}
            bot_id = msg.get("bot_id")
            # Old integrations post without a username: name them by their id.
            name = msg.get("username") or bot.get("name") or (f"bot {bot_id}" if bot_id else None)
            ident = bot_id or (f"bot:{name}" if name else None)
            return Sender(id=ident, name=name) if ident else None
        if not isinstance(user, str) or not user:
            return None
        profile = msg.get("user_profile") or {}
        name = (
            self.users.get(user)
            or profile.get("display_name")
            or profile.get("real_name")
            or profile.get("name")
        )
        return Sender(id=user, name=name)

    def _message(self, portal: str, msg: dict[str, Any], where: str) -> Iterator[SourceItem]:
        self.at = where
        subtype = msg.get("subtype")
        if subtype in SKIP_SUBTYPES or msg.get("hidden"):
            self.stats["skipped"] += 1
            return
        ts = msg.get("ts")
        if not isinstance(ts, str) or not _TS.match(ts):
            yield Rejected(where, f"missing or malformed ts {ts!r}", _excerpt(msg))
            return
        sender = self._sender(msg)
        if sender is None:
            yield Rejected(where, "message has neither user nor bot_id", _excerpt(msg))
            return
        thread_ts = msg.get("thread_ts")
        thread = thread_ts if isinstance(thread_ts, str) and thread_ts != ts else None
        base = {
            "network": self.network,
            "portal": portal,
            "id": ts,
            "sender": sender,
            "ts": ts_ms(ts),
            "reply_to": thread,
            "thread": thread,
        }

        text = msg.get("text") or (msg.get("comment") or {}).get("comment") or ""
        if not text:
            # Bot posts often carry everything in attachments; their fallback is the text.
            text = "\n".join(
                a.get("fallback") or a.get("text") or ""
                for a in msg.get("attachments") or ()
                if isinstance(a, dict)
            ).strip()
        part = 0
        if text:
            body, rich = self.mrkdwn.render(text)
            kind = "notice" if subtype in NOTICE_SUBTYPES else "text"
            if subtype == "me_message":
                kind = "emote"
            yield NetworkMessage(**base, content=Content(kind=kind, body=body, html=rich))
            part += 1
        files = msg.get("files") or ([msg["file"]] if msg.get("file") else [])
        for file in files:
            if not isinstance(file, dict) or file.get("mode") == "tombstone":
                continue
            yield NetworkMessage(**base, part=part, content=self._file(file))
            part += 1
        if part == 0:
            self.stats["skipped"] += 1
            return
        self.stats["messages"] += 1

        for reaction in msg.get("reactions") or ():
            if not isinstance(reaction, dict) or not isinstance(reaction.get("name"), str):
                continue
            key = emoji(reaction["name"])
            for user in reaction.get("users") or ():
                if not isinstance(user, str):
                    continue
                self.stats["reactions"] += 1
                yield NetworkMessage(
                    network=self.network,
                    portal=portal,
                    id=f"{ts}:react:{reaction['name']}:{user}",
                    sender=Sender(id=user, name=self.users.get(user)),
                    ts=base["ts"],
                    content=Content(kind="reaction", target=ts, key=key),
                    thread=thread,
                )

    def _file(self, file: dict[str, Any]) -> Content:
        name = file.get("name") or file.get("title") or file.get("id") or "file"
        url = file.get("url_private") or file.get("permalink")
        if not isinstance(url, str) or not url:
            return Content(kind="notice", body=f"{name} (file not available in the export)")
        self.stats["files_linked"] += 1
        title = file.get("title") or name
        return Content(
            kind="text",
            body=f"📎 {title}: {url}",
            html=f'📎 <a href="{html.escape(url)}">{html.escape(title)}</a>',
        )
