"""Commands on sources: sync, backfill, listen, and the store's status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import orjson
import typer
from rich.table import Table

from connectors.errors import TwinhubError
from flows.cli._output import State, config_arg, err, out, print_report, settings, show, with_progress
from flows.cli._prefect import stoppable


def sync(
    name: str,
    refresh: Annotated[
        bool | None,
        typer.Option(
            "--refresh/--no-refresh",
            help="Refresh the enabled models after landing (default: the config's "
            "models.refresh_after_sync). --no-refresh leaves it to `twinhub serve`'s trigger, when "
            "one serves the Prefect server this sync reports to; otherwise the sync refreshes them",
        ),
    ] = None,
) -> None:
    """Land what is new in source NAME (Ctrl-C stops it; the next sync resumes)."""
    from flows.sync import sync as sync_flow

    _preflight(name)
    with stoppable():
        report = with_progress(name, lambda: sync_flow(name, config_arg(), refresh=refresh))
    print_report(report)


def backfill(
    name: str,
    since: Annotated[datetime, typer.Option(help="Start of the window (inclusive), e.g. 2019-01-01")],
    until: Annotated[datetime, typer.Option(help="End of the window (exclusive)")],
    window: Annotated[
        str | None,
        typer.Option(help="FHIR search sources: query this much at a time, e.g. 30d, 12h, 2w"),
    ] = None,
) -> None:
    """Re-pull NAME and re-land what falls in the window, re-deriving unchanged resources."""
    from flows.sync import backfill as backfill_flow

    if since >= until:
        raise TwinhubError(f"--since {since:%Y-%m-%d} must be before --until {until:%Y-%m-%d}")
    step = _duration(window) if window else None
    _preflight(name)
    with stoppable():
        report = with_progress(
            name, lambda: backfill_flow(name, _utc(since), _utc(until), config_arg(), step=step)
        )
    print_report(report)


def listen(name: str) -> None:
    """Take records pushed to live source NAME (an hl7v2 source's MLLP port) until stopped (Ctrl-C)."""
    from flows.listen import listen as listen_flow

    def ready(port: int) -> None:
        out.print(f"{name}: listening on port {port}; Ctrl-C stops", highlight=False)

    listen_flow(State.config, name, ready=ready)


def status() -> None:
    """Sources, watermarks, last runs, table counts and quarantine."""
    from twin_store import connect, queries

    cfg = settings()
    con = connect(cfg.store.path)
    show(
        queries.last_runs(con),
        "Last runs per source (lines_read + released = inserted + updated + unchanged + superseded"
        " + quarantined + out_of_window + held)",
    )
    configured = {s.name: s for s in cfg.sources}
    table = Table(title="Sources and watermarks")
    for col in ("source", "kind", "schedule", "watermark"):
        table.add_column(col)
    seen = set()
    for source, updated_at, watermark in queries.watermarks(con):
        seen.add(source)
        found = configured.get(source)
        progress = _progress(found.kind, watermark) if found else "its kind is not in the config"
        table.add_row(
            source,
            found.kind if found else "(not in config)",
            (found.schedule or "-") if found else "-",
            f"{progress} at {updated_at:%Y-%m-%d %H:%M:%S}",
        )
    for name, s in configured.items():
        if name not in seen:
            table.add_row(name, s.kind, s.schedule or "-", "never synced")
    out.print(table)
    show(queries.table_counts(con), "Rows per table")
    show(
        queries.waiting(con),
        "Waiting for their patient (records that name a patient identifier no Patient has yet)",
    )
    show(queries.quarantine_reasons(con), "Quarantine (bad lines, kept with their reason)")
    if pending := queries.days_awaiting_fhir(con):
        out.print(f"{pending:,} wearable days wait for their FHIR Observation (the next sync makes them)")
    show(queries.model_runs(con), "Twin model refreshes (last 3 per model)")


def _progress(kind: str, watermark: str) -> str:
    """How far a source got, in its kind's words."""
    from connectors.kinds import source_kind

    try:
        return source_kind(kind).describe(orjson.loads(watermark))
    except Exception as e:  # a plugin's describe must not break status
        err.print(f"warning: kind {kind!r} cannot describe its watermark ({type(e).__name__})", markup=False)
        return "(watermark not understood)"


def _preflight(name: str) -> None:
    """Catch a wrong source name or path here, as one line, before any flow starts."""
    from flows.sync import build_connector

    cfg = settings()
    build_connector(cfg, cfg.source(name)).check()


def _duration(text: str) -> timedelta:
    units = {"h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in units or int(number) == 0:
        raise TwinhubError(f"--window {text!r} is not a duration; use a number and h, d or w, e.g. 30d")
    return timedelta(**{units[unit]: int(number)})


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
