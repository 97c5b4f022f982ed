"""The one retry policy: classify a failure once, back off with a cap, never forever.

Every stage retries through :func:`retry`. A failure is either

- *transient*: the database, the broker or the homeserver was away or asked
  us to slow down (connection errors, timeouts, Postgres restarts, deadlock
  victims, HTTP 429 and 502-504). The same work is tried again after a capped,
  jittered backoff (a ``Retry-After`` the peer sent is honoured), for at most
  ``give_up_after`` seconds; then :class:`RetryExhausted` is raised so that the
  stage stops with a clear error instead of spinning silently;
- *permanent*: anything else. Trying the same input again gives the same
  answer, so it is raised at once: the caller dead-letters the record (or, at
  startup, stops with one clear line).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("backflow.retry")


class Verdict(Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Transient(Exception):
    """Raise (or subclass) to say: this failure goes away when retried."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetryExhausted(Exception):
    """A transient failure lasted longer than the policy allows."""

    def __init__(self, what: str, seconds: float, last: BaseException) -> None:
        super().__init__(f"{what}: still failing after {seconds:.0f}s: {last!r}")
        self.what = what
        self.last = last


# HTTP answers that mean "later": rate limited, or a gateway/upstream away.
TRANSIENT_HTTP = frozenset({429, 502, 503, 504})

# asyncpg errors that are about the connection or the server, not the data.
_PG_TRANSIENT_NAMES = frozenset(
    {
        "PostgresConnectionError",
        "InterfaceError",
        "CannotConnectNowError",
        "AdminShutdownError",
        "CrashShutdownError",
        "TooManyConnectionsError",
        "DeadlockDetectedError",
        "SerializationError",
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "QueryCanceledError",
    }
)


def _http_status(exc: BaseException) -> int | None:
    # mautrix's MatrixRequestError and aiohttp's ClientResponseError: duck-typed,
    # so this contract module imports neither.
    for attr in ("http_status", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return None


def classify(exc: BaseException) -> Verdict:
    """Transient or permanent: the one place that decides."""
    if isinstance(exc, Transient):
        return Verdict.TRANSIENT
    if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError):
        return Verdict.TRANSIENT
    names = {cls.__name__ for cls in type(exc).__mro__}
    module = type(exc).__module__
    if module.startswith("asyncpg") and names & _PG_TRANSIENT_NAMES:
        return Verdict.TRANSIENT
    if module.startswith(("aiokafka", "kafka")) and getattr(exc, "retriable", False):
        return Verdict.TRANSIENT
    if module.startswith("aiohttp") and "ClientConnectionError" in names:
        return Verdict.TRANSIENT
    status = _http_status(exc)
    if status is not None and status in TRANSIENT_HTTP:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


def retry_after(exc: BaseException) -> float | None:
    """The wait the peer asked for, in seconds, when it said one."""
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, int | float) and hint >= 0:
        return float(hint)
    ms = getattr(exc, "retry_after_ms", None)
    if isinstance(ms, int | float) and ms >= 0:
        return ms / 1000
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, bounded in total time."""

    first_delay: float = 0.2
    max_delay: float = 10.0
    give_up_after: float = 600.0  # seconds of continuous transient failure

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        asked = retry_after(exc) if exc is not None else None
        if asked is not None:
            return min(asked, self.max_delay * 6)
        base = min(self.first_delay * (2**attempt), self.max_delay)
        return base * (0.75 + random.random() / 2)


DEFAULT = RetryPolicy()


async def retry(
    make: Callable[[], Awaitable[T]],
    what: str,
    policy: RetryPolicy = DEFAULT,
    *,
    on_transient: Callable[[BaseException, float], Any] | None = None,
) -> T:
    """Run ``make()`` until it succeeds; transient failures are retried, bounded.

    ``make`` is called afresh for every attempt. ``on_transient(exc, delay)`` is
    told about every retry (statistics). The wait happens outside ``make``, so
    whatever ``make`` holds (a room's concurrency slot) is given back meanwhile.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt = 0
    while True:
        try:
            return await make()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if classify(exc) is Verdict.PERMANENT:
                raise
            elapsed = loop.time() - started
            if elapsed >= policy.give_up_after:
                raise RetryExhausted(what, elapsed, exc) from exc
            delay = policy.delay(attempt, exc)
            attempt += 1
            if on_transient is not None:
                on_transient(exc, delay)
            log.warning("%s failed (%r); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
