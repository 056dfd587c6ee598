"""`twinhub views` over a real store: files that DuckDB and polars read back, one-line errors."""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson
import polars as pl

from tests.support.cli import run_cli
from tests.support.data import ROOT, write_config, write_ndjson

PATIENTS = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"given": ["Ann", "Bea"], "family": "Ek"}],
        "active": True,
    },
    {"resourceType": "Patient", "id": "p2", "name": [{"given": ["Cy"], "family": "Ng"}], "active": False},
]
VIEW = {
    "resource": "Patient",
    "select": [
        {"column": [{"name": "id", "path": "getResourceKey()", "type": "id"}]},
        {"column": [{"name": "active", "path": "active", "type": "boolean"}]},
        {"forEach": "name.given", "column": [{"name": "given", "path": "$this", "type": "string"}]},
    ],
}
EXPECTED = [("p1", True, "Ann"), ("p1", True, "Bea"), ("p2", False, "Cy")]


def test_views_run_writes_csv_and_parquet_that_duckdb_and_polars_read(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    write_ndjson(tmp_path / "data" / "Patient.ndjson", PATIENTS)  # type: ignore[arg-type]
    config = str(write_config(tmp_path, tmp_path / "data"))
    run_cli("--config", config, "sync", "src", env=api_env)
    (tmp_path / "given.json").write_bytes(orjson.dumps(VIEW))
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"given.{fmt}"
        run_cli(
            "--config",
            config,
            "views",
            "run",
            str(tmp_path / "given.json"),
            "--format",
            fmt,
            "--out",
            str(out),
        )
        read = "read_csv" if fmt == "csv" else "read_parquet"
        assert duckdb.sql(f"SELECT * FROM {read}('{out}') ORDER BY ALL").fetchall() == EXPECTED
        frame = pl.read_csv(out) if fmt == "csv" else pl.read_parquet(out)
        assert sorted(frame.rows()) == EXPECTED
    shown = run_cli("--config", config, "views", "show", str(tmp_path / "given.json")).stdout
    assert shown.startswith("SELECT") and "FROM resources WHERE resource_type = 'Patient'" in shown


def test_views_errors_are_one_line(tmp_path: Path, api_env: dict[str, str]) -> None:
    write_ndjson(tmp_path / "data" / "Patient.ndjson", PATIENTS)  # type: ignore[arg-type]
    config = str(write_config(tmp_path, tmp_path / "data"))
    run_cli("--config", config, "sync", "src", env=api_env)
    several = {"resource": "Patient", "select": [{"column": [{"name": "given", "path": "name.given"}]}]}
    cases = {
        "several.json": (orjson.dumps(several), "column given: several values; set collection = true"),
        "broken.json": (b"{", "is not valid JSON"),
        "badpath.json": (
            orjson.dumps({"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.("}]}]}),
            "in FHIRPath 'name.('",
        ),
    }
    for name, (body, message) in cases.items():
        (tmp_path / name).write_bytes(body)
        result = run_cli("--config", config, "views", "run", str(tmp_path / name), "-f", "csv", check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, (name, result.stderr)
        assert message in lines[0], (name, lines[0])


def test_the_standard_views_are_listed_shown_and_documented(tmp_path: Path) -> None:
    from twin_store.views import load_view, schema_doc, view_files

    names = set(view_files())
    assert names == {
        "patient",
        "encounter",
        "condition",
        "observation",
        "lab_result",
        "vital_sign",
        "observation_component",
        "medication_request",
        "procedure",
        "immunization",
        "diagnostic_report",
        "allergy_intolerance",
        "patient_identifier",
    }
    listed = run_cli("views", "list", env={"COLUMNS": "400"}).stdout
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in listed.splitlines()
        if line.startswith("│")
    ]
    # One row per view: its name, the resource it reads, its title and its file (every file's
    # path holds its name, so a check for the names anywhere in the output could not fail).
    assert rows == [
        [name, view["resource"], view["title"], str(path)]
        for name, path in view_files().items()
        for view in [load_view(str(path))]
    ]
    shown = run_cli("views", "show", "lab_result").stdout
    assert "resource_type = 'Observation'" in shown and "laboratory" in shown
    committed = (ROOT / "docs" / "reference" / "views.md").read_text()
    assert committed == schema_doc(), (
        "docs/reference/views.md is stale: run `twinhub views doc > docs/reference/views.md` "
        "(or `.venv/bin/python docs/generate.py`)"
    )
