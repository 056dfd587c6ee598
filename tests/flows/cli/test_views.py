"""`twinhub views` over a real store: files that DuckDB and polars read back, one-line errors,
views known by name, queries that run as printed."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import orjson
import polars as pl
import pytest

from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from tests.support.cli import run_cli
from tests.support.data import ROOT, write_ndjson
from twin_store import TwinStore, prepare

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


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding PATIENTS, landed as `sync` lands them (no Prefect: the views only read)."""
    root = tmp_path_factory.mktemp("views")
    write_ndjson(root / "data" / "Patient.ndjson", PATIENTS)  # type: ignore[arg-type]
    with TwinStore(root / "store") as twin:
        run = twin.begin_run("src", "sync")
        source = FhirNdjsonSource(name="src", kind="fhir-ndjson", path=root / "data")
        for batch in FhirNdjsonConnector(source).pull(None):
            twin.land(run, prepare(batch))
        twin.finish_run(run, "succeeded")
    return root / "store"


def views_config(folder: Path, store: Path, views: dict[str, bytes]) -> str:
    """A config reading `store`, with `views` (file name: content) in its views folder."""
    (folder / "views").mkdir(parents=True)
    for name, body in views.items():
        (folder / "views" / name).write_bytes(body)
    (folder / "twinhub.toml").write_text(f'[store]\npath = "{store}"\n\n[views]\npath = "views"\n')
    return str(folder / "twinhub.toml")


def table_rows(stdout: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("│")
    ]


def test_views_run_writes_csv_and_parquet_that_duckdb_and_polars_read(tmp_path: Path, store: Path) -> None:
    config = views_config(tmp_path, store, {})
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
    assert shown.startswith("WITH resources AS") and "FROM resources WHERE resource_type = 'Patient'" in shown


def test_views_errors_are_one_line(tmp_path: Path, store: Path) -> None:
    config = views_config(tmp_path, store, {})
    several = {"resource": "Patient", "select": [{"column": [{"name": "given", "path": "name.given"}]}]}
    cases = {
        "several.json": (orjson.dumps(several), "column given: several values; set collection = true"),
        "broken.json": (b"{", "is not valid JSON"),
        "badpath.json": (
            orjson.dumps({"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.("}]}]}),
            "in FHIRPath 'name.('",
        ),
        "misspelled.json": (
            orjson.dumps(
                {"resource": "Patient", "select": [{"column": [{"name": "born", "path": "birthdate"}]}]}
            ),
            "view 'misspelled': column born: Patient has no element 'birthdate'; did you mean birthDate?",
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


def test_user_views_are_named_by_their_name_and_bad_files_are_warned_of(tmp_path: Path, store: Path) -> None:
    named = {**VIEW, "name": "given_names", "title": "Given names"}
    config = views_config(
        tmp_path,
        store,
        {
            "gn.json": orjson.dumps(named),
            "nameless.json": orjson.dumps(VIEW),
            "broken.json": b'{"resource": "Patient",\n "select": [}',
            "patient_list.json": b'[{"resourceType": "Patient"}]',
            "first.json": orjson.dumps({**VIEW, "name": "twice"}),
            "second.json": orjson.dumps({**VIEW, "name": "twice"}),
        },
    )
    listed = run_cli("--config", config, "views", "list", env={"COLUMNS": "400"})
    rows = {row[0]: row for row in table_rows(listed.stdout)}
    assert rows["given_names"] == [
        "given_names",
        "Patient",
        "Given names",
        str(tmp_path / "views" / "gn.json"),
    ]
    assert rows["nameless"][3] == str(tmp_path / "views" / "nameless.json")
    assert {"gn", "broken", "patient_list", "twice", "first", "second"}.isdisjoint(rows)
    assert "patient" in rows and "lab_result" in rows  # the library's, still there
    warnings = listed.stderr.splitlines()
    assert len(warnings) == 4, listed.stderr
    assert any(
        f"{tmp_path / 'views' / 'broken.json'}: is not valid JSON (" in w and "line 2 column 13" in w
        for w in warnings
    ), warnings
    assert any("patient_list.json: must hold one ViewDefinition object" in w for w in warnings), warnings
    for one, other in [("first", "second"), ("second", "first")]:
        twice = f"{one}.json: holds the view 'twice', as does {other}.json; give one another `name`"
        assert any(twice in w for w in warnings), warnings

    ran = run_cli("--config", config, "views", "run", "given_names", "-f", "csv")
    assert sorted(ran.stdout.splitlines()[1:]) == ["p1,true,Ann", "p1,true,Bea", "p2,false,Cy"]
    failed = run_cli("--config", config, "views", "run", "twice", check=False)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert "second.json': holds the view 'twice', as does first.json; give one" in lines[0], lines[0]


def test_views_run_json_keeps_column_types(tmp_path: Path, store: Path) -> None:
    untyped = {
        "resource": "Patient",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "getResourceKey()"},
                    {"name": "active", "path": "active"},
                    {"name": "has_name", "path": "name.exists()"},
                    {"name": "names", "path": "name.given.count()"},
                ]
            }
        ],
    }
    config = views_config(tmp_path, store, {"flags.json": orjson.dumps(untyped)})
    printed = run_cli("--config", config, "views", "run", "flags", "-f", "json").stdout
    assert sorted(json.loads(printed), key=lambda row: row["id"]) == [
        {"id": "p1", "active": True, "has_name": True, "names": 2},
        {"id": "p2", "active": False, "has_name": True, "names": 1},
    ]


def test_views_show_prints_sql_that_twinhub_sql_runs(tmp_path: Path, store: Path) -> None:
    nested = {  # the general form: forEachOrNull, %rowIndex and a where, all through fp_* macros
        "name": "names_by_row",
        "resource": "Patient",
        "where": [{"path": "name.given.where($this = 'Cy').empty() or active"}],
        "select": [
            {"column": [{"name": "id", "path": "getResourceKey()"}]},
            {
                "forEachOrNull": "name.given",
                "column": [{"name": "given", "path": "$this"}, {"name": "i", "path": "%rowIndex"}],
            },
        ],
    }
    config = views_config(tmp_path, store, {"nested.json": orjson.dumps(nested)})
    for name, rows in [("patient", 2), ("names_by_row", 2)]:
        shown = run_cli("--config", config, "views", "show", name).stdout
        assert "FROM resources" in shown and "fhir_resource" in shown, shown
        queried = json.loads(run_cli("--config", config, "sql", shown, "-f", "json").stdout)
        ran = json.loads(run_cli("--config", config, "views", "run", name, "-f", "json").stdout)
        key = json.dumps
        assert len(ran) == rows and sorted(map(key, queried)) == sorted(map(key, ran)), name
