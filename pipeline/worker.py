"""Run one pipeline worker: ``python -m pipeline.worker`` (settings from the environment).

``backflow worker`` does the same from the CLI. Tests and the benchmark start
workers as subprocesses: faust apps are not meant to run several per process.

Test knobs: ``BACKFLOW_PIPELINE_FLUSH_CHUNK`` (commands produced per outbox page)
and ``BACKFLOW_PIPELINE_FLUSH_PAUSE`` (seconds to wait after queueing each page,
so a test's SIGKILL lands in the middle of a release).
"""

from __future__ import annotations

import os

from topics import settings as settings_mod
from topics.settings import Settings


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the faust worker until stopped (SIGTERM/SIGINT); does not return normally."""
    import faust

    from pipeline.app import make_app

    chunk = int(os.environ.get("BACKFLOW_PIPELINE_FLUSH_CHUNK", "5000"))
    pause = float(os.environ.get("BACKFLOW_PIPELINE_FLUSH_PAUSE", "0"))
    app = make_app(settings, flush_chunk=chunk, flush_pause=pause)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


def main() -> None:
    run_worker(settings_mod.load(), os.environ.get("BACKFLOW_PIPELINE_LOGLEVEL", "info"))


if __name__ == "__main__":
    main()
