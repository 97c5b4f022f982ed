"""A minimal protobuf wire decoder: fields of one message, nothing generated.

Signal's backup frames are small protobuf messages; decoding them needs
varints, fixed 32/64-bit values and length-delimited bytes, no schema
compiler. Damage (a truncated varint, a length past the end, groups) raises
:class:`WireError`, which callers turn into one clear reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a protobuf message."""


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field: int for numbers, bytes for LEN."""
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = varint(data, pos)
            yield number, wire, value
        elif wire == LEN:
            size, pos = varint(data, pos)
            if pos + size > len(data):
                raise WireError("length past the end of the message")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > len(data):
                raise WireError("truncated fixed-width field")
            yield number, wire, int.from_bytes(data[pos : pos + width], "little")
            pos += width
        else:
            raise WireError(f"unsupported wire type {wire}")


def message(data: bytes) -> dict[int, list[int | bytes]]:
    """Every field of a message by number (repeated fields keep their order)."""
    out: dict[int, list[int | bytes]] = {}
    for number, _wire, value in fields(data):
        out.setdefault(number, []).append(value)
    return out


def first(msg: dict[int, list[int | bytes]], number: int, default: int | bytes | None = None):
    """The last value of a singular field (protobuf: the last one wins), or ``default``."""
    values = msg.get(number)
    return values[-1] if values else default


def as_double(value: int) -> float:
    return struct.unpack("<d", value.to_bytes(8, "little"))[0]


def as_signed(value: int) -> int:
    """A uint64 read as int64 (Signal writes SQL integers as uint64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def text(value: int | bytes | None) -> str | None:
    if not isinstance(value, bytes):
        return None
    return value.decode("utf-8", errors="replace")
