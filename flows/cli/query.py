"""`twinhub sql`: the analyst's query against the store, read-only."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from connectors.errors import TwinhubError
from flows.cli._output import settings, show


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def sql(
    query: str,
    format: Annotated[Format, typer.Option("--format", "-f", help="table, csv or json")] = Format.table,
) -> None:
    """Run QUERY against the store, read-only."""
    from twin_store import connect

    con = connect(settings().store.path)
    try:
        rel = con.sql(query)
    except Exception as e:  # DuckDB errors name the problem in the SQL; print them as one line
        raise TwinhubError(f"query failed: {str(e).splitlines()[0]}") from None
    if rel is None:
        return
    if format is Format.table:
        show(rel)
    elif format is Format.csv:
        sys.stdout.write(rel.pl().write_csv())
    else:
        sys.stdout.write(rel.pl().write_json() + "\n")
