"""What every Signal importer shares: mautrix-signal's ids, and body ranges as HTML.

Portal and message ids are formed as mautrix-signal forms them
(mautrix/signal:pkg/signalid/ids.go), so an operator who later runs the bridge
gets the same portals and an overlapping import deduplicates:

- a DM portal is the contact's ACI (lowercase UUID);
- a group portal is the standard base64 of the 32-byte group identifier,
  which zkgroup derives from the master key with a ShoHmacSha256;
- a message is ``<author ACI>|<sent timestamp ms>``, its pieces parts 0, 1, ...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from topics.records import Sender

NETWORK = "signal"
SYSTEM_SENDER = Sender(id="signal", name="Signal")
GROUP_LABEL = b"Signal_ZKGroup_20200424_GroupMasterKey_GroupSecretParams_DeriveFromMasterKey"
LEGACY_GROUP_PREFIX = "__signal_group__v2__!"
LEGACY_V1_GROUP_PREFIX = "__textsecure_group__!"


class Sho:
    """libsignal's ShoHmacSha256 (rust/poksho/src/shohmacsha256.rs), absorb/squeeze only."""

    def __init__(self, label: bytes) -> None:
        self.cv = bytes(32)
        self.absorb_and_ratchet(label)

    def absorb_and_ratchet(self, data: bytes) -> None:
        self.cv = hmac.new(self.cv, data + b"\x00", hashlib.sha256).digest()

    def squeeze_and_ratchet(self, size: int) -> bytes:
        blocks = (size + 31) // 32
        out = b"".join(
            hmac.new(self.cv, i.to_bytes(8, "big") + b"\x01", hashlib.sha256).digest()
            for i in range(blocks)
        )
        self.cv = hmac.new(self.cv, size.to_bytes(8, "big") + b"\x02", hashlib.sha256).digest()
        return out[:size]


def group_identifier(master_key: bytes) -> bytes:
    """The 32-byte GroupIdentifier of a v2 group's master key (zkgroup group_params.rs)."""
    sho = Sho(GROUP_LABEL)
    sho.absorb_and_ratchet(master_key)
    return sho.squeeze_and_ratchet(32)


def group_portal(identifier: bytes) -> str:
    """mautrix-signal's group portal id: standard base64 of the identifier (44 chars)."""
    return base64.b64encode(identifier).decode("ascii")


def legacy_group_portal(group_id: str) -> str | None:
    """The portal of a legacy database's ``recipient.group_id`` (hex after the prefix)."""
    for prefix in (LEGACY_GROUP_PREFIX, LEGACY_V1_GROUP_PREFIX):
        if group_id.startswith(prefix):
            try:
                return group_portal(bytes.fromhex(group_id[len(prefix) :]))
            except ValueError:
                return None
    return None


def aci_text(raw: bytes | str | None) -> str | None:
    """An ACI as a lowercase UUID, from 16 raw bytes or text; None if it is neither."""
    if raw is None:
        return None
    try:
        if isinstance(raw, bytes):
            return str(uuid.UUID(bytes=raw)) if len(raw) == 16 else None
        text = raw.strip().lower()
        if text.startswith("aci:"):
            text = text[4:]
        return str(uuid.UUID(text))
    except ValueError:
        return None


def message_id(author_aci: str, sent_ms: int) -> str:
    return f"{author_aci}|{sent_ms}"


def reaction_id(target: str, reactor_aci: str) -> str:
    # Signal keeps one reaction per person per message: the reactor names it.
    return f"{target}|reaction|{reactor_aci}"


@dataclass(frozen=True, slots=True)
class Range:
    """A body range in UTF-16 code units: a style name or a mention (its display text)."""

    start: int
    length: int
    style: str | None = None
    mention: str | None = None


_TAGS = {
    "BOLD": ("<strong>", "</strong>"),
    "ITALIC": ("<em>", "</em>"),
    "SPOILER": ("<span data-mx-spoiler>", "</span>"),
    "STRIKETHROUGH": ("<del>", "</del>"),
    "MONOSPACE": ("<code>", "</code>"),
}
# Style numbers: the export's BodyRange.Style (NONE = 0) and the Android
# database's BodyRangeList.Style (BOLD = 0) count differently.
EXPORT_STYLES = {1: "BOLD", 2: "ITALIC", 3: "SPOILER", 4: "STRIKETHROUGH", 5: "MONOSPACE"}
DATABASE_STYLES = {0: "BOLD", 1: "ITALIC", 2: "SPOILER", 3: "STRIKETHROUGH", 4: "MONOSPACE"}


def _utf16_offsets(text: str) -> list[int]:
    """offsets[i] = the UTF-16 position where character i starts (plus the end)."""
    out = [0]
    for ch in text:
        out.append(out[-1] + (2 if ord(ch) > 0xFFFF else 1))
    return out


def render(text: str, ranges: Iterable[Range]) -> tuple[str, str | None]:
    """(plain body, HTML or None): styles become tags, mentions their ``@name``.

    Ranges may overlap; out-of-range ones are clipped. A mention replaces the
    text it covers (Signal puts U+FFFC there).
    """
    items = [r for r in ranges if r.length > 0 and r.start >= 0]
    if not items:
        return text, None
    offsets = _utf16_offsets(text)
    index = {unit: i for i, unit in enumerate(offsets)}

    def char_at(unit: int) -> int:
        unit = min(max(unit, 0), offsets[-1])
        while unit not in index:  # inside a surrogate pair: move to its start
            unit -= 1
        return index[unit]

    spans = [(char_at(r.start), char_at(r.start + r.length), r) for r in items]
    cuts = sorted({0, len(text), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    plain: list[str] = []
    rich: list[str] = []
    mentioned: set[int] = set()
    for a, b in zip(cuts, cuts[1:], strict=False):
        covering = [r for s, e, r in spans if s <= a and b <= e]
        mention = next((r for r in covering if r.mention is not None), None)
        if mention is not None:
            if id(mention) in mentioned:
                continue  # already written at its first segment
            mentioned.add(id(mention))
            piece = f"@{mention.mention}"
        else:
            piece = text[a:b]
        plain.append(piece)
        escaped = html.escape(piece, quote=False).replace("\n", "<br>")
        styles = [r.style for r in covering if r.style in _TAGS]
        opening = "".join(_TAGS[s][0] for s in styles)
        closing = "".join(_TAGS[s][1] for s in reversed(styles))
        rich.append(f"{opening}{escaped}{closing}")
    return "".join(plain), "".join(rich)
