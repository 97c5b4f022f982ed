"""Run one pipeline worker: ``python -m pipeline.worker`` (settings from the environment).

``backflow worker`` does the same from the CLI. Tests and the benchmark start
workers as subprocesses: faust apps are not meant to run several per process.

Test knobs: ``BACKFLOW_PIPELINE_FLUSH_CHUNK`` (commands produced per outbox page)
and ``BACKFLOW_PIPELINE_FLUSH_PAUSE`` (seconds to wait after queueing each page,
so a test's SIGKILL lands in the middle of a release).
"""

from __future__ import annotations

import os
import sys

from topics import bus
from topics import settings as settings_mod
from topics.settings import Settings


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the faust worker until stopped (SIGTERM/SIGINT); does not return normally."""
    import asyncio

    import faust

    from pipeline.app import make_app
    from pipeline.metrics import serve_worker_metrics
    from topics.admin import require_topics

    # faust would join its group and idle on missing topics without a word.
    topics = settings.catalog.pipeline_topics
    asyncio.run(require_topics(bus.bootstrap(settings), topics, "pipeline worker"))

    chunk = int(os.environ.get("BACKFLOW_PIPELINE_FLUSH_CHUNK", "5000"))
    pause = float(os.environ.get("BACKFLOW_PIPELINE_FLUSH_PAUSE", "0"))
    app = make_app(settings, flush_chunk=chunk, flush_pause=pause)
    catalog = settings.catalog
    sources = {catalog.history, catalog.live, catalog.portal_events}
    app.pipeline_metrics = serve_worker_metrics(app.pipeline_runtime, app, sources)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


def main() -> None:
    try:
        run_worker(settings_mod.load(), os.environ.get("BACKFLOW_PIPELINE_LOGLEVEL", "info"))
    except (bus.BusError, settings_mod.SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
