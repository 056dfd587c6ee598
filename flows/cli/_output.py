"""What every command shares: the consoles, the global options, and how runs and tables print."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from flows.config import Settings
    from twin_store import RunReport

out = Console()
err = Console(stderr=True)


class State:
    """The global options, set by the app's callback."""

    config: Path | None = None
    verbose: bool = False


def settings() -> Settings:
    from flows.config import load_settings

    return load_settings(State.config)


def config_arg() -> str | None:
    """The config file as a flow parameter (flows run in other processes under `serve`)."""
    return str(State.config.resolve()) if State.config else None


def with_progress(name: str, work: Callable[[], RunReport]) -> RunReport:
    """Run `work` (a flow), drawing its progress on a terminal."""
    from flows.sync import on_batch, on_progress

    if not State.verbose:
        # A failed run ends in one error line from main(); Prefect would add its tracebacks.
        for logger in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)
    if not out.is_terminal:
        return work()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=out) as bar:
        task = bar.add_task(f"{name}: starting", total=None)
        landed = ""

        def update(run: RunReport) -> None:
            nonlocal landed
            landed = f"{run.counts['lines_read']:,} lines landed"
            bar.update(task, description=f"{name}: {landed}")

        def news(message: str) -> None:
            bar.update(task, description=escape(f"{name}: {message}" + (f" ({landed})" if landed else "")))

        tokens = on_batch.set(update), on_progress.set(news)
        try:
            return work()
        finally:
            on_batch.reset(tokens[0])
            on_progress.reset(tokens[1])


def print_report(report: RunReport) -> None:
    c = report.counts
    parts = [f"{c['inserted']:,} new", f"{c['updated']:,} updated", f"{c['unchanged']:,} unchanged"]
    if c["superseded"]:
        parts.append(f"{c['superseded']:,} superseded by a newer copy")
    parts.append(f"{c['quarantined']:,} quarantined")
    if report.flow == "backfill":
        parts.append(f"{c['out_of_window']:,} outside the window")
    if c["deleted"]:
        parts.append(f"{c['deleted']:,} deleted")
    out.print(
        f"[bold]{report.flow} {escape(report.source)}[/] run {report.run_id}: "
        f"{c['lines_read']:,} lines read -> {', '.join(parts)} in {report.seconds:.1f} s "
        f"(snapshot {report.snapshot_id})"
    )
    if report.by_type:
        out.print("  by type: " + ", ".join(f"{t} {n:,}" for t, n in sorted(report.by_type.items())))
    if stats := {k: v for k, v in report.stats.items() if v}:
        out.print("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())))
