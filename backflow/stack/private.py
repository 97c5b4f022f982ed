"""Files only the operator may read: the embedded stack's secrets and state.

The stack writes appservice registrations (``as_token``, ``hs_token``),
Synapse's config (``registration_shared_secret``, ``macaroon_secret_key``,
``form_secret``), its signing key and database, and ``stack.env`` (which can
carry a database password). Secret-bearing files are created 0600 and state
directories 0700; the stack and the servers it starts run with umask 077, so
whatever they create later is private too.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def tighten(root: Path) -> None:
    """Make an existing state tree private (written by an older, laxer version)."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)
