"""Run the sink as its own process: ``python -m connectors.matrix.sink_main``.

Settings come from ``topics.settings.load()`` (BACKFLOW_* environment,
config file, stack.env). Used by the crash tests (SIGKILL at random points)
and handy for deployments that run the sink apart from the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from connectors.matrix.runner import run_sink
from connectors.matrix.sink import SinkError
from topics.logs import setup_logging
from topics.settings import Settings, SettingsError, load


async def _main(settings: Settings, idle_exit: float | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats = await run_sink(settings, stop=stop, idle_exit=idle_exit)
    print(f"sink: {stats.summary()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connectors.matrix.sink_main")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after N idle seconds")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        settings = load()
        setup_logging(settings, args.log_level.upper())
        return asyncio.run(_main(settings, args.idle_exit))
    except (SinkError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
