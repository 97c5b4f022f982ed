"""The one retry policy: what is transient, what is permanent, and that it gives up."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from topics.retry import (
    RetryExhausted,
    RetryPolicy,
    Transient,
    Verdict,
    classify,
    retry,
    retry_after,
)

FAST = RetryPolicy(first_delay=0.001, max_delay=0.005, give_up_after=0.2)


class HttpError(Exception):
    """Shaped like mautrix's MatrixRequestError: the status in ``http_status``."""

    def __init__(self, status: int, retry_after_ms: int | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status = status
        self.retry_after_ms = retry_after_ms


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.DeadlockDetectedError("deadlock"),
        asyncpg.AdminShutdownError("terminating"),
        kafka_errors.KafkaConnectionError(),
        kafka_errors.RequestTimedOutError(),
        HttpError(429),
        HttpError(503),
        Transient("the peer said later"),
    ],
    ids=repr,
)
def test_transient(exc: BaseException) -> None:
    assert classify(exc) is Verdict.TRANSIENT


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        asyncpg.CharacterNotInRepertoireError("invalid byte sequence: 0x00"),
        asyncpg.UniqueViolationError("duplicate"),
        kafka_errors.TopicAuthorizationFailedError(),
        HttpError(400),
        HttpError(403),
        KeyError("x"),
    ],
    ids=repr,
)
def test_permanent(exc: BaseException) -> None:
    assert classify(exc) is Verdict.PERMANENT


async def test_transient_is_retried_until_it_works() -> None:
    calls = []
    waits = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("gone")
        return "ok"

    assert await retry(flaky, "flaky", FAST, on_transient=lambda e, d: waits.append(d)) == "ok"
    assert len(calls) == 3 and len(waits) == 2


async def test_permanent_is_raised_at_once() -> None:
    calls = []

    async def bad() -> None:
        calls.append(1)
        raise ValueError("never works")

    with pytest.raises(ValueError):
        await retry(bad, "bad", FAST)
    assert calls == [1]


async def test_transient_gives_up_after_the_policy_allows() -> None:
    async def down() -> None:
        raise ConnectionRefusedError("down")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetryExhausted) as info:
        await retry(down, "reaching the database", FAST)
    assert loop.time() - started < 2
    assert "reaching the database" in str(info.value)
    assert isinstance(info.value.last, ConnectionRefusedError)


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(first_delay=0.1, max_delay=1.0)
    assert retry_after(HttpError(429, retry_after_ms=2500)) == 2.5
    assert policy.delay(0, HttpError(429, retry_after_ms=2500)) == 2.5
    assert policy.delay(0, HttpError(429, retry_after_ms=10**9)) == 6.0  # capped
    for attempt in range(20):
        assert policy.delay(attempt) <= 1.0 * 1.25
