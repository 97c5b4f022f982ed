"""The topic catalog: the one place that knows topic names and their settings.

Every topic is keyed by portal (``network:portal``) and all of them share one
partition count, so a portal's history, live messages, room events and
commands land on the same partition number and one worker owns the portal.

Topics are provisioned explicitly (``backflow topics provision``) instead of
auto-created: production clusters often disable auto-creation, and the
embedded mock broker needs them beforehand with matching partition counts.
"""

from __future__ import annotations

from dataclasses import dataclass

FOREVER = -1
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: str
    key: str
    values: tuple[str, ...]  # record types it carries

    def config(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


@dataclass(frozen=True, slots=True)
class Catalog:
    """Topic names under one prefix (tests use a unique prefix each)."""

    prefix: str = "backflow"
    partitions: int = 8

    @property
    def history(self) -> str:
        return f"{self.prefix}.history"

    @property
    def live(self) -> str:
        return f"{self.prefix}.live"

    @property
    def portal_events(self) -> str:
        return f"{self.prefix}.portal-events"

    @property
    def matrix_commands(self) -> str:
        return f"{self.prefix}.matrix-commands"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def processor_group(self) -> str:
        return f"{self.prefix}-pipeline"

    @property
    def sink_group(self) -> str:
        return f"{self.prefix}-sink"

    @property
    def pipeline_topics(self) -> list[str]:
        """What a pipeline worker reads and writes: it refuses to start without them."""
        return [
            self.history,
            self.live,
            self.portal_events,
            self.matrix_commands,
            self.dead_letters,
        ]

    @property
    def sink_topics(self) -> list[str]:
        """What the Matrix sink reads and writes: it refuses to start without them."""
        return [self.matrix_commands, self.portal_events, self.dead_letters]

    def specs(self) -> list[TopicSpec]:
        p = self.partitions
        return [
            # History from network connectors and importers; kept forever for replay.
            TopicSpec(
                self.history,
                p,
                FOREVER,
                "delete",
                "portal",
                ("message", "portal", "history_complete", "sync_complete"),
            ),
            # Live messages and portal updates from running bridges; kept for replay.
            TopicSpec(
                self.live,
                p,
                FOREVER,
                "delete",
                "portal",
                ("message", "portal"),
            ),
            # What the sink did to a portal (room created); the pipeline waits on it.
            TopicSpec(
                self.portal_events,
                p,
                FOREVER,
                "delete",
                "portal",
                ("room_created",),
            ),
            # Ordered commands for the Matrix sink; rebuilt from history on replay.
            TopicSpec(
                self.matrix_commands,
                p,
                7 * DAY_MS,
                "delete",
                "portal",
                ("create_room", "send"),
            ),
            # Records a stage could not handle, with the stage, reason and original bytes.
            TopicSpec(
                self.dead_letters,
                p,
                90 * DAY_MS,
                "delete",
                "original key",
                ("dead_letter",),
            ),
        ]
