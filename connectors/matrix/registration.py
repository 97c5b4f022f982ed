"""The appservice registration YAML: token, bot localpart and namespace prefixes.

The sink only needs literal prefixes: every ghost it registers and every alias
it creates must start with one, or the homeserver answers ``M_EXCLUSIVE``.
We derive them from the namespace regexes (``@_bf_.*:example.org`` -> ``_bf_``)
instead of asking the operator to repeat them in backflow's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Regex characters that end the literal prefix of a namespace regex.
_META = set(".^$*+?{}[]|()")


class RegistrationError(ValueError):
    """The registration file is missing, unreadable or unusable for the sink."""


@dataclass(frozen=True)
class Registration:
    as_token: str
    sender_localpart: str
    user_prefix: str  # ghost localparts start with this
    alias_prefix: str  # portal alias localparts start with this
    rate_limited: bool | None = None

    def __repr__(self) -> str:  # never show the token, even in debug output
        return (
            f"Registration(sender_localpart={self.sender_localpart!r}, "
            f"user_prefix={self.user_prefix!r}, alias_prefix={self.alias_prefix!r})"
        )


def literal_prefix(regex: str, sigil: str) -> str:
    """The literal localpart prefix of a namespace regex such as ``@_bf_.*:server``.

    Handles a leading ``^``, the sigil (``@`` or ``#``, possibly escaped) and
    backslash escapes (``\\.`` is a literal dot). Stops at the first regex
    metacharacter or at ``:``.
    """
    text = regex.removeprefix("^")
    if text.startswith("\\" + sigil):
        text = text[2:]
    elif text.startswith(sigil):
        text = text[1:]
    else:
        raise RegistrationError(f"namespace regex {regex!r} does not start with {sigil!r}")
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt.isalnum():  # \d, \w ...: a character class, not a literal
                break
            out.append(nxt)
            i += 2
            continue
        if ch in _META or ch == ":":
            # "x?" or "x*" makes the previous character optional: not part of the prefix
            if ch in "?*{" and out:
                out.pop()
            break
        out.append(ch)
        i += 1
    return "".join(out)


def _namespace_prefix(namespaces: dict[str, Any], kind: str, sigil: str, path: Path) -> str:
    entries = namespaces.get(kind) or []
    if not isinstance(entries, list) or not entries:
        raise RegistrationError(f"{path}: namespaces.{kind} is empty; the sink needs one")
    # Prefer an exclusive namespace: only there are our ids safe from others.
    entries = sorted(entries, key=lambda e: not (isinstance(e, dict) and e.get("exclusive")))
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("regex"), str):
            prefix = literal_prefix(entry["regex"], sigil)
            if prefix:
                return prefix
    raise RegistrationError(
        f"{path}: no namespaces.{kind} regex has a literal prefix (like '{sigil}_bf_.*')"
    )


def load_registration(path: str | Path | None) -> Registration:
    """Read and check a registration file; raise RegistrationError with one clear line."""
    if not path:
        raise RegistrationError(
            "no appservice registration configured: set appservice.registration "
            "(BACKFLOW_APPSERVICE_REGISTRATION) to the registration YAML path"
        )
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RegistrationError(f"cannot read registration {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RegistrationError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RegistrationError(f"{path}: expected a mapping")
    token = data.get("as_token")
    if not isinstance(token, str) or not token:
        raise RegistrationError(f"{path}: as_token is missing")
    localpart = data.get("sender_localpart")
    if not isinstance(localpart, str) or not localpart:
        raise RegistrationError(f"{path}: sender_localpart is missing")
    namespaces = data.get("namespaces")
    if not isinstance(namespaces, dict):
        raise RegistrationError(f"{path}: namespaces is missing")
    rate_limited = data.get("rate_limited")
    return Registration(
        as_token=token,
        sender_localpart=localpart,
        user_prefix=_namespace_prefix(namespaces, "users", "@", path),
        alias_prefix=_namespace_prefix(namespaces, "aliases", "#", path),
        rate_limited=rate_limited if isinstance(rate_limited, bool) else None,
    )
