"""whatsapp-history-blob: raw HistorySync protobuf files, zlib-compressed or not."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from connectors.conformance import assert_streaming_memory, by_id, check_source, collect, messages
from connectors.source import SourceError
from connectors.sources.whatsapp_history_blob import WhatsAppHistoryBlobSource
from tests.wa_bridge import (
    ALICE,
    BOB,
    CAROL,
    GROUP,
    OWN,
    T0,
    history_sync,
    msg,
    web_message,
)

OWN_JID = f"{OWN}@s.whatsapp.net"
ALICE_LID = "777888@lid"


def sample_blob() -> bytes:
    quote = msg("ContextInfo", stanza_id="G1", participant=BOB)
    group = [
        web_message(GROUP, "G1", T0, participant=BOB, text="first"),
        # Later than its newer neighbour: clamped to it, as mautrix does.
        web_message(
            GROUP,
            "G2",
            T0 + 500,
            participant=CAROL,
            extended_text=msg("ExtendedTextMessage", text="a reply", context_info=quote),
        ),
        web_message(
            GROUP, "G3", T0 + 100, from_me=True, text="mine", reactions=[(False, BOB, "👍")]
        ),
    ]
    dm = [
        web_message(ALICE, "A1", T0 + 10, text="hi", push_name="Alice P."),
        web_message(ALICE, "A2", T0 + 20, from_me=True, text="hello"),
    ]
    return history_sync(
        [(GROUP, group, {"name": "The Group", "last_msg_timestamp": T0 + 999}), (ALICE, dm, {})],
        pushnames=[(BOB, "Bob Push"), (CAROL, "Carol Push")],
        lid_map=[(ALICE, ALICE_LID)],
        sync_type=2,
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compressed", [True, False])
def test_blob_conforms(tmp_path: Path, compressed: bool) -> None:
    data = sample_blob()
    path = write(tmp_path / "sync.bin", zlib.compress(data) if compressed else data)
    report = check_source(
        lambda: WhatsAppHistoryBlobSource(path, {"own_jid": OWN}),
        expected_kinds={"text", "reaction"},
        allow_rejected=False,
    )
    got = by_id(report.records)
    portals = {r.portal: r.name for r in report.records if type(r).__name__ == "PortalInfo"}
    # The DM moved to Alice's LID (the blob maps her number), as the bridge does.
    assert portals == {GROUP: "The Group", ALICE_LID: "+15550000002"}
    ranks = {r.portal: r.last_activity_ts for r in report.records if hasattr(r, "last_activity_ts")}
    assert ranks == {GROUP: (T0 + 999) * 1000, ALICE_LID: None}
    first = got[(f"{GROUP}:{BOB}:G1", 0)]
    assert first.sender.name == "Bob Push"
    reply = got[(f"{GROUP}:{CAROL}:G2", 0)]
    assert reply.ts == (T0 + 100) * 1000 and reply.reply_to == f"{GROUP}:{BOB}:G1"
    assert report.stats["timestamps_clamped"] == 1 and report.stats["sync_type_2"] == 1
    mine = got[(f"{GROUP}:{OWN_JID}:G3", 0)]
    assert mine.content.body == "mine"
    assert got[(f"{GROUP}:{OWN_JID}:G3:reaction:{BOB}", 0)].content.key == "👍"
    assert got[(f"{ALICE_LID}:{ALICE_LID}:A1", 0)].sender.id == "lid-777888"
    # Oldest first in every conversation (the blob has them newest first).
    assert [m.id.split(":", 2)[2] for m in messages(report.records)] == [
        "G1",
        "G2",
        "G3",
        f"G3:reaction:{BOB}",
        "A1",
        "A2",
    ]


def test_needs_the_own_jid(tmp_path: Path) -> None:
    path = write(tmp_path / "sync.bin", sample_blob())
    with pytest.raises(SourceError, match="own_jid"):
        list(WhatsAppHistoryBlobSource(path).read())


def test_damaged_blobs(tmp_path: Path) -> None:
    # Not a blob at all: one rejection naming the file.
    junk = write(tmp_path / "junk.bin", b"\x07\x07\x07 definitely not protobuf")
    records, rejected = collect(WhatsAppHistoryBlobSource(junk, {"own_jid": OWN}))
    assert records == [] and len(rejected) == 1 and rejected[0].where.startswith("junk.bin byte")
    assert "not a HistorySync blob from here" in rejected[0].reason
    # A conversation that is garbage between two good ones: one rejection, the rest flows.
    good = history_sync([(ALICE, [web_message(ALICE, "A1", T0, text="one")], {})])
    bad_conv = bytes([0x12, 6]) + b"\xff\xff\xff\xff\xff\xff"
    tail = history_sync([(BOB, [web_message(BOB, "B1", T0, text="two")], {})])
    mixed = write(tmp_path / "mixed.bin", zlib.compress(good + bad_conv + tail))
    records, rejected = collect(WhatsAppHistoryBlobSource(mixed, {"own_jid": OWN}))
    assert [m.content.body for m in messages(records)] == ["one", "two"]
    assert len(rejected) == 1 and rejected[0].where.startswith("mixed.bin conversation 2")
    assert "not a Conversation" in rejected[0].reason
    # A truncated zlib stream: what came before the cut is imported, the rest is one rejection.
    noise = [web_message(ALICE, f"R{i}", T0 + i, text=os.urandom(64).hex()) for i in range(300)]
    whole = zlib.compress(history_sync([(ALICE, noise, {})]) + tail)
    cut = write(tmp_path / "cut.bin", whole[: len(whole) - 40])
    records, rejected = collect(WhatsAppHistoryBlobSource(cut, {"own_jid": OWN}))
    assert [m.id.rsplit(":", 1)[1] for m in messages(records)] == [f"R{i}" for i in range(300)]
    assert len(rejected) == 1 and "rest not read" in rejected[0].reason
    # A bad message inside a good conversation: one rejection naming conversation and message.
    zero = history_sync(
        [
            (
                ALICE,
                [web_message(ALICE, "Z", 0, text="x"), web_message(ALICE, "A9", T0, text="ok")],
                {},
            )
        ]
    )
    records, rejected = collect(
        WhatsAppHistoryBlobSource(write(tmp_path / "z.bin", zero), {"own_jid": OWN})
    )
    assert [m.content.body for m in messages(records)] == ["ok"]
    assert rejected[0].where == "z.bin conversation 1 (byte 2) message 2 (Z)"


def test_folder_of_blobs_reads_only_inside(tmp_path: Path) -> None:
    folder = tmp_path / "blobs"
    folder.mkdir()
    write(
        folder / "1.bin",
        zlib.compress(history_sync([(ALICE, [web_message(ALICE, "A1", T0, text="one")], {})])),
    )
    write(folder / "2.bin", history_sync([(BOB, [web_message(BOB, "B1", T0, text="two")], {})]))
    outside = write(
        tmp_path / "secret.bin",
        history_sync([(CAROL, [web_message(CAROL, "C1", T0, text="secret")], {})]),
    )
    (folder / "3.bin").symlink_to(outside)
    records, rejected = collect(WhatsAppHistoryBlobSource(folder, {"own_jid": OWN}))
    assert [m.content.body for m in messages(records)] == ["one", "two"]


def test_blob_memory_is_flat(tmp_path: Path) -> None:
    def make(n: int) -> WhatsAppHistoryBlobSource:
        convs = []
        for c in range(n // 100):
            chat = f"1555{c:07d}@s.whatsapp.net"
            convs.append(
                (
                    chat,
                    [
                        web_message(chat, f"M{i}", T0 + i, text=f"message {i} " * 4)
                        for i in range(100)
                    ],
                    {},
                )
            )
        path = write(tmp_path / f"big{n}.bin", zlib.compress(history_sync(convs)))
        return WhatsAppHistoryBlobSource(path, {"own_jid": OWN})

    assert_streaming_memory(make, 2_000, 20_000)


def test_zlib_bomb_costs_one_step(tmp_path: Path) -> None:
    """200 MB of one conversation field from a 200 KB file: skipped in chunks, one rejection."""
    from tests.helpers import traced_peak

    size = 200 * 1024 * 1024
    varint = bytearray()
    n = size
    while n >= 0x80:
        varint.append(n & 0x7F | 0x80)
        n >>= 7
    varint.append(n)
    packer = zlib.compressobj(9)
    parts = [packer.compress(bytes([0x12]) + bytes(varint))]
    zeros = bytes(1024 * 1024)
    parts += [packer.compress(zeros) for _ in range(size // len(zeros))]
    parts.append(
        packer.compress(history_sync([(ALICE, [web_message(ALICE, "A1", T0, text="after")], {})]))
    )
    parts.append(packer.flush())
    bomb = write(tmp_path / "bomb.bin", b"".join(parts))
    assert bomb.stat().st_size < 1024 * 1024
    (records, rejected), peak = traced_peak(
        lambda: collect(WhatsAppHistoryBlobSource(bomb, {"own_jid": OWN}))
    )
    assert [m.content.body for m in messages(records)] == ["after"]
    assert len(rejected) == 1 and f"{size} bytes, over" in rejected[0].reason
    assert peak < 8 * 1024 * 1024
