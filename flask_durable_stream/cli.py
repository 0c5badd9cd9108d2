"""``flask durable-stream ...``: operator commands over the app's stream manager."""

from __future__ import annotations

import datetime as dt
import json

import click
from flask import current_app
from flask.cli import AppGroup

from .exceptions import StreamNotFound, StreamTimeout
from .managers.base import StreamManager

durable_stream_cli = AppGroup("durable-stream", help="Inspect and clean up durable streams.")


def _manager() -> StreamManager:
    state = current_app.extensions.get("durable_stream")
    if state is None or state.manager is None:
        raise click.ClickException("This app has no durable stream manager.")
    manager: StreamManager = state.manager
    return manager


def _when(ts: float | None) -> str:
    """An epoch time as ISO 8601 in UTC, the one way both commands print times."""
    if ts is None:
        return "-"
    when = dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
    return when.replace("+00:00", "Z")


@durable_stream_cli.command("gc")
def gc_command() -> None:
    """Delete finished streams whose TTL has passed."""
    removed = _manager().gc()
    click.echo(f"removed {removed} expired stream(s)")


@durable_stream_cli.command("list")
@click.option("--limit", default=50, show_default=True)
def list_command(limit: int) -> None:
    """Newest streams first."""
    infos = _manager().list_streams(limit=limit)
    click.echo(
        f"{'STREAM ID':34} {'STATUS':9} {'EVENTS':>7}  {'CREATED':20}  {'UPDATED':20}  "
        f"{'FLOW':20}  OWNER"
    )
    for i in infos:
        click.echo(
            f"{i.stream_id:34} {i.status.value:9} {i.last_seq + 1:>7}  "
            f"{_when(i.created_at):20}  {_when(i.updated_at):20}  {i.flow or '-':20}  "
            f"{i.owner or '-'}"
        )


@durable_stream_cli.command("show")
@click.argument("stream_id")
@click.option("--events/--no-events", default=False, help="Also print the stored events.")
def show_command(stream_id: str, events: bool) -> None:
    """Metadata (and optionally the events) of one stream."""
    manager = _manager()
    info = manager.info(stream_id)
    if info is None:
        raise click.ClickException(f"stream {stream_id} not found (or expired)")
    shown = info.to_dict()
    for key, value in shown.items():
        if key.endswith("_at"):
            shown[key] = _when(value) if value is not None else None
    click.echo(json.dumps(shown, indent=2))
    if not events:
        return
    # An open stream prints what is stored so far instead of waiting for the rest
    # (a reader that finds the producer's lease expired ends it, as any reader would).
    count = 0
    try:
        for event in manager.subscribe(stream_id, timeout=0.001):
            click.echo(f"{event.seq:>6} {event.kind:5} {event.payload}")
            count += 1
    except StreamTimeout:
        click.echo(f"(stream still open: {count} event(s) stored so far)")
    except StreamNotFound:
        raise click.ClickException(f"stream {stream_id} expired while it was read") from None
