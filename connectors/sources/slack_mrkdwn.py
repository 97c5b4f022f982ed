"""Slack's mrkdwn and emoji shortcodes, turned into a plain body and Matrix HTML.

Pure text functions for the Slack importer (connectors/sources/slack.py):
``*bold*``, ``_italic_``, ``~strike~``, code spans and blocks, ``<@U…>`` user
and ``<#C…>`` channel mentions, ``<url|label>`` links and ``:shortcode:``
emoji (with skin tones). The HTML is escaped here and sanitized again by the
sink.
"""

from __future__ import annotations

import html
import re

# The emoji people actually react with; anything else stays ":name:".
EMOJI = {
    "+1": "👍",
    "thumbsup": "👍",
    "-1": "👎",
    "thumbsdown": "👎",
    "heart": "❤️",
    "smile": "😄",
    "smiley": "😃",
    "grinning": "😀",
    "grin": "😁",
    "laughing": "😆",
    "joy": "😂",
    "rolling_on_the_floor_laughing": "🤣",
    "slightly_smiling_face": "🙂",
    "wink": "😉",
    "blush": "😊",
    "heart_eyes": "😍",
    "thinking_face": "🤔",
    "neutral_face": "😐",
    "confused": "😕",
    "cry": "😢",
    "sob": "😭",
    "scream": "😱",
    "open_mouth": "😮",
    "astonished": "😲",
    "sweat_smile": "😅",
    "sunglasses": "😎",
    "upside_down_face": "🙃",
    "pray": "🙏",
    "clap": "👏",
    "wave": "👋",
    "ok_hand": "👌",
    "muscle": "💪",
    "raised_hands": "🙌",
    "point_up": "☝️",
    "eyes": "👀",
    "fire": "🔥",
    "tada": "🎉",
    "rocket": "🚀",
    "star": "⭐",
    "sparkles": "✨",
    "100": "💯",
    "white_check_mark": "✅",
    "heavy_check_mark": "✔️",
    "x": "❌",
    "warning": "⚠️",
    "bulb": "💡",
    "coffee": "☕",
    "beer": "🍺",
    "pizza": "🍕",
    "cake": "🍰",
    "party_popper": "🎉",
    "partying_face": "🥳",
    "facepalm": "🤦",
    "shrug": "🤷",
    "see_no_evil": "🙈",
    "skull": "💀",
    "poop": "💩",
    "hankey": "💩",
    "broken_heart": "💔",
    "heavy_plus_sign": "➕",
    "question": "❓",
    "exclamation": "❗",
    "memo": "📝",
    "calendar": "📆",
    "smile_cat": "😸",
}
_SKIN_TONES = {f"skin-tone-{n}": chr(0x1F3FB + n - 2) for n in range(2, 7)}
_SHORTCODE = re.compile(r":([a-z0-9_+'-]+)(?:::(skin-tone-[2-6]))?:")


def emoji(name: str) -> str:
    """Slack reaction name (``thumbsup::skin-tone-3``) to Unicode, else ``:name:``."""
    base, _, tone = name.partition("::")
    char = EMOJI.get(base)
    if char is None:
        return f":{name}:"
    return char + _SKIN_TONES.get(tone, "")




