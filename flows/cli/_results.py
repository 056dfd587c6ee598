"""How a query's rows leave twinhub: a table on the terminal, or CSV, JSON or Parquet.

Cell text is data, printed verbatim (never Rich markup or emoji codes). Nested values (LIST,
STRUCT, MAP, ARRAY, UNION) go out as JSON text in a table or CSV; BLOBs as base64 in every text
form; decimals without their scale's trailing zeros. DuckDB makes the text, so a value reads the
same in every format it can."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.table import Table
from rich.text import Text

from connectors.errors import TwinhubError
from flows.cli._output import out

if TYPE_CHECKING:
    import duckdb

NESTED = {"list", "struct", "map", "array", "union"}
NUMERIC = {
    "tinyint",
    "smallint",
    "integer",
    "bigint",
    "hugeint",
    "utinyint",
    "usmallint",
    "uinteger",
    "ubigint",
    "uhugeint",
    "float",
    "double",
    "decimal",
}
CHUNK = 10_000
DEFAULT_LIMIT = 40
"""Rows a table shows unless told otherwise; the rest are counted ("N more rows")."""


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def chosen_format(format: Format | None, output: Path | None) -> Format:
    """The format asked for, else the one `--out`'s extension names, else a table."""
    if format is not None:
        if format is Format.table and output is not None:
            raise TwinhubError("--out writes csv, json or parquet; drop --format table or name one of those")
        if format is Format.parquet and output is None:
            raise TwinhubError("--format parquet needs --out FILE.parquet")
        return format
    if output is None:
        return Format.table
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("csv", "json", "parquet"):
        raise TwinhubError(f"--out {str(output)!r}: name a .csv, .json or .parquet file, or give --format")
    return Format(suffix)


def write(
    rel: duckdb.DuckDBPyRelation,
    format: Format,
    output: Path | None = None,
    *,
    limit: int | None = DEFAULT_LIMIT,
    title: str | None = None,
) -> None:
    """Send the relation's rows where they go; `limit` bounds only a table on the terminal."""
    if format is Format.table:
        show(rel, title=title, limit=limit)
    elif format is Format.parquet:
        assert output is not None
        rel.write_parquet(str(output))
    elif output is None:
        _write_text(rel, format, sys.stdout)
    else:
        with output.open("w", encoding="utf-8", newline="") as fh:
            _write_text(rel, format, fh)


def show(rel: duckdb.DuckDBPyRelation, title: str | None = None, limit: int | None = None) -> None:
    """A table of the rows (the first `limit`, then how many more)."""
    table = Table(title=title)
    for col, type_ in zip(rel.columns, rel.types, strict=True):
        table.add_column(Text(col), justify="right" if type_.id in NUMERIC else "left")
    rows = _chunks(as_text(rel))
    shown = 0
    more = 0
    for chunk in rows:
        for row in chunk:
            if limit is not None and shown >= limit:
                more += 1
                continue
            table.add_row(*(Text("NULL", style="dim") if v is None else Text(v) for v in row))
            shown += 1
    out.print(table)
    if more:
        out.print(f"{more:,} more rows (--limit N or --all to see them, --out FILE to keep them all)")


def as_text(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Every column as DuckDB's own text for it; nested values as JSON, BLOBs as base64."""
    exprs = []
    for name, type_ in zip(rel.columns, rel.types, strict=True):
        col = _ident(name)
        if type_.id in NESTED:
            exprs.append(f"CAST(to_json({col}) AS VARCHAR) AS {col}")
        elif type_.id == "blob":
            exprs.append(f"base64({col}) AS {col}")
        elif type_.id == "decimal":
            exprs.append(f"{_decimal_text(col)} AS {col}")
        else:
            exprs.append(f"CAST({col} AS VARCHAR) AS {col}")
    return rel.project(", ".join(exprs)) if exprs else rel


def _write_text(rel: duckdb.DuckDBPyRelation, format: Format, fh: TextIO) -> None:
    from twin_store.connection import literal

    if format is Format.csv:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(rel.columns)
        for chunk in _chunks(as_text(rel)):
            writer.writerows(chunk)
        return
    # JSON: an array of row objects, each made by DuckDB (exact decimals, true/false, nested as is).
    pairs = ", ".join(
        f"{literal(name)}, {_json_value(_ident(name), type_.id)}"
        for name, type_ in zip(rel.columns, rel.types, strict=True)
    )
    objects = rel.project(f"CAST(json_object({pairs}) AS VARCHAR)")
    fh.write("[")
    first = True
    for chunk in _chunks(objects):
        for (line,) in chunk:
            fh.write(("\n" if first else ",\n") + line)
            first = False
    fh.write("\n]\n" if not first else "]\n")


def _chunks(rel: duckdb.DuckDBPyRelation) -> Iterator[list[tuple[Any, ...]]]:
    rel.execute()
    while chunk := rel.fetchmany(CHUNK):
        yield chunk


def _json_value(col: str, type_id: str) -> str:
    if type_id == "blob":
        return f"base64({col})"
    if type_id == "decimal":
        return f"json({_decimal_text(col)})"  # a JSON number, as exact as the decimal
    return col


def _decimal_text(col: str) -> str:
    """A decimal as text without its scale's padding (72.000000000000 reads 72): exact still."""
    text = f"CAST({col} AS VARCHAR)"
    return f"CASE WHEN contains({text}, '.') THEN rtrim(rtrim({text}, '0'), '.') ELSE {text} END"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
