"""`twinhub sql` and `twinhub attach-sql` as an analyst uses them, over a real store: cell text
verbatim, every format round-trips, queries from anywhere, and the store from any DuckDB client."""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pytest

from tests.support.cli import run_cli
from tests.support.data import write_config, write_ndjson

TRICKY = {
    "loinc": "Leukocytes [#/volume] in Blood",
    "variant": "11:47371842:AT:A:",
    "markup": "[/]",
    "emoji": ":smile: [bold]x[/bold]",
}
"""Cell text Rich would read as markup or emoji codes, or crash on."""
PATIENTS = [
    {"resourceType": "Patient", "id": f"p{i}", "gender": "female", "name": [{"family": TRICKY["loinc"]}]}
    for i in range(1, 51)
]
WIDE = {"COLUMNS": "400"}
DUCKDB_CLI = Path(sys.executable).with_name("duckdb")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A store with 50 patients; returns the config."""
    root = tmp_path_factory.mktemp("sql")
    write_ndjson(root / "data" / "Patient.ndjson", PATIENTS)  # type: ignore[arg-type]
    config = write_config(root, root / "data")
    run_cli("--config", str(config), "sync", "src", env={"PREFECT_API_URL": prefect_api})
    return config


def sql(config: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config), "sql", *args, env=WIDE, **kw)  # type: ignore[arg-type]


def test_table_cells_print_verbatim(store: Path) -> None:
    columns = ", ".join(f"'{text}' AS {name}" for name, text in TRICKY.items())
    result = sql(store, f"SELECT {columns} FROM patient LIMIT 1", check=False)
    assert result.returncode == 0, result.stderr
    for text in TRICKY.values():
        assert text in result.stdout, f"{text!r} not printed verbatim:\n{result.stdout}"


@pytest.mark.slow
def test_views_run_table_prints_verbatim(store: Path, tmp_path: Path) -> None:
    view = {
        "resource": "Patient",
        "select": [{"column": [{"name": "family", "path": "name.family.first()", "type": "string"}]}],
    }
    (tmp_path / "family.json").write_bytes(orjson.dumps(view))
    result = run_cli("--config", str(store), "views", "run", str(tmp_path / "family.json"), env=WIDE)
    assert result.stdout.count(TRICKY["loinc"]) == 40  # the default limit
    assert "10 more rows" in result.stdout


QUERY_NESTED = (
    "SELECT id, [1, 2] AS list, {'a': 1, 'b': 'x'} AS struct, MAP {'k': 1} AS map, "
    "'ab\\x00'::BLOB AS blob, 1.50::DECIMAL(5, 2) AS amount, 72::DECIMAL(38, 12) AS whole, "
    "100::DECIMAL(18, 0) AS hundred, id = 'src/p1' AS first "
    "FROM patient ORDER BY id LIMIT 2"
)


def test_csv_writes_nested_values_as_json_text(store: Path) -> None:
    result = sql(store, QUERY_NESTED, "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2
    assert orjson.loads(rows[0]["list"]) == [1, 2]
    assert orjson.loads(rows[0]["struct"]) == {"a": 1, "b": "x"}
    assert orjson.loads(rows[0]["map"]) == {"k": 1}
    assert base64.b64decode(rows[0]["blob"]) == b"ab\x00"
    # exact decimals without the padding of their column's scale
    assert (rows[0]["amount"], rows[0]["whole"], rows[0]["hundred"]) == ("1.5", "72", "100")
    assert (rows[0]["first"], rows[1]["first"]) == ("true", "false")


def test_json_writes_blobs_as_base64_and_keeps_types(store: Path) -> None:
    text = sql(store, QUERY_NESTED, "-f", "json").stdout
    assert '"amount":1.5,"whole":72,"hundred":100,' in text  # exact, without the scale's padding
    rows = orjson.loads(text)
    assert rows[0] == {
        "id": "src/p1",
        "list": [1, 2],
        "struct": {"a": 1, "b": "x"},
        "map": {"k": 1},
        "blob": base64.b64encode(b"ab\x00").decode(),
        "amount": 1.5,
        "whole": 72,
        "hundred": 100,
        "first": True,
    }
    assert rows[1]["first"] is False


@pytest.mark.slow
def test_out_writes_the_format_its_extension_names(store: Path, tmp_path: Path) -> None:
    query = "SELECT id, [1, 2] AS list FROM patient ORDER BY id"
    for suffix in ("csv", "json", "parquet"):
        out = tmp_path / f"result.{suffix}"
        result = sql(store, query, "--out", str(out))
        assert result.stdout == ""
        reader = {"csv": "read_csv", "json": "read_json", "parquet": "read_parquet"}[suffix]
        assert duckdb.sql(f"SELECT count(*) FROM {reader}('{out}')").fetchone() == (50,), suffix
    bad = sql(store, query, "--out", str(tmp_path / "result.txt"), check=False)
    assert bad.returncode == 1
    assert "name a .csv, .json or .parquet file" in bad.stderr


@pytest.mark.slow
def test_table_shows_forty_rows_then_counts_the_rest(store: Path) -> None:
    query = "SELECT id FROM patient ORDER BY id"
    shown = sql(store, query).stdout
    assert shown.count("│ src/p") == 40
    assert "10 more rows" in shown
    assert sql(store, query, "--limit", "5").stdout.count("│ src/p") == 5
    every = sql(store, query, "--all").stdout
    assert every.count("│ src/p") == 50
    assert "more rows" not in every


@pytest.mark.slow
def test_queries_come_from_stdin_or_a_file_and_every_statement_runs(store: Path, tmp_path: Path) -> None:
    piped = subprocess.run(
        [str(Path(sys.executable).with_name("twinhub")), "--config", str(store), "sql", "-", "-f", "csv"],
        input="SELECT count(*) AS n FROM patient",
        capture_output=True,
        text=True,
        env={**os.environ, **WIDE},
        check=True,
    )
    assert piped.stdout == "n\n50\n"
    (tmp_path / "q.sql").write_text(
        "-- a comment first\nCREATE TEMP TABLE t AS SELECT 7 AS seven;\n"
        "SELECT seven FROM t;\nSELECT 8 AS eight;\n"
    )
    both = sql(store, f"@{tmp_path / 'q.sql'}").stdout  # a table per result
    assert "│     7 │" in both and "│     8 │" in both
    # one CSV or JSON document holds one result: the statements before it may only prepare it
    two = sql(store, f"@{tmp_path / 'q.sql'}", "-f", "csv", check=False)
    assert (two.returncode, two.stderr.strip()) == (
        1,
        "error: --format csv takes one result; the SQL gives 2: keep one SELECT",
    )
    (tmp_path / "q.sql").write_text("CREATE TEMP TABLE t AS SELECT 7 AS seven;\nSELECT seven FROM t;\n")
    assert sql(store, f"@{tmp_path / 'q.sql'}", "-f", "csv").stdout == "seven\n7\n"
    assert sql(store, "-- leading comment\nSELECT 1 AS one", "-f", "csv").stdout == "one\n1\n"


@pytest.mark.parametrize("query", ["", pytest.param("  ;  ", marks=pytest.mark.slow), "-- only a comment"])
def test_an_empty_query_is_an_error(store: Path, query: str) -> None:
    result = sql(store, query, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: no SQL to run: give a query, `-` to read one from stdin, or @FILE"


def test_attach_sql_opens_the_store_from_python_offline(store: Path) -> None:
    statements = run_cli("--config", str(store), "attach-sql").stdout
    assert "INSTALL" not in statements
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(statements)
    assert con.sql("SELECT count(*) FROM patient").fetchone() == (50,)
    assert con.sql("SELECT status, lines_read FROM ingest_run").fetchall() == [("succeeded", 50)]
    with pytest.raises(duckdb.Error, match="read-only"):
        con.execute("DELETE FROM patient")


@pytest.mark.slow
def test_attach_sql_opens_the_store_in_the_duckdb_cli(store: Path, tmp_path: Path) -> None:
    """And `twinhub views show` SQL runs there as printed."""
    statements = run_cli("--config", str(store), "attach-sql").stdout
    (tmp_path / "attach.sql").write_text(statements)
    view_sql = run_cli("--config", str(store), "views", "show", "patient").stdout.strip().rstrip(";")
    for query, expected in [
        ("SELECT count(*) AS n FROM patient", "50"),
        (f"SELECT count(*) AS n FROM ({view_sql})", "50"),
    ]:
        result = subprocess.run(
            [str(DUCKDB_CLI), "-csv", "-init", str(tmp_path / "attach.sql"), "-c", query],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-2:] == ["n", expected]
