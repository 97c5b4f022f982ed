"""`backflow import signal-backup` asks for the passphrase on a terminal, hidden, never in argv."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import termios
import time
from pathlib import Path

from tests.signal_backup_writer import SHOWN_PASSPHRASE, write_backup


def _run_on_terminal(args: list[str], answer: str, env: dict[str, str]) -> str:
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execve(sys.executable, [sys.executable, "-m", "backflow.cli", *args], env)
    out = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"passphrase (30 digits)" in out:
            # click writes the prompt before getpass turns echo off (and flushes
            # pending input): answer only once the terminal stopped echoing.
            while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
                time.sleep(0.05)
            os.write(fd, answer.encode() + b"\r")
            answered = True
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGTERM)  # never leave a child waiting for input
    os.waitpid(pid, 0)
    os.close(fd)
    return out.decode("utf-8", errors="replace")


def test_the_prompt_reads_the_passphrase_without_echo(tmp_path: Path) -> None:
    path = write_backup(tmp_path / "x.backup")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNAL_", "BACKFLOW_"))}
    env["BACKFLOW_STATE_DIR"] = str(tmp_path / "state")
    shown = _run_on_terminal(
        ["import", "signal-backup", str(path), "--dry-run"], SHOWN_PASSPHRASE, env
    )
    assert "Signal backup passphrase (30 digits)" in shown
    assert "12345" not in shown  # hidden input: the terminal never echoed it
    assert "Hikers" in shown and "wrong passphrase" not in shown, shown

    wrong = _run_on_terminal(["import", "signal-backup", str(path), "--dry-run"], "9" * 30, env)
    assert "wrong passphrase" in wrong and "9" * 30 not in wrong
