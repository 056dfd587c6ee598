"""What every command shares: the consoles, the global options, and how runs and tables print."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Mapping
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


def print_report(report: RunReport, store: Path | None = None) -> None:
    """A run's summary: what became of every line it read, by type, what the connector did and,
    given the `store`, the model refreshes the sync ran after landing."""
    c, stats = report.counts, dict(report.stats)
    read = f"{plural(c['lines_read'], 'line')} read"
    if messages := stats.pop("messages", 0):  # HL7 v2: a message maps to several resources
        read = f"{plural(messages, 'message')} ({plural(c['lines_read'], 'record')}) read"
    out.print(
        f"[bold]{report.flow} {escape(report.source)}[/] run {report.run_id}: {read} -> "
        f"{outcome(c, report.flow)} in {report.seconds:.1f} s (snapshot {report.snapshot_id})",
        highlight=False,
    )
    if report.by_type:
        out.print("  by type: " + ", ".join(f"{t} {n:,}" for t, n in sorted(report.by_type.items())))
    if stats := {k: v for k, v in stats.items() if v}:
        out.print("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())), markup=False)
    if store is not None and report.flow == "sync":
        print_refreshes(store, f"sync {report.run_id}")  # the trigger flows.sync gives its refresh


def outcome(c: Mapping[str, int], flow: str) -> str:
    """What became of a run's lines, in words (each line read is counted once; `released`
    records were read before and land now)."""
    parts = [f"{c['inserted']:,} new", f"{c['updated']:,} updated", f"{c['unchanged']:,} unchanged"]
    if c["superseded"]:
        parts.append(f"{c['superseded']:,} superseded by a newer copy")
    parts.append(f"{c['quarantined']:,} quarantined")
    if flow == "backfill" or c["out_of_window"]:
        parts.append(f"{c['out_of_window']:,} outside the window")
    if c["held"]:
        parts.append(f"{c['held']:,} waiting for their patient")
    if c["released"]:
        parts.append(f"{c['released']:,} released (their patient arrived)")
    if c["deleted"]:
        parts.append(f"{c['deleted']:,} deleted")
    if c["warnings"]:
        parts.append(f"{c['warnings']:,} landed with warnings")
    return ", ".join(parts)


def print_refreshes(store: Path, trigger: str) -> None:
    """The model refreshes `trigger` ran, one line per model."""
    from twin_store import connect, queries

    if not (store / "catalog.sqlite").exists():
        return
    for model, version, scope, patients, ok, refused, errors, secs in queries.refreshes_of(
        connect(store), trigger
    ).fetchall():
        if scope == "unchanged":
            para(f"model {model} {version}: unchanged (nothing it reads changed)", indent=2)
        else:
            para(
                f"model {model} {version}: {plural(patients, 'patient')} ({scope}) -> {ok:,} computed, "
                f"{refused:,} refused, {errors:,} errors in {secs:.1f} s",
                indent=2,
            )


def plural(count: int, word: str) -> str:
    """`count` `word`s, the count with thousands separators: 1 line, 2,000 lines."""
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def para(text: str, *, indent: int = 0, hang: int = 2, style: str | None = None) -> None:
    """Print `text` as is (no markup), wrapped to the console's width (COLUMNS), `indent`
    spaces in and its further lines `hang` more."""
    lines = textwrap.wrap(
        text,
        width=max(out.width, 20),
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + hang),
        break_on_hyphens=False,
    )
    for line in lines or [""]:
        out.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
