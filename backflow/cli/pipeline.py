"""Click commands of the pipeline, wired into the ``backflow`` group by backflow/cli/main.py.

Both read the Settings object from ``ctx.obj["settings"]``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import click

from backflow.cli.terminal import printable
from topics.settings import Settings


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.obj or {}
    settings = obj.get("settings")
    if settings is None:
        from topics.settings import load

        settings = load()
    return settings


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.command("status")
@click.option("--portal", default=None, help="One portal: network:portal or the portal id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, portal: str | None, as_json: bool) -> None:
    """Per portal: state, held and released counts, last bridged time, last error."""
    from pipeline.status import portal_status

    try:
        rows = asyncio.run(portal_status(_settings(ctx), portal))
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no portal" + (f" matching {printable(repr(portal))}" if portal else "s yet"))
        if portal:
            ctx.exit(1)
        return
    header = f"{'PORTAL':<32} {'STATE':<17} {'HELD':>7} {'RELEASED':>9} {'LAST BRIDGED':<20} ERROR"
    click.echo(header)
    for r in rows:
        dropped = sum(r["dropped"].values())
        error = r["last_error"] or (f"({dropped} dropped)" if dropped else "")
        click.echo(
            f"{printable(r['portal']):<32} {r['state']:<17} {r['held']:>7} {r['released']:>9} "
            f"{_ts(r['last_bridged_ts']):<20} {printable(error)}"
        )


@click.command("worker")
@click.option("--loglevel", default="info", show_default=True)
@click.pass_context
def worker(ctx: click.Context, loglevel: str) -> None:
    """Run a pipeline worker (faust); start several to split the partitions."""
    from pipeline.worker import run_worker

    run_worker(_settings(ctx), loglevel)
