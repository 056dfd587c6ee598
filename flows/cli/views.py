"""`twinhub views`: SQL-on-FHIR v2 ViewDefinitions over the store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from connectors.errors import TwinhubError
from flows.cli._output import err, out, settings
from flows.cli._results import DEFAULT_LIMIT, Format, chosen_format, write

app = typer.Typer(no_args_is_help=True, help="SQL-on-FHIR v2 ViewDefinitions over the store.")


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
        cells = (name, str(view.get("resource", "")), str(view.get("title", "")), str(file.path))
        table.add_row(*map(Text, cells))  # as written, never read as markup
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
    format: Annotated[
        Format | None,
        typer.Option(
            "--format", "-f", help="table, csv, json or parquet (default: table, or --out's extension)"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this .csv, .json or .parquet file")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Rows a table shows; the rest are counted", min=1)
    ] = DEFAULT_LIMIT,
    all_rows: Annotated[bool, typer.Option("--all", help="Show every row in a table")] = False,
) -> None:
    """Run a ViewDefinition over the store, read-only."""
    import duckdb

    from twin_store import connect
    from twin_store.views import load_view, view_relation

    fmt = chosen_format(format, output)
    cfg = settings()
    rel = view_relation(connect(cfg.store.path), load_view(view, cfg.views.path))
    try:
        write(rel, fmt, output, limit=None if all_rows else limit)
    except duckdb.Error as e:  # data-dependent errors, e.g. several values in a single column
        raise TwinhubError(f"view {view!r} failed: {str(e).splitlines()[0]}") from None


@app.command("doc")
def views_doc() -> None:
    """Print the schema doc of every view (markdown, one line per column)."""
    from twin_store.views import schema_doc

    folder = settings().views.path
    sys.stdout.write(schema_doc(folder))
    _warn_problems(folder)
