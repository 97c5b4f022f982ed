"""docs/deploy.md matches docker-compose.yml and the CLI (checked as text and YAML only).

No Docker engine here: every `docker compose run|exec SERVICE backflow ...`
line of the guide must name a compose service and a real backflow command
with options it has; the settings table must be the compose values; the
consumer groups it names must be the catalog's.
"""

from __future__ import annotations

import re
import shlex

import click

from backflow.cli.main import cli
from tests.backflow.test_compose import COMPOSE, ROOT, SERVICES
from topics.catalog import Catalog

DOC = (ROOT / "docs/deploy.md").read_text()


def _shell_lines() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", DOC, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def _compose_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(service, command) of `docker compose run|exec [options] SERVICE [COMMAND...]`."""
    if words[:2] != ["docker", "compose"] or words[2] not in ("run", "exec"):
        return None
    rest = words[3:]
    while rest and rest[0].startswith("-"):
        takes_value = rest[0] in ("-v", "--volume", "-e", "--env")
        rest = rest[2:] if takes_value else rest[1:]
    return rest[0], rest[1:]


def _command(argv: list[str]) -> click.Command:
    """The backflow command ``argv`` runs (its arguments after the command words)."""
    command: click.Command = cli
    for word in argv[1:]:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.commands.get(word)
        assert sub is not None, f"{argv}: `{word}` is not a backflow command"
        command = sub
    return command


def test_guide_commands_exist() -> None:
    calls = [c for c in map(_compose_call, _shell_lines()) if c is not None]
    assert len(calls) >= 10, calls
    backflow_calls = 0
    for service, argv in calls:
        assert service in SERVICES, service
        if not argv or argv[0] != "backflow":
            continue
        backflow_calls += 1
        command = _command(argv)
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        for word in argv[1:]:
            if word.startswith("--"):
                assert word in known, f"{argv}: {word} is not an option of {command.name}"
        assert not isinstance(command, click.Group), argv
    assert backflow_calls >= 8


def test_guide_names_every_service_and_the_compose_values() -> None:
    for name in SERVICES:
        assert f"| `{name}` |" in DOC, f"docs/deploy.md does not describe service {name}"
    env = COMPOSE["x-backflow"]["environment"]
    for key, value in env.items():
        row = re.search(rf"\| `{key}`[^|]*\| ([^|]*)\|", DOC)
        if row is None:  # the homeserver pair shares a row
            assert key.startswith("BACKFLOW_HOMESERVER_"), key
            assert f"`{value}`" in DOC
            continue
        assert f"`{value}`" in row.group(1), (key, value, row.group(1))
    assert SERVICES["worker"]["deploy"]["replicas"] == 2 and "replicas: 2" in DOC
    assert SERVICES["kafka"]["image"] in DOC


def test_guide_consumer_groups_are_the_catalogs() -> None:
    catalog = Catalog()
    for group in (catalog.processor_group, catalog.sink_group):
        assert re.search(rf"--group {re.escape(group)}\s", DOC), group
    assert f"`{catalog.prefix}`" in DOC
