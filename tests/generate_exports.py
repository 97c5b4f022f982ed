"""Write synthetic exports of N messages in each supported format.

Used by the streaming-memory checks (a 10x larger input must not need 10x the
memory) and handy for benchmarks:

    python tests/generate_exports.py whatsapp 200000 /tmp/exports

Files are written line by line / day by day, so generating is cheap in memory
too. Content is deterministic for a given N.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

START = datetime(2023, 1, 1, tzinfo=UTC)
SENDERS = ("Alice", "Bob", "Carol", "Dave", "Eve")


def _text(i: int) -> str:
    return f"message number {i} with some words to make it look like chat"


def write_whatsapp(folder: Path, n: int) -> Path:
    """An Android 24h day-first export: multi-line every 10th, a system line every 100th."""
    path = folder / f"WhatsApp Chat with Generated {n}.txt"
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            when = (START + timedelta(minutes=i)).strftime("%d/%m/%Y, %H:%M")
            if i % 100 == 99:
                out.write(f"{when} - Alice added User{i}\n")
            elif i % 10 == 9:
                out.write(f"{when} - {SENDERS[i % 5]}: {_text(i)}\nsecond line\nthird line\n")
            else:
                out.write(f"{when} - {SENDERS[i % 5]}: {_text(i)}\n")
    return path


def write_slack(folder: Path, n: int, per_day: int = 100) -> Path:
    """A zipped workspace export: two channels, ``per_day`` messages per channel per day."""
    path = folder / f"slack-{n}.zip"
    users = [{"id": f"U{k}", "name": s.lower(), "real_name": s} for k, s in enumerate(SENDERS)]
    channels = [
        {"id": f"C{k}", "name": f"chan{k}", "members": [u["id"] for u in users]} for k in (0, 1)
    ]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("users.json", json.dumps(users))
        zf.writestr("channels.json", json.dumps(channels))
        written = 0
        day = 0
        while written < n:
            for channel in channels:
                batch = []
                for k in range(min(per_day, n - written)):
                    ts = f"{int((START + timedelta(days=day)).timestamp()) + k * 60}.{k:06d}"
                    msg = {
                        "type": "message",
                        "user": f"U{k % 5}",
                        "text": f"*{_text(k)}*",
                        "ts": ts,
                    }
                    if k % 10 == 0:
                        msg["reactions"] = [{"name": "thumbsup", "users": ["U1"], "count": 1}]
                    batch.append(msg)
                written += len(batch)
                if batch:
                    date = (START + timedelta(days=day)).strftime("%Y-%m-%d")
                    zf.writestr(f"{channel['name']}/{date}.json", json.dumps(batch))
            day += 1
    return path


def write_telegram(folder: Path, n: int) -> Path:
    """A single-chat result.json with entities and replies."""
    export = folder / f"telegram-{n}"
    export.mkdir(parents=True, exist_ok=True)
    path = export / "result.json"
    with path.open("w", encoding="utf-8") as out:
        out.write('{"name": "Generated", "type": "private_group", "id": 777, "messages": [\n')
        for i in range(n):
            msg = {
                "id": i + 1,
                "type": "message",
                "date_unixtime": str(int(START.timestamp()) + i * 60),
                "from": SENDERS[i % 5],
                "from_id": f"user{i % 5}",
                "text_entities": [
                    {"type": "plain", "text": _text(i) + " "},
                    {"type": "bold", "text": "bold"},
                ],
            }
            if i % 7 == 6:
                msg["reply_to_message_id"] = i
            out.write(("," if i else "") + json.dumps(msg) + "\n")
        out.write("]}\n")
    return path


def write_jsonl(folder: Path, n: int) -> Path:
    path = folder / f"records-{n}.jsonl"
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps({"type": "portal", "network": "demo", "portal": "p", "name": "P"}))
        out.write("\n")
        for i in range(n):
            record = {
                "type": "message",
                "network": "demo",
                "portal": "p",
                "id": f"m{i}",
                "sender": {"id": SENDERS[i % 5].lower()},
                "ts": int(START.timestamp() * 1000) + i,
                "content": {"kind": "text", "body": _text(i)},
            }
            out.write(json.dumps(record) + "\n")
    return path


def write_csv(folder: Path, n: int) -> Path:
    path = folder / f"history-{n}.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("portal,id,sender,ts,body\n")
        for i in range(n):
            ts = int(START.timestamp() * 1000) + i * 1000
            out.write(f'room{i % 3},m{i},{SENDERS[i % 5]},{ts},"{_text(i)}, quoted"\n')
    return path


def write_signal_export(folder: Path, n: int) -> Path:
    """A Signal plaintext export folder: a DM and a group, n text items in main.jsonl."""
    import base64
    import uuid

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    root = folder / f"signal-export-{n}"
    root.mkdir(parents=True, exist_ok=True)
    frames = [
        {"recipient": {"id": "1", "self": {}}},
        {"recipient": {"id": "2", "contact": {"aci": b64(uuid.UUID(int=2).bytes)}}},
        {"recipient": {"id": "3", "contact": {"aci": b64(uuid.UUID(int=3).bytes)}}},
        {"recipient": {"id": "4", "group": {"masterKey": b64(bytes(32))}}},
        {"chat": {"id": "10", "recipientId": "2"}},
        {"chat": {"id": "11", "recipientId": "4"}},
    ]
    start = int(START.timestamp() * 1000)
    with (root / "main.jsonl").open("w", encoding="utf-8") as out:
        out.write(json.dumps({"version": "1", "backupTimeMs": str(start)}) + "\n")
        for frame in frames:
            out.write(json.dumps(frame) + "\n")
        for i in range(n):
            chat, author = (10, 2) if i % 2 else (11, 3)
            item = {
                "chatId": str(chat),
                "authorId": str(author),
                "dateSent": str(start + i),
                "incoming": {},
                "standardMessage": {"text": {"body": _text(i)}},
            }
            out.write(json.dumps({"chatItem": item}) + "\n")
    return root


def write_signal_backup(folder: Path, n: int) -> Path:
    """A Signal .backup of n messages (passphrase tests.signal_backup_writer.PASSPHRASE)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too
    from tests.signal_backup_writer import BackupWriter, write_new_layout

    path = folder / f"signal-{n}.backup"
    with path.open("wb") as out:
        writer = BackupWriter(out)
        write_new_layout(writer, extra=n)
        writer.end()
    return path


