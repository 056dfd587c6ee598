"""`twinhub views`: SQL-on-FHIR v2 ViewDefinitions over the store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from connectors.errors import TwinhubError
from flows.cli._output import out, settings
from flows.cli._results import DEFAULT_LIMIT, Format, chosen_format, write

app = typer.Typer(no_args_is_help=True, help="SQL-on-FHIR v2 ViewDefinitions over the store.")


@app.command("list")
def views_list() -> None:
    """The standard views and those in the config's views folder."""
    from twin_store.views import load_view, view_files

    table = Table(title="Views (run one: twinhub views run NAME)")
    for col in ("name", "resource", "title", "file"):
        table.add_column(col)
    for name, path in view_files(settings().views.path).items():
        view = load_view(str(path))
        table.add_row(name, str(view.get("resource", "")), str(view.get("title", "")), str(path))
    out.print(table)


@app.command("show")
def views_show(
    view: Annotated[str, typer.Argument(help="A view name (see views list) or a JSON file")],
) -> None:
    """Print the DuckDB SQL a ViewDefinition compiles to."""
    from harmonize.sql_on_fhir.view_definition import compile_view
    from twin_store.views import load_view

    sys.stdout.write(compile_view(load_view(view, settings().views.path)).typed_sql + "\n")


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

    sys.stdout.write(schema_doc(settings().views.path))
