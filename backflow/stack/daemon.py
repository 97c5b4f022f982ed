"""``backflow stack up``: the embedded services in one long-running process.

The mock Kafka cluster lives inside the process that created it, so one daemon
process owns all embedded services (broker, Postgres if needed, Synapse) and
publishes their addresses in ``STATE_DIR/stack.env``. Because the mock cluster
has no CreateTopics, the daemon also serves a tiny control API on 127.0.0.1:

    POST /topics  {"prefix": "backflow", "partitions": 8, "replication": 1}
                  -> the provisioning report (topics/provision.py), per topic
    GET  /health

Run in the foreground with ``python -m backflow.stack.daemon STATE_DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from backflow.stack.docker_kafka import DockerKafka
from backflow.stack.kafka import EmbeddedKafka
from backflow.stack.postgres import (
    EmbeddedPostgres,
    create_database,
    resolve_admin_url,
)
from backflow.stack.private import UMASK, private_dir, tighten, write_private
from backflow.stack.synapse import Appservice, Synapse, default_appservice, free_port
from topics.catalog import Catalog
from topics.provision import provision_admin, provision_embedded
from topics.settings import load as load_settings

ENV_FILE = "stack.env"
PID_FILE = "stack.pid"
LOG_FILE = "stack.log"
SERVER_NAME = "backflow.test"
# The database backflow uses when we pick the server (not for an explicit URL).
DATABASE_PREFIX = "backflow_"


# ------------------------------------------------------------------ helpers


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs a backflow stack daemon (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and b"backflow.stack.daemon" in cmdline


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _parse_env(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        out[name.strip()] = value.strip().strip("'\"")
    return out


def read_env(state_dir: Path) -> dict[str, str]:
    """The running stack's variables; {} if no daemon is running for ``state_dir``."""
    state_dir = Path(state_dir)
    pid = _read_pid(state_dir)
    if pid is None or not _pid_alive(pid):
        return {}
    try:
        return _parse_env((state_dir / ENV_FILE).read_text())
    except OSError:
        return {}


def _write_atomic(path: Path, text: str) -> None:
    # Readers poll for the file: they must never see it half written.
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, text)  # it can carry a database password
    os.replace(tmp, path)


def _database_name(state_dir: Path) -> str:
    """The database of this state dir, named once and kept with it.

    Postgres may be the machine's shared server while Synapse's data lives in
    the state dir: a fresh state dir must not find another stack's pipeline
    and sink state (portals "already bridged" into rooms this Synapse lacks).
    """
    path = state_dir / "database.name"
    if path.exists():
        return path.read_text().strip()
    name = DATABASE_PREFIX + secrets.token_hex(5)
    _write_atomic(path, name + "\n")
    return name


def _load_appservice(state_dir: Path) -> Appservice:
    """The appservice of this state dir, created once so tokens survive restarts."""
    path = state_dir / "appservice.json"
    if path.exists():
        return Appservice(**json.loads(path.read_text()))
    appservice = default_appservice()
    _write_atomic(path, json.dumps(appservice.__dict__, indent=2))
    path.chmod(0o600)
    return appservice


def _saved_port(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _check_reachable(bootstrap: str) -> None:
    """Fail early on a dead external broker, e.g. a stale mock address left in the
    shell by sourcing an old stack.env."""
    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 3).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise RuntimeError(
        f"BACKFLOW_KAFKA_BOOTSTRAP={bootstrap} is not reachable ({'; '.join(errors)}); "
        "unset it to use the embedded broker"
    )


# ------------------------------------------------------------------ control API


def _control_app(kafka: EmbeddedKafka | None, bootstrap: str, partitions: int) -> web.Application:
    async def topics(request: web.Request) -> web.Response:
        # One provisioning for both brokers (topics/provision.py): the mock
        # cluster owned here, or an external broker through the admin API,
        # which then gets every topic's catalog configs (retention!).
        try:
            body = await request.json()
            catalog = Catalog(
                prefix=str(body["prefix"]), partitions=int(body.get("partitions", partitions))
            )
            replication = int(body.get("replication", 1))
            fix = bool(body.get("fix", True))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return web.json_response({"error": f"bad request: {exc!r}"}, status=400)
        try:
            if kafka is not None:
                # The mock cluster's calls block on its thread: keep the loop free.
                report = await asyncio.to_thread(
                    provision_embedded, catalog.specs(), kafka, replication, fix
                )
            else:
                report = await provision_admin(catalog.specs(), bootstrap, replication, fix)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(report.to_json(), status=200 if report.ok else 409)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "bootstrap": bootstrap})

    app = web.Application()
    app.router.add_post("/topics", topics)
    app.router.add_get("/health", health)
    return app


# ------------------------------------------------------------------ daemon


