"""`twinhub sql`: the analyst's query against the store, read-only, and `twinhub attach-sql`:
the same store from any DuckDB client."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from connectors.errors import TwinhubError
from flows.cli._output import err, settings
from flows.cli._results import DEFAULT_LIMIT, Format, chosen_format, write

QUERY_HELP = "SQL to run; `-` reads it from stdin, @FILE from a file. Several statements run in turn."


def sql(
    query: Annotated[str, typer.Argument(help=QUERY_HELP, show_default=False)],
    format: Annotated[
        Format | None,
        typer.Option(
            "--format", "-f", help="table, csv, json or parquet (default: table, or --out's extension)"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the result to this .csv, .json or .parquet file")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Rows a table shows; the rest are counted", min=1)
    ] = DEFAULT_LIMIT,
    all_rows: Annotated[bool, typer.Option("--all", help="Show every row in a table")] = False,
) -> None:
    """Run SQL against the store, read-only (DuckDB's dialect; the store's tables by name)."""
    import duckdb

    from twin_store import connect

    text = _read_query(query)
    fmt = chosen_format(format, output)
    con = connect(settings().store.path)
    try:
        statements = con.extract_statements(text)
    except duckdb.Error as e:
        raise TwinhubError(f"query failed: {str(e).splitlines()[0]}") from None
    if not statements:
        raise TwinhubError("no SQL to run: give a query, `-` to read one from stdin, or @FILE")
    results = []
    for statement in statements:
        try:
            rel = con.sql(statement.query)
        except duckdb.Error as e:  # DuckDB names the problem in the SQL; one line
            raise TwinhubError(f"query failed: {str(e).splitlines()[0]}") from None
        if rel is not None:
            results.append(rel)
    if len(results) > 1 and (output is not None or fmt is not Format.table):
        # One file or stream holds one CSV or JSON document; statements that return no rows
        # (SET, CREATE TEMP ...) may come before the one that does.
        where = "--out" if output is not None else f"--format {fmt}"
        raise TwinhubError(f"{where} takes one result; the SQL gives {len(results)}: keep one SELECT")
    for rel in results:
        try:
            write(rel, fmt, output, limit=None if all_rows else limit)
        except duckdb.Error as e:  # errors that show only while rows are read
            raise TwinhubError(f"query failed: {str(e).splitlines()[0]}") from None
    if output is not None:
        err.print(f"wrote {output}", highlight=False, markup=False)


def _read_query(query: str) -> str:
    if query == "-":
        return sys.stdin.read()
    if query.startswith("@"):
        path = Path(query[1:])
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise TwinhubError(f"cannot read SQL from {str(path)!r}: {e.strerror}") from None
    return query


def attach_sql() -> None:
    """Print the SQL that opens this store, read-only, in any DuckDB 1.5 client (the DuckDB CLI,
    Python, a notebook), offline: it loads the extensions twinhub installed."""
    from twin_store.connection import attach_statements

    sys.stdout.write(attach_statements(settings().store.path))
