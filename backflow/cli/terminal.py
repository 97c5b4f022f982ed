"""Text from strangers, made safe for the operator's terminal.

Portal ids, names, bodies, file names and error texts come from exports and
live clients. Printed raw, an escape sequence in them could move the cursor,
retitle the window, hide a line or forge one ("\\n2024-01-01 @admin: …"), and
bidirectional overrides could reorder what the operator reads.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the bidi embedding/override/isolate marks.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, str(text))
