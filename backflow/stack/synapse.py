"""A real Synapse homeserver (pip ``matrix-synapse``) run as a subprocess.

Used by the test fixtures and ``backflow stack up``. Synapse keeps its own data
in SQLite by default (that is Synapse's business, not backflow's state), or in a
PostgreSQL database given as ``database_url`` (as production homeservers do;
needs ``psycopg2``, and the database made by :func:`create_synapse_database`). The config
is generated once with ``--generate-config`` (secrets, signing key) and then
rewritten on every start from the generated values plus our overrides, so a
restart keeps the same data and signing key.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from backflow.stack.private import UMASK, private_dir, tighten, write_private


@dataclass(frozen=True)
class Appservice:
    """An application service registration (the bridge's identity on the homeserver)."""

    id: str
    as_token: str
    hs_token: str
    sender_localpart: str
    user_prefix: str  # ghosts are @{user_prefix}...:server
    alias_prefix: str  # portal aliases are #{alias_prefix}...:server
    rate_limited: bool = False

    def registration(self, server_name: str | None = None) -> dict[str, Any]:
        """The registration YAML as a dict.

        ``url`` is None: the homeserver pushes no transactions to us (the sink
        only talks to the homeserver). Namespaces are exclusive so nobody else
        can register our ghosts or aliases; with ``server_name`` the regexes
        are anchored to it.
        """
        server = f":{re.escape(server_name)}" if server_name else ":.*"
        return {
            "id": self.id,
            "url": None,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "namespaces": {
                "users": [
                    {"exclusive": True, "regex": f"@{re.escape(self.user_prefix)}.*{server}"}
                ],
                "aliases": [
                    {"exclusive": True, "regex": f"#{re.escape(self.alias_prefix)}.*{server}"}
                ],
                "rooms": [],
            },
            "rate_limited": self.rate_limited,
        }


def default_appservice(token_seed: str | None = None) -> Appservice:
    """The standard backflow appservice, with random tokens (or derived from a seed)."""
    if token_seed is None:
        as_token, hs_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    else:
        as_token = hashlib.sha256(f"as:{token_seed}".encode()).hexdigest()
        hs_token = hashlib.sha256(f"hs:{token_seed}".encode()).hexdigest()
    return Appservice(
        id="backflow",
        as_token=as_token,
        hs_token=hs_token,
        sender_localpart="backflow",
        user_prefix="_bf_",
        alias_prefix="_bf_",
        rate_limited=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# Ghost registration and logins are admin work done with the appservice token;
# Synapse's defaults (a handful per minute) would stall tests that register
# many ghosts. Message/join/room limits stay at Synapse's defaults on purpose so
# a rate_limited appservice really gets 429s.
_RATE_LIMIT_OVERRIDES: dict[str, Any] = {
    "rc_registration": {"per_second": 1000, "burst_count": 10000},
    "rc_login": {
        "address": {"per_second": 1000, "burst_count": 10000},
        "account": {"per_second": 1000, "burst_count": 10000},
        "failed_attempts": {"per_second": 1000, "burst_count": 10000},
    },
}

_LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  console:
    class: logging.StreamHandler
    formatter: precise
loggers:
  synapse.storage.SQL:
    level: WARNING
  synapse.access.http:
    level: WARNING
root:
  level: INFO
  handlers: [console]
disable_existing_loggers: false
"""


class SynapseError(RuntimeError):
    pass


def postgres_database_config(url: str) -> dict[str, Any]:
    """Synapse's ``database`` section for a ``postgresql://`` URL (psycopg2 engine).

    A ``?host=/socket/dir`` query (Unix socket, as the embedded server uses)
    wins over the URL's host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SynapseError(f"not a postgresql:// URL: {parts.scheme}://...")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise SynapseError("the database URL names no database")
    args: dict[str, Any] = {
        "user": unquote(parts.username) if parts.username else query.get("user", "postgres"),
        "database": database,
        "host": query.get("host") or parts.hostname or "127.0.0.1",
        "port": parts.port or int(query.get("port", 5432)),
        "cp_min": 5,
        "cp_max": 10,
    }
    password = unquote(parts.password) if parts.password else query.get("password")
    if password:
        args["password"] = password
    return {"name": "psycopg2", "args": args}


async def create_synapse_database(admin_url: str, name: str) -> str:
    """Create database ``name`` the way Synapse requires it and return its URL.

    Synapse refuses a database whose collation is not C (``ENCODING 'UTF8'
    LC_COLLATE='C' LC_CTYPE='C'``, from ``template0``). A no-op if it exists.
    """
    from backflow.stack.postgres import create_database

    return await create_database(
        admin_url, name, "ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE=template0"
    )


class Synapse:
    """One Synapse process with its data in ``state_dir``, listening on 127.0.0.1.

    With ``database_url`` (``postgresql://user[:pw]@host:port/db``) Synapse
    stores its data in that PostgreSQL database instead of SQLite in
    ``state_dir``; media, keys and logs stay in ``state_dir``.
    """

    def __init__(
        self,
        state_dir: Path,
        server_name: str = "backflow.test",
        appservices: list[Appservice] | None = None,
        port: int | None = None,
        database_url: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.database_url = database_url
        self.server_name = server_name
        self.appservices = list(appservices or [])
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- paths ------------------------------------------------------------------
    @property
    def generated_config(self) -> Path:
        return self.state_dir / "generated.yaml"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "synapse.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise SynapseError("Synapse has no port yet: call start() first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def registration_path(self, appservice: Appservice) -> Path:
        return self.state_dir / "appservices" / f"{appservice.id}.yaml"

    # -- config -----------------------------------------------------------------
    def _generate(self) -> None:
        """Run Synapse's generator once: it creates the secrets and signing key."""
        if self.generated_config.exists():
            return
        private_dir(self.state_dir)
        tmp = self.state_dir / "generated.yaml.tmp"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                self.server_name,
                "--config-path",
                str(tmp),
                "--data-directory",
                str(self.state_dir),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.state_dir,
            capture_output=True,
            text=True,
            timeout=120,
            umask=UMASK,  # the generated config and signing key hold secrets
        )
        if result.returncode != 0:
            raise SynapseError(f"synapse --generate-config failed:\n{result.stderr[-3000:]}")
        tmp.rename(self.generated_config)

    def _write_config(self) -> None:
        # Load-and-rewrite instead of appending: the generated file ends without
        # a newline and would otherwise hold duplicate keys (listeners, ...).
        config = yaml.safe_load(self.generated_config.read_text())
        if config.get("server_name") != self.server_name:
            raise SynapseError(
                f"{self.state_dir} holds a homeserver for {config.get('server_name')!r}, "
                f"not {self.server_name!r}"
            )
        reg_files = []
        for appservice in self.appservices:
            path = self.registration_path(appservice)
            private_dir(path.parent)
            write_private(path, yaml.safe_dump(appservice.registration(self.server_name)))
            reg_files.append(str(path))
        log_config = self.state_dir / "log.yaml"
        log_config.write_text(_LOG_CONFIG)
        config.update(
            {
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": False,
                        "x_forwarded": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    }
                ],
                "log_config": str(log_config),
                "app_service_config_files": reg_files,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "enable_registration": False,
                "report_stats": False,
                "presence": {"enabled": False},
                # No outbound federation from a test homeserver.
                "federation_domain_whitelist": [],
                **_RATE_LIMIT_OVERRIDES,
            }
        )
        if self.database_url is not None:
            config["database"] = postgres_database_config(self.database_url)
        write_private(self.config_path, yaml.safe_dump(config, sort_keys=False))
        tighten(self.state_dir)  # the generated config, signing key, an older database

    def _kill_stale(self) -> None:
        """Kill a Synapse left running on this data dir by a crashed parent."""
        pid_file = self.state_dir / "synapse.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() not in cmdline:
            return  # pid reused by something else
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        """Start Synapse and wait until the client API answers."""
        if self.pid is not None:
            return
        self._generate()
        self._kill_stale()
        if self.port is None:
            self.port = free_port()
        elif not _port_is_free(self.port):
            raise SynapseError(f"port {self.port} is in use")
        self._write_config()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.state_dir,
            umask=UMASK,  # its database and media are the operator's alone
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the terminal goes to our parent,
            # which then stops Synapse in order.
            start_new_session=True,
        )
        # Synapse writes its pid_file only when daemonized: keep our own, so a
        # later start() can kill a Synapse orphaned by a crashed parent.
        (self.state_dir / "synapse.pid").write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        versions = f"{self.url}/_matrix/client/versions"
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_log()
                raise SynapseError(f"Synapse exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(versions, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SynapseError(f"Synapse not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, wait, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL without grace (crash tests)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_log()

    def restart(self, timeout: float = 90) -> None:
        """Stop and start again on the same port and data."""
        self.stop()
        self.start(timeout)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Synapse:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