def write_signal_backup_v2(folder: Path, n: int) -> Path:
    """A SignalBackups/ folder of n messages (key tests.signal_v2_writer.RECOVERY_KEY)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too
    from tests.signal_helpers import T0, recipients_and_chats
    from tests.signal_v2_writer import write_v2

    def frames():
        yield from recipients_and_chats()
        for i in range(n):
            chat, author = ("10", "2") if i % 2 else ("11", "3")
            text = {"text": {"body": _text(i)}}
            item = {"chatId": chat, "authorId": author, "dateSent": str(T0 + i)}
            yield {"chatItem": {**item, "standardMessage": text}}

    return write_v2(folder, frames()) / "signal-backup-2026-05-01-10-00-00" / "main"
def write_whatsapp_history(folder: Path, n: int, per_chat: int = 1000) -> Path:
    """A mautrix-whatsapp (bridgev2) SQLite database: groups of ``per_chat`` rows, 5 senders."""
    import sqlite3

    if str(Path(__file__).resolve().parent.parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.wa_bridge import BRIDGEV2_DDL, OWN, WHATSMEOW_DDL, encode, web_message

    path = folder / f"whatsapp-{n}.db"
    base = int(START.timestamp())
    with sqlite3.connect(path) as conn:
        conn.executescript(BRIDGEV2_DDL.format(blob="BLOB") + WHATSMEOW_DDL)
        rows: list[tuple] = []
        for i in range(n):
            chat = f"1203630{i // per_chat:011d}@g.us"
            if i % per_chat == 0:
                conn.execute(
                    "INSERT INTO whatsapp_history_sync_conversation (bridge_id, user_login_id, "
                    "chat_jid, last_message_timestamp) VALUES ('whatsapp', ?, ?, ?)",
                    (OWN, chat, base + i + per_chat),
                )
            sender = f"155500{i % 5:05d}@s.whatsapp.net"
            info = web_message(chat, f"M{i}", base + i, participant=sender, text=_text(i))
            rows.append(("whatsapp", OWN, chat, sender, f"M{i}", base + i, encode(info), base))
            if len(rows) >= 10_000:
                conn.executemany(
                    "INSERT INTO whatsapp_history_sync_message VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                rows.clear()
        conn.executemany(
            "INSERT INTO whatsapp_history_sync_message VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
        )
    conn.close()
    return path


WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "whatsapp": write_whatsapp,
    "slack": write_slack,
    "telegram": write_telegram,
    "jsonl": write_jsonl,
    "csv": write_csv,
    "signal-export": write_signal_export,
    "signal-backup": write_signal_backup,
    "signal-backup-v2": write_signal_backup_v2,
    "whatsapp-history": write_whatsapp_history,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in WRITERS:
        print(f"usage: generate_exports.py {{{'|'.join(WRITERS)}}} N OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print(WRITERS[argv[0]](out, int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
