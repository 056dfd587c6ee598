"""`twinhub views`: SQL-on-FHIR v2 ViewDefinitions over the store."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from connectors.errors import TwinhubError
from flows.cli._output import err, out, settings, show

app = typer.Typer(no_args_is_help=True, help="SQL-on-FHIR v2 ViewDefinitions over the store.")


class ViewFormat(StrEnum):
    table = "table"
    csv = "csv"
    parquet = "parquet"
    json = "json"


@app.command("list")
def views_list() -> None:
    """The standard views and those in the config's views folder, by name; a file that holds no
    view is named in a warning."""
    from twin_store.views import named_views

    folder = settings().views.path
    table = Table(title="Views (run one: twinhub views run NAME)")
    for col in ("name", "resource", "title", "file"):
        table.add_column(col)
    for name, file in named_views(folder).items():
        view = file.view or {}
        table.add_row(name, str(view.get("resource", "")), str(view.get("title", "")), str(file.path))
    out.print(table)
    _warn_problems(folder)


def _warn_problems(folder: Path | None) -> None:
    """One warning line on stderr for each file of the views folder that holds no view."""
    from twin_store.views import view_catalog

    for file in view_catalog(folder):
        if file.problem:
            err.print(
                f"warning: view file {file.path}: {file.problem}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


@app.command("show")
def views_show(
    view: Annotated[str, typer.Argument(help="A view name (see views list) or a JSON file")],
) -> None:
    """Print the DuckDB SQL a ViewDefinition compiles to: `twinhub sql` runs it as printed."""
    from twin_store.views import load_view, view_sql

    sys.stdout.write(view_sql(load_view(view, settings().views.path)) + "\n")


@app.command("run")
def views_run(
    view: Annotated[str, typer.Argument(help="A view name (see views list) or a JSON file")],
    format: Annotated[ViewFormat, typer.Option("--format", "-f", help="table, csv, parquet or json")] = (
        ViewFormat.table
    ),
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout")
    ] = None,
) -> None:
    """Run a ViewDefinition over the store, read-only."""
    import duckdb

    from twin_store import connect
    from twin_store.views import load_view, view_relation

    if format is ViewFormat.parquet and output is None:
        raise TwinhubError("--format parquet needs --out FILE.parquet")
    cfg = settings()
    rel = view_relation(connect(cfg.store.path), load_view(view, cfg.views.path))
    try:
        if output is None and format is ViewFormat.table:
            show(rel)
        elif output is None:
            frame = rel.pl()
            sys.stdout.write(frame.write_csv() if format is ViewFormat.csv else frame.write_json() + "\n")
        elif format is ViewFormat.parquet:
            rel.write_parquet(str(output))
        elif format is ViewFormat.json:
            rel.pl().write_json(output)
        else:
            rel.write_csv(str(output))
    except duckdb.Error as e:  # data-dependent errors, e.g. several values in a single column
        raise TwinhubError(f"view {view!r} failed: {str(e).splitlines()[0]}") from None


@app.command("doc")
def views_doc() -> None:
    """Print the schema doc of every view (markdown, one line per column)."""
    from twin_store.views import schema_doc

    folder = settings().views.path
    sys.stdout.write(schema_doc(folder))
    _warn_problems(folder)
