"""The streaming reader's surrogate handling, across every way a file can be cut into reads."""

from __future__ import annotations

import io
import json
import random
import re

import pytest

from connectors.sources.stream import TextGuard, array_items

PIECES = ["a", "\\", '"', "\ud83d", "\ude00", "\ud800", "\udfff", "u", "d83d", "\U0001f600", "é"]


def _expected(text: str) -> str:
    """What a reader should see: a high and low surrogate side by side are one
    character (as yajl reads them); every other surrogate becomes U+FFFF."""
    paired = re.sub(
        "[\ud800-\udbff][\udc00-\udfff]",
        lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"),
        text,
    )
    return re.sub("[\ud800-\udfff]", "\uffff", paired)


class Chunked(io.RawIOBase):
    """Hands out ``data`` in the read sizes a seeded random picks (1 to 13 bytes)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data, self.at, self.rng = data, 0, random.Random(seed)

    def read(self, size: int = -1) -> bytes:
        n = self.rng.randint(1, 13)
        chunk = self.data[self.at : self.at + n]
        self.at += len(chunk)
        return chunk


@pytest.mark.parametrize("seed", range(40))
def test_lone_surrogates_are_marked_wherever_the_reads_cut(seed: int) -> None:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) for _ in range(30)]
    # json.dumps writes a pair for each astral character and keeps lone
    # surrogates as single escapes, as Slack's exports do.
    data = json.dumps(texts).encode()
    got = list(array_items(Chunked(data, seed)))
    assert got == [_expected(t) for t in texts]


def test_escaped_backslash_before_u_is_text() -> None:
    data = b'["\\\\ud800", "\\\\\\ud800x", "\\\\\\\\ud800"]'
    assert list(array_items(io.BytesIO(data))) == ["\\ud800", "\\\uffffx", "\\\\ud800"]


def test_a_high_surrogate_at_the_end_of_the_file_is_lone() -> None:
    reader = TextGuard(io.BytesIO(b"\\ud83d"))
    assert reader.read(3) + reader.read(3) + reader.read(3) == b"\\uffff"


RAW_PIECES = [b"a", "\u00e9".encode(), "\U0001f600".encode(), "\u20ac".encode(), b"\\\\"]
BAD = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf0\x9f"]  # invalid, cut, surrogate, cut


@pytest.mark.parametrize("seed", range(20))
def test_bytes_that_are_not_utf8_are_marked_wherever_the_reads_cut(seed: int) -> None:
    rng = random.Random(seed)
    strings, bad = [], []
    for _ in range(30):
        parts = [rng.choice(RAW_PIECES) for _ in range(rng.randint(0, 8))]
        broken = rng.random() < 0.3
        if broken:
            parts.insert(rng.randint(0, len(parts)), rng.choice(BAD))
        strings.append(b"".join(parts))
        bad.append(broken)
    data = b"[" + b",".join(b'"' + s + b'"' for s in strings) + b"]"
    got = list(array_items(Chunked(data, seed)))
    assert len(got) == len(strings)
    for value, raw, broken in zip(got, strings, bad, strict=True):
        if broken:
            assert "\uffff" in value
        else:
            assert value == raw.decode().replace("\\\\", "\\")
