"""`backflow`: the one command for everything an operator does.

The pipeline's commands are in cli/pipeline.py, the sink's in cli/sink.py;
this module assembles the group, loads the settings once and turns expected
failures (bad config, unreachable services, unreadable input) into one clear
line instead of a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path

import click

from backflow.cli.terminal import printable
from backflow.cli.topics import provision_settings
from connectors.publish import ImportSummary
from connectors.source import SourceError, available
from topics import bus
from topics.logs import setup_logging
from topics.provision import ProvisionError
from topics.settings import Settings, SettingsError, load

# Failures an operator can act on: reported as one line, exit status 1.
EXPECTED = (SettingsError, bus.BusError, SourceError, ProvisionError, OSError)


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_root().obj["settings"]


@click.group()
@click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path),
    envvar="BACKFLOW_CONFIG",
    help="Settings file (YAML). Default: ./backflow.yaml when present.",
)
@click.option("--verbose", "-v", is_flag=True, help="Show client library logs too.")
@click.option(
    "--log-json",
    is_flag=True,
    help="Log JSON lines with portal/message id fields (setting log.format).",
)
@click.pass_context
def cli(ctx: click.Context, config: Path | None, verbose: bool, log_json: bool) -> None:
    """Backfill chat history into Matrix through Kafka."""
    settings = load(config)
    if log_json:
        settings = settings.with_overrides({"log.format": "json"})
        os.environ["BACKFLOW_LOG_FORMAT"] = "json"  # `backflow run`'s children log alike
    setup_logging(settings, logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Client libraries log every failed connection attempt; our own error
        # line says the same thing once.
        for name in ("aiokafka", "kafka", "faust", "mode", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    ctx.obj = {"settings": settings}


# ------------------------------------------------------------------ stack


@cli.group()
def stack() -> None:
    """The embedded local stack: mock Kafka broker, Postgres, Synapse."""


@stack.command("up")
@click.pass_context
def stack_up(ctx: click.Context) -> None:
    """Start the embedded services in the background (state in .backflow/)."""
    from backflow.stack.daemon import start_background

    settings = settings_of(ctx)
    env = start_background(settings.state_dir)
    settings = load(ctx.find_root().params.get("config"))
    report = asyncio.run(provision_settings(settings))
    topics = ", ".join(f"{t.name} {t.status}" for t in report.topics)
    click.echo(f"topics on {report.broker}: {topics}")
    click.echo(f"stack is up; addresses in {settings.state_dir / 'stack.env'}:")
    for name, value in env.items():
        click.echo(f"  {name}={value}")


@stack.command("down")
@click.pass_context
def stack_down(ctx: click.Context) -> None:
    """Stop the embedded services."""
    from backflow.stack.daemon import stop_background

    stopped = stop_background(settings_of(ctx).state_dir)
    click.echo("stack stopped" if stopped else "stack was not running")


@stack.command("env")
@click.pass_context
def stack_env(ctx: click.Context) -> None:
    """Print `export` lines for the running embedded stack."""
    from backflow.stack.daemon import read_env

    env = read_env(settings_of(ctx).state_dir)
    if not env:
        raise click.ClickException("the embedded stack is not running (`backflow stack up`)")
    for name, value in env.items():
        click.echo(f"export {name}={value}")


# ------------------------------------------------------------------ import


def _parse_options(values: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--option")
        options[name] = setting
    return options


def progress_line(summary: ImportSummary, position: tuple[int, int] | None) -> str:
    """One status line: a bar when the source tracks its input, then counts and rate."""
    counts = (
        f"{summary.messages:,} messages, {summary.portals:,} portals, "
        f"{summary.rejected:,} rejected, {summary.rate:,.0f} msg/s"
    )
    if not position or position[1] <= 0:
        return counts
    done, total = position
    fraction = done / total
    width = 24
    bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
    eta = ""
    if 0 < fraction < 1 and summary.seconds > 1:
        left = int(summary.seconds * (1 - fraction) / fraction)
        eta = f", {left // 60}:{left % 60:02d} left"
    return f"[{bar}] {fraction:4.0%} {counts}{eta}"


def _ask_secret(source: object) -> None:
    """Prompt for a connector's secret (a backup passphrase) when nothing else gave it.

    Never taken from argv (``ps`` shows it): a connector that needs one names it
    in ``secret_prompt`` and reads options or the environment first.
    """
    prompt = getattr(source, "secret_prompt", None)
    if prompt and source.needs_secret() and sys.stdin.isatty():  # type: ignore[attr-defined]
        source.secret = click.prompt(prompt, hide_input=True, err=True)  # type: ignore[attr-defined]


@cli.command("import")
@click.argument("format", required=False)
@click.argument("path", required=False)
@click.option("--option", "-o", "options", multiple=True, help="Connector option NAME=VALUE.")
@click.option("--list", "list_formats", is_flag=True, help="List the installed connectors.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read and validate, print per portal what would go out; publish nothing.",
)
@click.option(
    "--follow", is_flag=True, help="Keep watching PATH and publish what appears (whatsapp-history)."
)
@click.pass_context
def import_(
    ctx: click.Context,
    format: str | None,
    path: str | None,
    options: tuple[str, ...],
    list_formats: bool,
    dry_run: bool,
    follow: bool,
) -> None:
    """Import history from PATH with the FORMAT connector (see --list)."""
    from connectors.publish import publish_source

    sources = available()
    if list_formats:
        width = max(map(len, sources), default=0)
        for name, cls in sources.items():
            click.echo(f"{name:{width}} {cls.description}")
        return
    if not format or not path:
        raise click.UsageError("give FORMAT and PATH (or --list)")
    if format not in sources:
        raise click.BadParameter(
            f"unknown format {format!r}; installed: {', '.join(sources)}", param_hint="FORMAT"
        )
    connector = sources[format]
    url = connector.accepts_url and "://" in path  # a database URL, passed as given
    if not url and not Path(path).exists():
        raise SourceError(f"{path}: no such file or directory")
    if follow:
        if connector.follower is None:
            raise click.UsageError(f"{format} cannot --follow")
        module, _, name = connector.follower.partition(":")
        runner = getattr(importlib.import_module(module), name)
        echo = lambda line: click.echo(printable(line))  # noqa: E731
        try:
            asyncio.run(runner(path, _parse_options(options), settings_of(ctx), echo))
        except KeyboardInterrupt:
            click.echo("stopped; the next --follow resumes from the saved position")
        return
    source = connector(path if url else Path(path), _parse_options(options))
    _ask_secret(source)
    if dry_run:
        from connectors.dry_run import preview

        result = preview(source)
        for line in result.lines(source.stats, source.warnings):
            click.echo(printable(line))
        return
    shown = 0

    def on_reject(where: str, reason: str) -> None:
        nonlocal shown
        shown += 1
        if shown <= 20:
            click.echo(f"\rrejected {printable(where)}: {printable(reason)}", err=True)
        elif shown == 21:
            click.echo("\r(further rejections only counted)", err=True)

    def progress(summary: ImportSummary) -> None:
        if sys.stderr.isatty():
            click.echo("\r" + progress_line(summary, source.progress()), err=True, nl=False)

    summary = asyncio.run(publish_source(source, settings_of(ctx), progress, on_reject))
    if sys.stderr.isatty():
        click.echo("", err=True)
    for line in summary.lines():
        click.echo(line)
    for warning in source.warnings:  # e.g. a guessed date order, naming the option
        click.echo(f"warning: {printable(warning)}", err=True)
    _warn_embedded_retention(settings_of(ctx), summary.messages)


# librdkafka's mock cluster keeps at most this many records (or 5 MB) per
# partition and silently drops older ones.
MOCK_PARTITION_RECORDS = 100_000


def _warn_embedded_retention(settings: Settings, published: int) -> None:
    from backflow.stack.daemon import read_env

    if not read_env(settings.state_dir).get("BACKFLOW_EMBEDDED_CONTROL"):
        return
    if published > MOCK_PARTITION_RECORDS * settings.kafka.partitions // 2:
        click.echo(
            "warning: the embedded broker keeps at most 100,000 records or 5 MB per partition "
            "and drops older ones; keep `backflow worker` running while importing this much, "
            "or use Apache Kafka",
            err=True,
        )


@cli.command()
@click.option("--listen", help="HOST:PORT to listen on (default: ingest.listen).")
@click.pass_context
def ingest(ctx: click.Context, listen: str | None) -> None:
    """Serve the live ingest endpoint (POST /v1/records, bearer token)."""
    from connectors.ingest import serve

    settings = settings_of(ctx)
    if listen:
        settings = settings.with_overrides({"ingest.listen": listen})
    click.echo(f"ingest listening on http://{settings.ingest.listen}/v1/records")
    asyncio.run(serve(settings))


@cli.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the pipeline worker and the sink together until stopped."""
    from backflow.processes import run_together

    sys.exit(run_together())


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Backfill the bundled sample chats on the embedded stack: holds, catch-up, rebuild."""
    from backflow.demo import run_demo

    run_demo(ctx.find_root().params.get("config"))


def _register_stage_commands() -> None:
    from backflow.cli.deadletter import deadletter
    from backflow.cli.pipeline import status, worker
    from backflow.cli.replay import replay
    from backflow.cli.sink import show_command, sink_command
    from backflow.cli.topics import topics

    for command in (topics, deadletter, replay, worker, status, sink_command, show_command):
        cli.add_command(command)


_register_stage_commands()


def main() -> None:
    try:
        # Outside standalone mode click returns ctx.exit()'s code instead of exiting.
        code = cli(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EXPECTED as exc:
        click.echo(f"backflow: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