async def _serve(state_dir: Path, partitions: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    kafka: EmbeddedKafka | None = None
    docker_kafka: DockerKafka | None = None
    pg: EmbeddedPostgres | None = None
    synapse: Synapse | None = None
    runner: web.AppRunner | None = None
    env_path = state_dir / ENV_FILE
    try:
        # Broker: an external one if configured, else the in-process mock cluster.
        bootstrap = os.environ.get("BACKFLOW_KAFKA_BOOTSTRAP")
        if bootstrap:
            _check_reachable(bootstrap)
        elif os.environ.get("BACKFLOW_STACK_KAFKA") == "docker":
            docker_kafka = DockerKafka()
            bootstrap = docker_kafka.bootstrap
        else:
            kafka = EmbeddedKafka()
            bootstrap = kafka.bootstrap

        explicit_db = os.environ.get("BACKFLOW_DATABASE_URL")
        force_embedded = load_settings().database.embedded  # BACKFLOW_DATABASE_EMBEDDED
        admin_url, pg = await resolve_admin_url(explicit_db, state_dir, force_embedded)
        db_url = explicit_db or await create_database(admin_url, _database_name(state_dir))

        appservice = _load_appservice(state_dir)
        port_file = state_dir / "synapse.port"
        port = _saved_port(port_file)
        synapse = Synapse(state_dir / "synapse", SERVER_NAME, [appservice], port=port)
        try:
            await asyncio.to_thread(synapse.start)
        except Exception:
            if port is None:
                raise
            # The saved port may be taken now: take any free one.
            synapse = Synapse(state_dir / "synapse", SERVER_NAME, [appservice])
            await asyncio.to_thread(synapse.start)
        port_file.write_text(str(synapse.port))

        runner = web.AppRunner(_control_app(kafka, bootstrap, partitions), access_log=None)
        await runner.setup()
        control_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", control_port).start()

        registration = synapse.registration_path(appservice)
        env = {
            "BACKFLOW_KAFKA_BOOTSTRAP": bootstrap,
            "BACKFLOW_DATABASE_URL": db_url,
            "BACKFLOW_HOMESERVER_URL": synapse.url,
            "BACKFLOW_HOMESERVER_SERVER_NAME": synapse.server_name,
            "BACKFLOW_APPSERVICE_REGISTRATION": str(registration),
            "BACKFLOW_EMBEDDED_CONTROL": f"http://127.0.0.1:{control_port}",
        }
        if kafka is not None:
            # The in-process mock cluster: stages turn on its workarounds.
            env["BACKFLOW_KAFKA_MOCK_BROKER"] = "true"
        lines = [f"# backflow stack (pid {os.getpid()}); `backflow stack down` stops it"]
        lines += [f"export {name}={value}" for name, value in env.items()]
        _write_atomic(env_path, "\n".join(lines) + "\n")
        print(f"backflow stack ready: {json.dumps(env)}", flush=True)
        await stop.wait()
        print("backflow stack stopping", flush=True)
    finally:
        env_path.unlink(missing_ok=True)
        if runner is not None:
            await runner.cleanup()
        if synapse is not None:
            await asyncio.to_thread(synapse.stop)
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        if kafka is not None:
            kafka.close()
        if docker_kafka is not None:
            docker_kafka.close()


def serve(state_dir: Path, partitions: int = 8) -> None:
    """Run the embedded stack in this process until SIGTERM/SIGINT."""
    state_dir = Path(state_dir).resolve()
    os.umask(UMASK)  # everything the stack and its servers create is private
    private_dir(state_dir)
    pid = _read_pid(state_dir)
    if pid is not None and pid != os.getpid() and _pid_alive(pid):
        raise RuntimeError(f"a backflow stack (pid {pid}) already runs for {state_dir}")
    tighten(state_dir)
    (state_dir / ENV_FILE).unlink(missing_ok=True)
    (state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(_serve(state_dir, partitions))
    finally:
        if _read_pid(state_dir) == os.getpid():
            (state_dir / PID_FILE).unlink(missing_ok=True)


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_background(
    state_dir: Path, partitions: int = 8, timeout: float = 180
) -> dict[str, str]:
    """Start the daemon detached (or find it running) and return its variables."""
    state_dir = Path(state_dir).resolve()
    private_dir(state_dir)
    running = read_env(state_dir)
    if running:
        return running
    log_path = state_dir / LOG_FILE
    # Make the package importable in the child even when run from a source tree.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "backflow.stack.daemon", str(state_dir),
                "--partitions", str(partitions),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,  # survives the CLI and its terminal
            umask=UMASK,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"backflow stack exited with {proc.returncode}; log {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        if _read_pid(state_dir) == proc.pid and (state_dir / ENV_FILE).exists():
            return _parse_env((state_dir / ENV_FILE).read_text())
        if time.monotonic() > deadline:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise RuntimeError(
                f"backflow stack not ready after {timeout:.0f}s; log {log_path}:\n"
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.2)


def stop_background(state_dir: Path, timeout: float = 60) -> bool:
    """Stop the daemon of ``state_dir``; False if none was running."""
    state_dir = Path(state_dir).resolve()
    pid = _read_pid(state_dir)
    if pid is None or not _pid_alive(pid):
        (state_dir / ENV_FILE).unlink(missing_ok=True)
        (state_dir / PID_FILE).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        _reap(pid)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            break
        time.sleep(0.1)
    _reap(pid)
    (state_dir / ENV_FILE).unlink(missing_ok=True)
    (state_dir / PID_FILE).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    # When we spawned the daemon ourselves (tests), collect it to avoid a zombie.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="backflow embedded stack daemon")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--partitions", type=int, default=8)
    args: Any = parser.parse_args(argv)
    serve(args.state_dir, args.partitions)


if __name__ == "__main__":
    main()
