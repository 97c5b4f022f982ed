"""Benchmark: `backflow import jsonl` end to end vs a raw aiokafka producer.

Both publish the same records to the same embedded broker in one run:

- ``import``: ``connectors.publish.publish_source`` over a JSONL file, which
  reads and parses each line, validates the record with the codec, encodes it,
  publishes it keyed by portal and adds the per-portal markers;
- ``raw``: one ``AIOKafkaProducer`` (the same producer settings as
  ``topics.bus.producer``) sending the already-encoded records, nothing else.

Rounds alternate, each into fresh topics; the ratio import/raw (messages per
second) is reported per round and as the median. Issue target: >= 0.5.

    .venv/bin/python bench/bench_import.py [--messages 100000] [--portals 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backflow.stack.kafka import EmbeddedKafka  # noqa: E402
from connectors.publish import check_record, publish_source  # noqa: E402
from connectors.sources.jsonl import JsonlSource  # noqa: E402
from topics import bus  # noqa: E402
from topics.provision import provision  # noqa: E402
from topics.settings import load  # noqa: E402

BASE_TS = 1_700_000_000_000


def write_jsonl(path: Path, messages: int, portals: int) -> None:
    with path.open("wb") as f:
        for p in range(portals):
            f.write(
                orjson.dumps(
                    {"type": "portal", "network": "bench", "portal": f"p{p}", "name": f"Portal {p}"}
                )
                + b"\n"
            )
        for n in range(messages):
            p = n % portals
            f.write(
                orjson.dumps(
                    {
                        "type": "message",
                        "network": "bench",
                        "portal": f"p{p}",
                        "id": f"m{n}",
                        "sender": {"id": f"u{n % 7}", "name": f"User {n % 7}"},
                        "ts": BASE_TS + n * 10,
                        "content": {"kind": "text", "body": f"message number {n} " + "x" * 60},
                    }
                )
                + b"\n"
            )


def encoded(path: Path) -> list[tuple[bytes, bytes]]:
    """What the import publishes, encoded up front for the raw producer."""
    out = []
    for item in JsonlSource(path).read():
        record, data = check_record(item)  # type: ignore[arg-type]
        out.append((record.key.encode(), data))
    return out


async def run_import(settings, path: Path) -> float:
    started = time.perf_counter()
    summary = await publish_source(JsonlSource(path), settings)
    assert summary.rejected == 0, summary.reasons
    return time.perf_counter() - started


async def run_raw(settings, records: list[tuple[bytes, bytes]]) -> float:
    producer = bus.producer(settings)
    started = time.perf_counter()
    await producer.start()
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(settings.catalog.history, value, key=key))
            if len(pending) >= 2_000:  # the import's window
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--portals", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-import-"))
    path = workdir / "history.jsonl"
    write_jsonl(path, args.messages, args.portals)
    records = encoded(path)
    kafka = EmbeddedKafka()
    print(f"{args.messages} messages over {args.portals} portals, {path.stat().st_size:,} bytes")
    print(f"{'round':>5}  {'import msgs/s':>13}  {'raw msgs/s':>10}  {'ratio':>5}")
    ratios = []
    try:
        for n in range(args.rounds):
            rates = {}
            for mode in ("import", "raw") if n % 2 == 0 else ("raw", "import"):
                settings = load(env={}).with_overrides(
                    {
                        "kafka.bootstrap": kafka.bootstrap,
                        "kafka.topic_prefix": f"bench{uuid.uuid4().hex[:8]}",
                        "kafka.partitions": args.partitions,
                        "state_dir": str(workdir / "state"),
                    }
                )
                await provision(settings.catalog, embedded=kafka)
                seconds = await (
                    run_import(settings, path) if mode == "import" else run_raw(settings, records)
                )
                rates[mode] = args.messages / seconds
            ratios.append(rates["import"] / rates["raw"])
            print(f"{n:>5}  {rates['import']:>13,.0f}  {rates['raw']:>10,.0f}  {ratios[-1]:>5.2f}")
    finally:
        kafka.close()
    print(f"median ratio import/raw: {statistics.median(ratios):.2f} (target >= 0.5)")


if __name__ == "__main__":
    asyncio.run(main())
