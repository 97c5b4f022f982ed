"""What the sink did, for the progress line and the final summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import Histogram


def _latency() -> Histogram:
    # Kept here with the counters (unregistered): the sink's /metrics reads it.
    return Histogram(
        "backflow_sink_send_seconds",
        "Time to send one message to the homeserver (ghost, membership, media, event)",
        registry=None,
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )


@dataclass
class SinkStats:
    commands: int = 0
    sent: int = 0  # counted per send as it happens, so progress lines move
    skipped: int = 0  # already in the map
    settled: int = 0  # in-doubt sends found in the room instead of sent again
    rooms_created: int = 0
    rooms_found: int = 0
    dead_letters: int = 0
    retries: int = 0  # batches retried after infrastructure errors
    rate_limited: int = 0  # 429s the homeserver answered
    transient: int = 0  # 5xx / connection errors retried
    started: float = field(default_factory=time.monotonic)
    first_command: float | None = None  # monotonic time of the first command
    last_sent: float | None = None  # monotonic time of the newest send
    per_room: dict[str, int] = field(default_factory=dict)
    send_seconds: Histogram = field(default_factory=_latency)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def count_send(self, key: str, seconds: float | None = None) -> None:
        self.sent += 1
        if seconds is not None:
            self.send_seconds.observe(seconds)
        self.last_sent = time.monotonic()
        self.per_room[key] = self.per_room.get(key, 0) + 1

    def summary(self) -> str:
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{self.commands} commands: {self.sent} sent ({rate:.1f}/s), {self.skipped} already "
            f"bridged, {self.settled} settled, {self.rooms_created} rooms created, "
            f"{self.rooms_found} found, {self.dead_letters} dead letters, "
            f"{self.rate_limited} rate-limited and {self.transient} failed requests retried"
        )
