"""mautrix calls under backflow's one retry policy: the sink's exactly-once seam.

mautrix builds and sends each request; this module decides what a failure
means, because exactly-once needs more than a bridge's usual retry loop:

* Every call runs under ``topics.retry`` (capped backoff, bounded in time);
  mautrix's own retries are off (``default_retry_count=0``), so nothing is
  retried twice over and nothing forever.
* A 429 waits for ``Retry-After`` (the header, else ``retry_after_ms`` in the
  body) *outside* the room's concurrency slot (passed per call, or set for a
  whole piece of work such as creating a room with :func:`room_slot`). mautrix's ``MLimitExceeded``
  keeps neither, so an aiohttp trace (a public aiohttp API) notes them.
* 502/503/504/408, connection errors and timeouts may have taken effect: before
  the retry an optional ``settle`` callback looks the result up (a retried txn
  id is not deduplicated after a homeserver restart).
* 500 is retried a few times (a restarting homeserver), then permanent.
* Other refusals are raised as mautrix's typed errors with their text scrubbed
  of the token, which only ever travels in the ``Authorization`` header.
* An intent's implicit work (registering, joining before a send) wraps
  failures in ``IntentError``; the cause is what gets classified.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import aiohttp
import orjson
from mautrix.errors import (
    IntentError,
    MatrixConnectionError,
    MatrixRequestError,
    make_request_error,
)

from topics.retry import RetryPolicy, Transient, retry

# The room's concurrency slot for calls that are not given one: set around a
# piece of work made of many calls (creating a room: alias, create, joins,
# profiles), so that each attempt holds the slot and no retry wait does.
_ROOM_SLOT: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar(
    "backflow_room_slot", default=None
)


@contextmanager
def room_slot(slot: asyncio.Semaphore) -> Iterator[None]:
    """Every call made inside holds ``slot`` while on the wire, and only then."""
    token = _ROOM_SLOT.set(slot)
    try:
        yield
    finally:
        _ROOM_SLOT.reset(token)


T = TypeVar("T")
Settle = Callable[[], Awaitable[T | None]]

_TRANSIENT_STATUS = frozenset({502, 503, 504, 408})
MAX_500_RETRIES = 5

_UNREACHABLE = (MatrixConnectionError, aiohttp.ClientError, TimeoutError, OSError)
_FAILURES = (MatrixRequestError, IntentError, *_UNREACHABLE)


def _cause(exc: BaseException) -> BaseException:
    """The failure itself: an intent's implicit join wraps it in ``IntentError``."""
    if isinstance(exc, IntentError) and isinstance(exc.__cause__, _FAILURES):
        return _cause(exc.__cause__)
    return exc


class MatrixUnreachable(Exception):
    """The homeserver does not answer at all (used for startup checks)."""


def describe(exc: MatrixRequestError) -> str:
    """``ERRCODE: message (HTTP status)``: one line for logs, errors and dead letters."""
    return f"{exc.errcode}: {exc.message} (HTTP {exc.http_status})"


class _Answer:
    """What the aiohttp trace saw of a refused request: status, Retry-After, body start."""

    __slots__ = ("status", "retry_after", "body")

    def __init__(self) -> None:
        self.status = 0
        self.retry_after: str | None = None
        self.body = b""

    def wait(self) -> float:
        if self.retry_after:
            try:
                return max(0.0, float(self.retry_after))
            except ValueError:
                pass
        try:
            ms = orjson.loads(self.body).get("retry_after_ms")
        except (orjson.JSONDecodeError, AttributeError):
            ms = None
        if isinstance(ms, int | float) and not isinstance(ms, bool):
            return max(0.0, ms / 1000)
        return 1.0


_ANSWER: contextvars.ContextVar[_Answer | None] = contextvars.ContextVar("answer", default=None)


async def _on_request_end(_s: Any, _c: Any, params: aiohttp.TraceRequestEndParams) -> None:
    answer = _ANSWER.get()
    if answer is not None:
        answer.status = params.response.status
        answer.retry_after = params.response.headers.get("Retry-After")


