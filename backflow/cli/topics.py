"""``backflow topics list | provision``: the catalog beside the broker, and making them match.

Wired into the ``backflow`` group by backflow/cli/main.py. Provisioning goes
through the stack's control endpoint only when the stack runs the mock
broker (which has no CreateTopics); any other broker, the stack's external
one included, is provisioned through the admin API with the catalog's configs.
"""

from __future__ import annotations

import asyncio

import click

from topics.admin import AdminError
from topics.provision import ProvisionError, ProvisionReport, TopicState, describe, provision
from topics.settings import Settings


def _settings(ctx: click.Context) -> Settings:
    return ctx.find_root().obj["settings"]


async def provision_settings(settings: Settings, fix: bool = True) -> ProvisionReport:
    """Provision the catalog on the broker the settings name (ProvisionError on failure)."""
    from backflow.stack.daemon import read_env

    control = None
    if settings.kafka.mock_broker:
        control = read_env(settings.state_dir).get("BACKFLOW_EMBEDDED_CONTROL")
    return await provision(
        settings.catalog,
        bootstrap=settings.kafka.bootstrap,
        control_url=control,
        replication=settings.kafka.replication_factor,
        fix=fix,
    )


def _days(ms: int | str | None) -> str:
    if ms is None:
        return "?"
    try:
        value = int(ms)
    except ValueError:
        return str(ms)
    if value < 0:
        return "forever"
    return f"{value // 86_400_000}d" if value % 86_400_000 == 0 else f"{value}ms"


def state_line(state: TopicState) -> str:
    spec, topic = state.spec, state.broker
    want = (
        f"partitions={spec.partitions} retention={_days(spec.retention_ms)} "
        f"cleanup={spec.cleanup_policy}"
    )
    if topic is None:
        have, verdict = "missing", "MISSING"
    else:
        have = (
            f"partitions={topic.partitions} replication={topic.replication} "
            f"retention={_days(topic.config('retention.ms'))} "
            f"cleanup={topic.config('cleanup.policy') or '?'}"
        )
        verdict = "ok" if not state.drift else "DRIFT: " + "; ".join(map(str, state.drift))
    return f"{spec.name}\n  catalog: {want}\n  broker:  {have}\n  {verdict}"


@click.group("topics")
def topics() -> None:
    """The topic catalog and the broker's topics."""


@topics.command("list")
@click.pass_context
def topics_list(ctx: click.Context) -> None:
    """Each catalog topic: what the catalog wants beside what the broker has."""
    settings = _settings(ctx)
    for spec in settings.catalog.specs():
        click.echo(
            f"{spec.name:32} key={spec.key:12} values={','.join(spec.values)}",
        )
    click.echo("")
    if not settings.kafka.bootstrap:
        click.echo("broker: none configured (set BACKFLOW_KAFKA_BOOTSTRAP or `backflow stack up`)")
        return
    try:
        states, notes = asyncio.run(
            describe(settings.catalog, settings.kafka.bootstrap, settings.kafka.replication_factor)
        )
    except AdminError as exc:
        click.echo(f"broker: {exc}")
        ctx.exit(1)
    click.echo(f"broker: {settings.kafka.bootstrap}")
    for state in states:
        click.echo(state_line(state))
    for note in notes:
        click.echo(f"note: {note}")
    if any(s.broker is None or s.drift for s in states):
        click.echo("run `backflow topics provision` to create what is missing and fix drift")


@topics.command("provision")
@click.option("--check", is_flag=True, help="Only report missing topics and drift; change nothing.")
@click.pass_context
def topics_provision(ctx: click.Context, check: bool) -> None:
    """Create the catalog's topics and fix drift; exit 1 if any topic failed."""
    settings = _settings(ctx)
    try:
        report = asyncio.run(provision_settings(settings, fix=not check))
    except ProvisionError as exc:
        if exc.report is None:
            raise
        for line in exc.report.lines():
            click.echo(line)
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker: {report.broker}")
    for line in report.lines():
        click.echo(line)
