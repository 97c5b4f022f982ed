"""Is this JSON shaped as the parser expects? Checked before an importer reads an entry.

Export files come from strangers: a number where a string belongs, an object
where a list does, nesting ten thousand levels deep. An importer describes the
entries it reads (a Slack message, a Telegram message, a channel) as a shape
and calls :func:`mismatch` first: the answer is None, or one reason naming the
field (``field 'reactions[0].users': expected a list, got integer``) for a
``Rejected``. The parser then only meets the types it was written for.

A shape is a type (``str``, ``int``, ``float``, ``bool``), a tuple of shapes
(any of them), a dict (an object whose listed keys, when present and not
null, have those shapes; other keys are ignored) or a one-element list
(a list whose items, null ones aside, have that shape). ``int`` never matches a
boolean; ``float`` matches any number; ``str`` never matches a string holding
NUL (no database or homeserver takes one).
"""

from __future__ import annotations

from typing import Any

# Deeper than any real export entry; deep enough that RecursionError is far off.
MAX_DEPTH = 32

_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {
        str: "string",
        int: "integer",
        float: "number",
        dict: "object",
        list: "list",
    }.get(type(value), type(value).__name__)


def _describe(shape: Any) -> str:
    if isinstance(shape, tuple):
        return " or ".join(_describe(s) for s in shape)
    if isinstance(shape, dict):
        return "an object"
    if isinstance(shape, list):
        return "a list"
    return _NAMES.get(shape, shape.__name__)


def _fits(value: Any, shape: type) -> bool:
    if shape is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if shape is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if shape is str:
        return isinstance(value, str) and "\0" not in value
    return isinstance(value, shape)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests lists/objects deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def mismatch(value: Any, shape: Any, path: str = "") -> str | None:
    """None when ``value`` has ``shape``; else the reason, naming the field."""
    if too_deep(value):
        return f"{_field(path) or 'entry'} nests deeper than {MAX_DEPTH} levels"
    return _mismatch(value, shape, path)


def _field(path: str) -> str:
    return f"field '{path}'" if path else ""


def _mismatch(value: Any, shape: Any, path: str) -> str | None:
    if isinstance(shape, tuple):
        reasons = [_mismatch(value, option, path) for option in shape]
        if None in reasons:
            return None
        # The one option of the value's kind explains best (a list item's field).
        alike = [r for o, r in zip(shape, reasons, strict=True) if _same_kind(value, o)]
        return alike[0] if len(alike) == 1 else _wrong(value, shape, path)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return _wrong(value, shape, path)
        for key, sub in shape.items():
            child = value.get(key)
            if child is None:
                continue
            reason = _mismatch(child, sub, f"{path}.{key}" if path else key)
            if reason is not None:
                return reason
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return _wrong(value, shape, path)
        for index, item in enumerate(value):
            if item is None:
                continue  # null items are skipped by the parsers (Telegram's deleted users)
            reason = _mismatch(item, shape[0], f"{path}[{index}]")
            if reason is not None:
                return reason
        return None
    return None if _fits(value, shape) else _wrong(value, shape, path)


def _same_kind(value: Any, shape: Any) -> bool:
    if isinstance(shape, dict):
        return isinstance(value, dict)
    if isinstance(shape, list):
        return isinstance(value, list)
    return False


def _wrong(value: Any, shape: Any, path: str) -> str:
    got = _typename(value)
    if isinstance(value, str) and "\0" in value:
        got = "a string with a NUL character"
    where = _field(path) or "entry"
    return f"{where}: expected {_describe(shape)}, got {got}"
