"""Running the pipeline worker and the sink side by side as child processes.

Faust apps own their process (signal handlers, event loop), so `backflow run`
and the demo start each stage as its own `backflow` child instead of
sharing one event loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("worker", "sink")


def spawn(stage: str, log_dir: Path | None = None, env: dict[str, str] | None = None):
    """Start `backflow STAGE` as a child; its output goes to LOG_DIR/STAGE.log if given."""
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{stage}.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "backflow.cli", stage],
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        stdin=subprocess.DEVNULL,
        env=env or dict(os.environ),
    )


def stop(children: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_together(log_dir: Path | None = None) -> int:
    """Run worker and sink until a signal or until one of them exits."""
    children = [spawn(stage, log_dir) for stage in STAGES]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        stop(children)
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 0 if stopping or not failed else failed[0]
