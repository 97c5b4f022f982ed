"""Benchmark: CPU per record of faust's per-event path vs the pipeline's batch intake.

Both paths run the same faust app (PipelineApp, FAUST_SETTINGS, fast delivery,
shortened fetch wait) over the same backlog on the embedded broker, with an
agent that does nothing but read what ``Runtime.handle`` reads of each record
and count:

- ``events``: the former agent body, ``stream.take_events(5000, within=0.02)``
  on a plain faust topic, batches shielded, acked by take_events;
- ``batches``: ``pipeline.faust_compat.consume_batches`` on an ``IntakeTopic``.

Each run is a fresh worker process in a fresh consumer group reading the whole
backlog (published once, before the first run). The worker reads its own CPU
time (utime + stime from /proc/self/stat, all threads) when its partitions are
assigned (before any fetch: faust pauses them until recovery resumes the
streams) and when it has counted every record; the difference divided by the
record count is the figure. Runs alternate between the two paths, so both see
the same machine load on average; the median is reported.

    .venv/bin/python bench/bench_intake.py [--records 100000] [--runs 3] [--partitions 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("events", "batches")


def cpu_ticks() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# ---------------------------------------------------------------- worker side


def run_worker(mode: str) -> None:
    """The faust worker of one run (a subprocess); writes ``<ticks> <records>`` to BENCH_RESULT."""
    import faust

    from pipeline import app as pipeline_app
    from pipeline import faust_compat

    env = os.environ
    topics = env["BENCH_TOPICS"].split(",")
    partitions = int(env["BENCH_PARTITIONS"])
    target = int(env["BENCH_TARGET"])
    app = pipeline_app.PipelineApp(
        env["BENCH_GROUP"],
        broker=f"kafka://{env['BENCH_BOOTSTRAP']}",
        topic_partitions=partitions,
        datadir=env["BENCH_DATADIR"],
        **pipeline_app.FAUST_SETTINGS,
    )
    state: dict[str, Any] = {"count": 0, "cpu0": None}

    async def handle(records: Any) -> None:
        # What Runtime.prepare reads of every record (faust Events carry the
        # Message; the intake hands the Messages on directly).
        for record in records:
            msg = getattr(record, "message", record)
            _ = (msg.topic, msg.partition, msg.offset, msg.value, msg.key)
        state["count"] += len(records)
        if state["count"] >= target and state["cpu0"] is not None:
            # A file, not stdout: faust's worker redirects stdout into its log.
            Path(env["BENCH_RESULT"]).write_text(f"{cpu_ticks() - state['cpu0']} {state['count']}")
            state["cpu0"] = None

    if mode == "events":
        source = app.topic(
            *topics,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=partitions,
        )

        @app.agent(source, name="count")
        async def count(stream: faust.StreamT) -> None:
            # The agent body before consume_batches (pipeline/faust_compat.py).
            async for events in stream.take_events(5000, within=0.02):
                task = asyncio.ensure_future(handle(events))
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    await task
                    raise

    else:
        source = faust_compat.intake_topic(app, topics, partitions)

        @app.agent(source, name="count")
        async def count(stream: faust.StreamT) -> None:
            await faust_compat.consume_batches(app, stream, handle)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
        faust_compat.shorten_fetch_wait(app)
        faust_compat.fast_delivery(app)
        if assigned and state["count"] == 0:
            state["cpu0"] = cpu_ticks()

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


# ---------------------------------------------------------------- bench side


async def publish(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer

    from tests.pipeline_support import BASE_TS, msg
    from topics.codec import encode

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = []
        for i in range(n):
            portal = f"bench{i % 1000:05d}"
            value = encode(msg(portal, f"m{i:07d}", BASE_TS + i))
            futures.append(await producer.send(topic, value, key=f"testnet:{portal}".encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def one_run(
    mode: str, env: dict[str, str], records: int, workdir: Path, i: int, profile: bool = False
) -> float:
    """CPU microseconds per record of one worker run."""
    result = workdir / f"{mode}-{i}.result"
    log = workdir / f"{mode}-{i}.log"
    env = {
        **env,
        "BENCH_GROUP": f"bench-intake-{uuid.uuid4().hex[:8]}",
        "BENCH_RESULT": str(result),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", mode],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        spy = None
        if profile:  # sampling slows the worker: compare the profiles, not these figures
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--format",
                    "raw",
                    "-r",
                    "250",
                    "-o",
                    str(workdir / f"{mode}-{i}.pyspy"),
                    "--pid",
                    str(proc.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 300
            while not result.exists() or not result.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{mode} worker did not finish; log: {log}")
                time.sleep(0.1)
            ticks, counted = map(int, result.read_text().split())
            return ticks / os.sysconf("SC_CLK_TCK") / counted * 1e6
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                spy.wait(30)
            proc.kill()
            proc.wait()


async def main(args: argparse.Namespace) -> None:
    from backflow.stack.kafka import EmbeddedKafka

    workdir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    kafka = EmbeddedKafka()
    prefix = f"intake{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}.history", f"{prefix}.live", f"{prefix}.portal-events"]
    try:
        for topic in topics:
            kafka.create_topic(topic, args.partitions)
        await publish(kafka.bootstrap, topics[0], args.records)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BENCH_BOOTSTRAP": kafka.bootstrap,
            "BENCH_TOPICS": ",".join(topics),
            "BENCH_PARTITIONS": str(args.partitions),
            "BENCH_TARGET": str(args.records),
            "BENCH_DATADIR": str(workdir),
        }
        results: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.runs):
            for mode in MODES:
                results[mode].append(one_run(mode, env, args.records, workdir, i, args.profile))
                print(f"run {i + 1} {mode:8s} {results[mode][-1]:6.1f} us/record", flush=True)
    finally:
        kafka.close()
    if args.profile:
        print(f"profiles: {workdir}/*.pyspy")
    print(f"records: {args.records} over {args.partitions} partitions, {args.runs} runs per path")
    print("worker CPU per record (median; all runs):")
    for mode in MODES:
        runs = ", ".join(f"{v:.1f}" for v in results[mode])
        print(f"  {mode:8s} {statistics.median(results[mode]):6.1f} us  ({runs})")
    saved = statistics.median(results["events"]) - statistics.median(results["batches"])
    print(f"saved by batches: {saved:.1f} us per record")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per path")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="py-spy raw profiles in the workdir")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.argv[1:] = []  # faust's Worker reads the command line too
        run_worker(args.worker)  # runs its own event loop
    else:
        asyncio.run(main(args))