async def _on_chunk(_s: Any, _c: Any, params: aiohttp.TraceResponseChunkReceivedParams) -> None:
    answer = _ANSWER.get()
    if answer is not None and answer.status == 429 and len(answer.body) < 4096:
        answer.body += params.chunk[:4096]


def trace_config() -> aiohttp.TraceConfig:
    """Hooks for the client's aiohttp session: what a refused request answered."""
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_on_request_end)
    trace.on_response_chunk_received.append(_on_chunk)
    return trace


class Calls:
    """The retry seam shared by every endpoint of ``MatrixClient``."""

    def __init__(self, as_token: str, max_retry_delay: float, give_up_after: float) -> None:
        self._token = as_token
        self.max_retry_delay = max_retry_delay
        self.give_up_after = give_up_after
        self.stats = {"requests": 0, "rate_limited": 0, "transient": 0}

    def scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    async def call(
        self,
        what: str,
        make: Callable[[], Awaitable[T]],
        *,
        settle: Settle[T] | None = None,
        slot: asyncio.Semaphore | None = None,
        retry_transient: bool = True,
    ) -> T:
        """Run one mautrix call under the policy in the module docstring.

        ``slot`` (the sink's per-room concurrency semaphore) is held only while
        an attempt is on the wire: the retry policy waits outside ``attempt``,
        so a rate-limited room does not keep another room from sending.
        """
        in_doubt = False
        errors_500 = 0
        if slot is None:
            slot = _ROOM_SLOT.get()

        async def attempt() -> T:
            nonlocal in_doubt, errors_500
            if in_doubt and settle is not None:
                found = await settle()
                if found is not None:
                    return found
            answer = _Answer()
            token = _ANSWER.set(answer)
            self.stats["requests"] += 1
            try:
                async with slot or nullcontext():
                    return await make()
            except _FAILURES as exc:
                failure = _cause(exc)
                if isinstance(failure, MatrixRequestError):
                    status = failure.http_status
                    if status == 429:
                        # Refused before any effect; an earlier attempt may still
                        # land, so in_doubt stays as it was (settle before the next).
                        self.stats["rate_limited"] += 1
                        wait = min(answer.wait(), self.max_retry_delay)
                        raise Transient(f"{what}: rate limited", retry_after=wait) from None
                    # 401 while running: the token was refused (rotated, or the
                    # homeserver lost the registration); nothing is wrong with the
                    # command, so it waits. At startup it is the answer to report.
                    transient = status in _TRANSIENT_STATUS or (status == 401 and retry_transient)
                    if transient or (status == 500 and errors_500 < MAX_500_RETRIES):
                        errors_500 += not transient
                        in_doubt = True
                        raise Transient(self.scrub(f"{what}: {describe(failure)}")) from None
                    if in_doubt and settle is not None:
                        # An earlier attempt may have landed before this refusal.
                        found = await settle()
                        if found is not None:
                            return found
                    raise self._scrubbed(failure) from None
                if isinstance(failure, _UNREACHABLE):
                    in_doubt = True
                    problem = self.scrub(f"{what}: {type(failure).__name__}: {failure}")
                    if not retry_transient:
                        raise MatrixUnreachable(problem) from None
                    raise Transient(problem) from None
                raise
            finally:
                _ANSWER.reset(token)

        def count(exc: BaseException, delay: float) -> None:
            if "rate limited" not in str(exc):
                self.stats["transient"] += 1

        policy = RetryPolicy(
            first_delay=0.25, max_delay=self.max_retry_delay, give_up_after=self.give_up_after
        )
        return await retry(attempt, what, policy, on_transient=count)

    def _scrubbed(self, exc: MatrixRequestError) -> MatrixRequestError:
        """The same typed error, its text without the token."""
        return make_request_error(
            http_status=exc.http_status,
            text=self.scrub(str(getattr(exc, "text", "") or "")),
            errcode=exc.errcode,
            message=self.scrub(str(exc.message or "")),
        )