class Mrkdwn:
    """Slack mrkdwn to (plain body, Matrix HTML or None when there is no formatting)."""

    _PRE = re.compile(r"```(.*?)```", re.S)
    _CODE = re.compile(r"`([^`\n]+)`")
    _TOKEN = re.compile(r"<([^<>\n]+)>")
    _STYLES = (
        (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]*?\S)\*(?![\w*])"), "strong"),
        (re.compile(r"(?<![\w_])_(?=\S)([^_\n]*?\S)_(?![\w_])"), "em"),
        (re.compile(r"(?<![\w~])~(?=\S)([^~\n]*?\S)~(?![\w~])"), "del"),
    )

    def __init__(self, users: dict[str, str], channels: dict[str, str]) -> None:
        self.users = users
        self.channels = channels

    def render(self, text: str) -> tuple[str, str | None]:
        plain: list[str] = []
        rich: list[str] = []
        formatted = False
        pos = 0
        for m in self._PRE.finditer(text):
            p, h, f = self._inline(text[pos : m.start()])
            plain.append(p)
            rich.append(h)
            formatted |= f
            code = self._tokens_plain(m.group(1)).strip("\n")
            plain.append(code)
            rich.append(f"<pre><code>{html.escape(code, quote=False)}</code></pre>")
            formatted = True
            pos = m.end()
        p, h, f = self._inline(text[pos:])
        plain.append(p)
        rich.append(h)
        formatted |= f
        body = "".join(plain)
        return body, ("".join(rich) if formatted else None)

    def _inline(self, text: str) -> tuple[str, str, bool]:
        plain: list[str] = []
        rich: list[str] = []
        formatted = False
        pos = 0
        for m in self._CODE.finditer(text):
            p, h, f = self._styled(text[pos : m.start()])
            code = self._tokens_plain(m.group(1))
            plain += [p, code]
            rich += [h, f"<code>{html.escape(code, quote=False)}</code>"]
            formatted = True
            formatted |= f
            pos = m.end()
        p, h, f = self._styled(text[pos:])
        plain.append(p)
        rich.append(h)
        return "".join(plain), "".join(rich), formatted or f

    def _styled(self, text: str) -> tuple[str, str, bool]:
        tokens: list[tuple[str, str, bool]] = []

        def stash(m: re.Match[str]) -> str:
            tokens.append(self._token(m.group(1)))
            return f"\ue000{len(tokens) - 1}\ue001"

        marked = self._TOKEN.sub(stash, text)
        # Slack escapes &, < and > in message text; unescape once, re-escape for HTML.
        plain = html.unescape(marked)
        rich = html.escape(plain, quote=False)
        formatted = any(t[2] for t in tokens)
        for regex, tag in self._STYLES:
            rich, n = regex.subn(rf"<{tag}>\1</{tag}>", rich)
            plain = regex.sub(r"\1", plain)
            formatted |= n > 0
        plain = _SHORTCODE.sub(lambda m: emoji(m.group(0).strip(":")), plain)
        rich = _SHORTCODE.sub(lambda m: emoji(m.group(0).strip(":")), rich)
        lines = rich.split("\n")
        if any(line.startswith("&gt; ") for line in lines):
            formatted = True
            rich = "".join(
                f"<blockquote>{line[5:]}</blockquote>"
                if line.startswith("&gt; ")
                else line + ("<br>" if i < len(lines) - 1 else "")
                for i, line in enumerate(lines)
            )
        else:
            rich = "<br>".join(lines)
        restore = re.compile("\ue000(\\d+)\ue001")
        plain = restore.sub(lambda m: tokens[int(m.group(1))][0], plain)
        rich = restore.sub(lambda m: tokens[int(m.group(1))][1], rich)
        return plain, rich, formatted

    def _tokens_plain(self, text: str) -> str:
        return html.unescape(self._TOKEN.sub(lambda m: self._token(m.group(1))[0], text))

    def _token(self, inner: str) -> tuple[str, str, bool]:
        """One ``<…>`` token: (plain, html, is formatting)."""
        target, _, label = inner.partition("|")
        target, label = html.unescape(target), html.unescape(label)
        if target.startswith("@"):
            name = self.users.get(target[1:]) or label or target[1:]
            text = f"@{name}"
            return text, html.escape(text, quote=False), False
        if target.startswith("#"):
            name = label or self.channels.get(target[1:]) or target[1:]
            text = f"#{name}"
            return text, html.escape(text, quote=False), False
        if target.startswith("!"):
            word = target[1:].split("^", 1)[0]
            if word in ("here", "channel", "everyone"):
                text = f"@{word}"
            else:
                text = label or f"@{word}"
            return text, html.escape(text, quote=False), False
        bare = target.removeprefix("mailto:")
        shown = label or bare
        link = f'<a href="{html.escape(target)}">{html.escape(shown, quote=False)}</a>'
        plain = shown if shown in (target, bare) else f"{shown} ({target})"
        return plain, link, True


# ---------------------------------------------------------------- archive access
