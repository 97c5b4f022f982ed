"""What a WhatsApp export message says: text, notice, media, location, or nothing.

The export writes everything as text, so the kind of a message is read off
its body: English markers for omitted media, attachments, deleted and edited
messages, locations. Media come from the export (zip or the folder beside the
``.txt``), inline up to MAX_INLINE_BYTES, otherwise a notice saying why.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re

from connectors.sources.scope import OutsideExport, UnreadableEntry
from connectors.sources.whatsapp_export import MAX_INLINE_BYTES, ChatExport
from topics.records import Content, Sender

SYSTEM_SENDER = Sender(id="system", name="WhatsApp")

_ENCRYPTION_BANNER = re.compile(
    r"^(Messages and calls are end-to-end encrypted|Messages to this (group|chat) are now "
    r"secured with end-to-end encryption|.{0,40}uses a default timer for disappearing)",
    re.I,
)
# "Media omitted" as phones of several locales write it (Android in <>).
_OMITTED = re.compile(
    r"^<?(Media|image|video|audio|sticker|GIF|document|Contact card) omitted>?$"
    r"|^<(Medien weggelassen|Media weggelaten|Multimedia omitido|Arquivo de mídia oculto"
    r"|Mídia oculta|Médias omis|Media omessi|Medya dahil edilmedi|Без медиафайлов"
    r"|Pominięto multimedia|Media tidak disertakan)>$",
    re.I,
)
_DELETED = re.compile(r"^(This message was deleted\.?|You deleted this message\.?)$", re.I)
_EDITED_SUFFIX = re.compile(r"\s*<This message was edited>$")
# Android: "IMG-1.jpg (file attached)" in the phone's language.
_ATTACHED_WORDS = (
    "file attached|Datei angehängt|bestand bijgevoegd|archivo adjunto|arquivo anexado"
    "|fichier joint|file allegato|dosya ekli|файл прикреплён|файл прикреплен|plik załączony"
    "|file terlampir"
)
_ANDROID_ATTACHED = re.compile(rf"^(?P<file>\S.*?\.\w{{1,6}}) \((?:{_ATTACHED_WORDS})\)$", re.I)
# The same shape with words we do not know: an attachment only if the file is there.
_ANDROID_MAYBE = re.compile(r"^(?P<file>\S.*?\.\w{1,6}) \([^()]{1,40}\)$")
# iOS: "<attached: NAME>", also "< attached: NAME >" and "‹attached: NAME>".
_IOS_ATTACHED = re.compile(r"[<\u2039]\s*attached:\s*(?P<file>[^>\u203a]+?)\s*[>\u203a]", re.I)
_LOCATION = re.compile(
    r"^location: https://maps\.google\.com/\?q=(?P<lat>-?\d+(?:\.\d+)?),(?P<lon>-?\d+(?:\.\d+)?)$",
    re.I,
)
_PHONE = re.compile(r"^\+[\d\s()-]{6,}$")


def sender_id(name: str) -> str:
    """A stable id from a display name: phone numbers keep their digits, names are hashed."""
    if _PHONE.match(name):
        return "+" + re.sub(r"\D", "", name)
    return "name-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def media_type_of(mimetype: str | None) -> str:
    major = (mimetype or "").split("/", 1)[0]
    return major if major in ("image", "video", "audio") else "file"


def guess_mimetype(filename: str) -> str | None:
    lower = filename.lower()
    # mimetypes does not know WhatsApp's voice-note container.
    if lower.endswith(".opus"):
        return "audio/ogg"
    if lower.endswith(".webp"):
        return "image/webp"
    return mimetypes.guess_type(filename)[0]


def message_content(
    export: ChatExport, name: str | None, body: str, system_line: bool, stats: dict[str, int]
) -> tuple[Sender, Content | None]:
    """The sender and content of one message; content None means skipped.

    ``system_line``: iOS marked the line as generated and it carries the
    chat's own name, so it is a system line although it has a "name: ".
    """
    # The encryption banner is in every export and says nothing: skipped.
    if _ENCRYPTION_BANNER.match(body):
        return SYSTEM_SENDER, None
    if name is None:
        # System lines: "X added Y", "X changed the subject ...".
        return SYSTEM_SENDER, Content(kind="notice", body=body)
    sender = Sender(id=sender_id(name), name=name)
    body = _EDITED_SUFFIX.sub("", body)
    if _DELETED.match(body):
        return sender, None
    first, _, caption = body.partition("\n")
    if _OMITTED.match(first):
        notice = first.strip("<>") + (f"\n{caption.strip()}" if caption.strip() else "")
        return sender, Content(kind="notice", body=notice)
    attached = _ANDROID_ATTACHED.match(first)
    if attached is None:
        maybe = _ANDROID_MAYBE.match(first)
        if maybe is not None and export.has_media(maybe.group("file")):
            attached = maybe
    if attached:
        return sender, _media(export, attached.group("file"), caption.strip(), stats)
    ios = _IOS_ATTACHED.search(first)
    if ios:
        rest = (first[: ios.start()] + first[ios.end() :]).strip() + "\n" + caption
        return sender, _media(export, ios.group("file").strip(), rest.strip(), stats)
    if system_line:
        return SYSTEM_SENDER, Content(kind="notice", body=body)
    loc = _LOCATION.match(body)
    if loc:
        return sender, Content(
            kind="location", lat=float(loc["lat"]), lon=float(loc["lon"]), body=body
        )
    return sender, Content(kind="text", body=body)


def _media(export: ChatExport, filename: str, caption: str, stats: dict[str, int]) -> Content:
    try:
        found = export.media(filename)
    except (OutsideExport, UnreadableEntry) as exc:
        stats["media_refused"] = stats.get("media_refused", 0) + 1
        return Content(kind="notice", body=f"{filename} (not imported: {exc})")
    if found is None:
        stats["media_missing"] = stats.get("media_missing", 0) + 1
        return Content(kind="notice", body=f"{filename} (file not included in the export)")
    size, data = found
    if data is None:
        stats["media_too_large"] = stats.get("media_too_large", 0) + 1
        return Content(
            kind="notice",
            body=f"{filename} ({size} bytes, too large to import; limit {MAX_INLINE_BYTES})",
        )
    stats["media"] = stats.get("media", 0) + 1
    mimetype = guess_mimetype(filename)
    return Content(
        kind="media",
        media_type=media_type_of(mimetype),
        body=caption or filename,
        filename=filename,
        mimetype=mimetype,
        size=size,
        data=base64.b64encode(data).decode("ascii"),
    )
