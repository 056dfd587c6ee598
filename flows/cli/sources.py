"""Commands on sources: sync, backfill, listen and reset."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from connectors.errors import TwinhubError
from flows.cli._output import State, config_arg, out, para, print_report, settings, with_progress
from flows.cli._prefect import stoppable

if TYPE_CHECKING:
    from pathlib import Path

    from twin_store import RunReport
    from twin_store.runs import FlowKind

EXIT_PROBLEMS = 3
"""A sync or backfill whose run quarantined something: it landed, with problems."""
EXIT_CODES = (
    "Exit code: 0 landed clean; 3 landed with problems (the run quarantined something: the "
    "last line names the files); 1 failed; 130 interrupted (the next sync resumes)."
)
FILES_NAMED = 3
"""The one line naming a run's quarantine names this many files, and counts the rest."""


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
    with stoppable(), _one_line(name):
        report = with_progress(name, lambda: sync_flow(name, config_arg(), refresh=refresh))
    print_report(report, settings().store.path)
    _landed_with_problems(report)


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
    _preflight(name, "backfill")
    with stoppable(), _one_line(name):
        report = with_progress(
            name, lambda: backfill_flow(name, _utc(since), _utc(until), config_arg(), step=step)
        )
    print_report(report)
    _landed_with_problems(report)


def listen(name: str) -> None:
    """Take records pushed to live source NAME (an hl7v2 source's MLLP port) until stopped (Ctrl-C)."""
    from flows.listen import listen as listen_flow

    def ready(port: int) -> None:
        out.print(f"{name}: listening on port {port}; Ctrl-C stops", highlight=False)

    listen_flow(State.config, name, ready=ready)


def reset(
    name: str,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do it (without: say what it would do, and stop)")
    ] = False,
) -> None:
    """Forget how far source NAME got, so that its next sync reads everything again. Deletes no
    data: landed records stay, and read again unchanged they count as unchanged (no duplicates);
    quarantine and records waiting for their patient stay too. An export job in progress is
    abandoned and its downloads removed."""
    from flows.cli.status import progress_of
    from flows.repair import reset as reset_source
    from twin_store import connect, queries

    cfg = settings()
    source = cfg.source(name)
    if not yes:
        progress = "never synced"
        if (cfg.store.path / "catalog.sqlite").exists():
            marks = {s: mark for s, _, mark in queries.watermarks(connect(cfg.store.path))}
            if name in marks:
                progress = progress_of(source.kind, marks[name])
        raise TwinhubError(
            f"reset would forget how far source {name!r} got ({progress}), so that its next sync reads "
            "everything again; no data is deleted. Add --yes to do it"
        )
    run = reset_source(cfg, name)
    if run.stats["watermarks forgotten"]:
        para(
            f"reset {name} (run {run.run_id}): forgot how far it got; its next sync reads everything "
            "again (landed data stays: what is unchanged counts as unchanged)"
        )
    else:
        para(f"reset {name} (run {run.run_id}): it had not got anywhere; its next sync reads everything")


def _landed_with_problems(report: RunReport) -> None:
    """After the summary of a run that quarantined something, its one line and exit 3."""
    if line := problems(report, settings().store.path):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_PROBLEMS)


def problems(report: RunReport, store: Path) -> str | None:
    """The one line naming where a run quarantined something (files and the damage found in
    them, never their content); None for a clean run."""
    from twin_store import connect, queries

    if not report.counts["quarantined"]:
        return None
    per_file = queries.run_quarantine(connect(store), report.run_id)
    parts = []
    for file, lines, damage in per_file[:FILES_NAMED]:
        name = file.rsplit("/", 1)[-1] if file else "records"
        what = re.match(r"file (damaged (?:after line [\d,]+|at its start)|cannot be read)", damage or "")
        parts.append(f"{lines:,} in {name}" + (f" ({what[1]})" if what else ""))
    if more := per_file[FILES_NAMED:]:
        parts.append(f"{sum(n for _, n, _ in more):,} in {len(more):,} more files")
    if parts:
        parts[0] = parts[0].replace(" in ", " quarantined in ", 1)
    return (
        f"{report.flow} {report.source} landed with problems: {', '.join(parts)}; "
        f"see twinhub quarantine list --source {report.source}"
    )


@contextlib.contextmanager
def _one_line(name: str) -> Iterator[None]:
    """An error no check foresaw (a bug, a library's surprise) ends the command in one line, as a
    known one does, naming the source and where the run's record is; -v shows the traceback."""
    try:
        yield
    except (TwinhubError, KeyboardInterrupt):
        raise
    except Exception as e:
        if State.verbose:
            raise
        raise TwinhubError(
            f"source {name!r} stopped on an unexpected {type(e).__name__}: {e}; its run is recorded "
            "(twinhub status); rerun with -v for the traceback"
        ) from None


def _preflight(name: str, flow: FlowKind = "sync") -> None:
    """Catch a wrong source name or path here, as one line, before any flow starts; a source
    that cannot be read is recorded as a failed run, as it would be under `serve`."""
    from flows.sync import build_connector
    from twin_store.runs import failed_to_start

    cfg = settings()
    source = cfg.source(name)
    try:
        build_connector(cfg, source).check()
    except TwinhubError as e:
        failed_to_start(cfg.store.path, name, flow, f"{type(e).__name__}: {e}")
        raise


def _duration(text: str) -> timedelta:
    units = {"h": "hours", "d": "days", "w": "weeks"}
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in units or int(number) == 0:
        raise TwinhubError(f"--window {text!r} is not a duration; use a number and h, d or w, e.g. 30d")
    return timedelta(**{units[unit]: int(number)})


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)
