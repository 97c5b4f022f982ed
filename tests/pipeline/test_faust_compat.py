"""pipeline/faust_compat.py: each patch fails here when the upstream code it replaces changes.

Pinned by hashes of the upstream source (faust-streaming 0.15.3, aiokafka
0.14.0) and by the attributes and signatures each patch reads. When one
fails, read the upstream change, re-check the patch named in the message
(the module docstring says what it replaces and why), then update the pin.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import inspect
import textwrap
from pathlib import Path
from typing import Any

import faust
import faust.topics
import faust.transport.consumer as faust_consumer
import faust.transport.drivers.aiokafka as faust_aiokafka
import pytest
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer import group_coordinator as gc
from faust.types import tuples
from mode.utils.queues import ThrowableQueue

from pipeline import faust_compat as compat


def digest(obj: Any) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(obj)).encode()).hexdigest()[:16]


def pinned(obj: Any, expected: str, patch: str) -> None:
    name = getattr(obj, "__qualname__", repr(obj))
    assert digest(obj) == expected, f"upstream changed: re-check patch {patch} ({name})"


def source_of(obj: Any) -> str:
    return inspect.getsource(obj)


# ---------------------------------------------------------------- the version check


def test_installed_versions_are_the_supported_ones() -> None:
    compat.check_versions()  # what import did; raises otherwise
    assert importlib.metadata.version("faust-streaming").startswith("0.15.")
    assert importlib.metadata.version("aiokafka").startswith("0.14.")


@pytest.mark.parametrize(
    "installed",
    [
        {"faust-streaming": "0.16.0", "aiokafka": "0.14.0"},
        {"faust-streaming": "0.15.3", "aiokafka": "0.15.1"},
        {"faust-streaming": "0.15.3", "aiokafka": None},
    ],
)
def test_other_versions_are_refused_naming_the_supported_ones(
    monkeypatch: pytest.MonkeyPatch, installed: dict[str, str | None]
) -> None:
    def version(dist: str) -> str:
        found = installed.get(dist)
        if found is None:
            raise importlib.metadata.PackageNotFoundError(dist)
        return found

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RuntimeError) as err:
        compat.check_versions()
    message = str(err.value)
    assert "faust-streaming 0.15.x" in message and "aiokafka 0.14.x" in message
    for dist, found in installed.items():  # and what is installed instead
        assert f"{dist} {found or 'not installed'}" in message


# ---------------------------------------------------------------- 1. shorten_fetch_wait


def test_fetch_wait_is_still_hard_coded_and_read_per_request() -> None:
    patch = "1 (shorten_fetch_wait)"
    # faust still hard-codes it (if it became a setting, use the setting instead).
    creating = source_of(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    assert "fetch_max_wait_ms=1500" in creating, f"upstream changed: re-check patch {patch}"
    pinned(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer, "c179c0bdb9755c3a", patch)
    # aiokafka keeps it in _fetch_max_wait_ms and reads it when building each request.
    assert "fetch_max_wait_ms" in inspect.signature(aiokafka_fetcher.Fetcher.__init__).parameters
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in source_of(
        aiokafka_fetcher.Fetcher.__init__
    ), f"upstream changed: re-check patch {patch}"
    pinned(aiokafka_fetcher.Fetcher._get_actions_per_node, "fd175a69d8d4f9b9", patch)
    # The path from faust's consumer to the fetcher.
    assert "self._consumer" in source_of(faust_aiokafka.AIOKafkaConsumerThread)
    assert "self._fetcher = " in source_of(compat_consumer_class())


def compat_consumer_class() -> type:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer


# ---------------------------------------------------------------- 2. fast_delivery


def test_fetch_loop_still_delivers_through_wait_first() -> None:
    patch = "2 (fast_delivery)"
    pinned(faust_consumer.Consumer._drain_messages, "8f35dd7a11144daa", patch)
    assert "await self.wait_first(\n" in source_of(faust_consumer.Consumer._drain_messages)
    params = inspect.signature(faust_consumer.Consumer.wait_first).parameters
    assert list(params) == ["self", "coros", "timeout"], f"upstream changed: re-check patch {patch}"
    assert params["coros"].kind is inspect.Parameter.VAR_POSITIONAL
    # _resume mirrors what asyncio's Task.__step does with a yielded future.
    assert hasattr(asyncio.Future(loop=asyncio.new_event_loop()), "_asyncio_future_blocking")


def test_fast_delivery_passes_other_calls_through_and_is_idempotent() -> None:
    calls: list[tuple[Any, ...]] = []

    async def original(*coros: Any, timeout: Any = None) -> str:
        calls.append((len(coros), timeout))
        for coro in coros:
            if asyncio.iscoroutine(coro):
                coro.close()
        return "faust"

    class FakeConsumer:
        wait_first = staticmethod(original)
        suspend_flow = asyncio.Event()

    class FakeApp:
        consumer = FakeConsumer()

    app: Any = FakeApp()
    compat.fast_delivery(app)
    patched = app.consumer.wait_first
    compat.fast_delivery(app)
    assert app.consumer.wait_first is patched

    async def main() -> None:
        done: list[int] = []

        async def deliver() -> None:
            done.append(1)

        async def suspend() -> None:
            await asyncio.sleep(10)

        # Completes without waiting: faust's wait_first is not called.
        assert await patched(deliver(), suspend()) is None
        assert done == [1] and calls == []
        # Any other shape goes to faust's.
        assert await patched(deliver(), suspend(), timeout=1.0) == "faust"
        assert calls == [(2, 1.0)]

    asyncio.run(main())


# ---------------------------------------------------------------- 3. IntakeTopic


def test_topic_decode_is_still_compiled_by_compile_decode(tmp_path: Path) -> None:
    patch = "3 (IntakeTopic._compile_decode)"
    pinned(faust.topics.Topic._compile_decode, "f30130922bceddf7", patch)
    assert "self._compile_decode()" in source_of(faust.topics.Topic.__init__), (
        f"upstream changed: re-check patch {patch}"
    )
    app = faust.App("compat-test", broker="memory://", datadir=str(tmp_path), autodiscover=False)
    topic = compat.intake_topic(app, ["a", "b"], 4)
    message = tuples.Message("a", 0, 7, 0.0, None, [], b"k", b"v", None)
    assert asyncio.run(topic.decode(message)) is message


# ---------------------------------------------------------------- 4. consume_batches / _ack_batch


def test_ack_bookkeeping_is_still_the_one_copied() -> None:
    patch = "4 (consume_batches/_ack_batch)"
    pinned(faust_consumer.Consumer.ack, "5548cf0f75843f73", patch)
    pinned(tuples.Message.ack, "3c9ee05236d3fe1f", patch)
    pinned(tuples.Message.on_final_ack, "6aed1b3faea17226", patch)
    init = source_of(faust_consumer.Consumer.__init__)
    for attr in ("_unacked_messages", "_acked", "_acked_index", "_committed_offset"):
        assert f"self.{attr} = " in init, f"upstream changed: re-check patch {patch} ({attr})"
    for attr in ("_n_acked", "_waiting_for_ack"):
        assert attr in faust_consumer.Consumer.__annotations__, f"re-check patch {patch} ({attr})"
    for slot in ("acked", "refcount", "tracked", "tp", "generation_id"):
        assert slot in tuples.Message.__slots__, f"upstream changed: re-check patch {patch}"
    assert "self._errors" in source_of(ThrowableQueue.__init__)
    # The generation check the stream does per record, done per batch.
    assigned = source_of(faust_aiokafka.ConsumerRebalanceListener.on_partitions_assigned)
    assert "app.consumer_generation_id = generation" in assigned
    assert "message.generation_id != self.app.consumer_generation_id" in source_of(faust.Stream)
    assert hasattr(tuples, "ack_lock")


# ---------------------------------------------------------------- 5. consume_group_error


def test_group_errors_are_still_parked_for_the_user() -> None:
    patch = "5 (consume_group_error/watch_group)"
    pinned(gc.GroupCoordinator.check_errors, "c67ee34a37d994bd", patch)
    pinned(gc.GroupCoordinator._push_error_to_user, "8dce53d5130dcd33", patch)
    init = source_of(gc.GroupCoordinator.__init__)
    for attr in ("_coordination_task", "_pending_exception", "_closing"):
        assert f"self.{attr} = " in init, f"upstream changed: re-check patch {patch} ({attr})"
    assert list(inspect.signature(gc.GroupCoordinator.check_errors).parameters) == ["self"]
    assert "thread_loop" in source_of(faust_consumer.ConsumerThread)


# ---------------------------------------------------------------- 6. delay_leader_sync


def test_leader_still_computes_the_assignment_through_perform_assignment() -> None:
    patch = "6 (delay_leader_sync, mock broker only)"
    pinned(gc.GroupCoordinator._perform_assignment, "db2edc93b7b4f722", patch)
    pinned(gc.CoordinatorGroupRebalance._on_join_leader, "b0a892cb39a0ab99", patch)
    params = inspect.signature(gc.GroupCoordinator._perform_assignment).parameters
    assert list(params) == ["self", "response"], f"upstream changed: re-check patch {patch}"
    # Looked up on the instance, so the per-coordinator wrapper is the one called.
    assert "self._coordinator._perform_assignment(response)" in source_of(
        gc.CoordinatorGroupRebalance._on_join_leader
    )


def test_leader_sync_delay_is_installed_only_on_the_mock_broker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pipeline import app as pipeline_app
    from topics.settings import load

    installed: list[object] = []
    monkeypatch.setattr(compat, "delay_leader_sync", installed.append)

    async def revoke(mock_broker: bool) -> None:
        settings = load(env={}).with_overrides(
            {
                "kafka.bootstrap": "127.0.0.1:1",
                "kafka.mock_broker": mock_broker,
                "state_dir": str(tmp_path / str(mock_broker)),
            }
        )
        app = pipeline_app.make_app(settings)
        runtime = app.pipeline_runtime  # type: ignore[attr-defined]

        async def on_revoked(partitions: set[int]) -> None:
            return None

        monkeypatch.setattr(runtime, "on_revoked", on_revoked)
        monkeypatch.setattr(runtime, "stop", lambda: asyncio.sleep(0))
        await app.on_partitions_revoked.send(revoked=set())
        await app.on_before_shutdown.send()

    asyncio.run(revoke(False))
    assert installed == []
    asyncio.run(revoke(True))
    assert len(installed) == 1
