"""ViewDefinitions compiled to DuckDB SQL: the official SQL-on-FHIR v2 suite, read in place
from ../shared, plus the project's own cases so a fresh clone still tests the compiler."""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pytest

from harmonize.sql_on_fhir.fhirpath import MACROS_SQL
from harmonize.sql_on_fhir.view_definition import ViewError, compile_view
from tests.support.data import SHARED

SUITE = SHARED.parent / "sql-on-fhir"
SUITE_FILES = [*sorted((SUITE / "tests").glob("*.json")), SUITE / "upstream-newer" / "fn_reference_keys.json"]


def run_view(resources: list[dict[str, Any]], view: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of `view` over `resources`, values as JSON types."""
    with duckdb.connect() as con:
        con.execute(MACROS_SQL)
        con.execute(
            "CREATE TABLE resources AS SELECT json_extract_string(r, '$.resourceType') AS resource_type, "
            "r::VARCHAR AS resource FROM (SELECT unnest(?::JSON[]) AS r)",
            [[json.dumps(r) for r in resources]],
        )
        relation = con.execute(compile_view(view).sql)
        names = [d[0] for d in relation.description]
        rows = [
            {
                name: None if value is None else json.loads(value)
                for name, value in zip(names, row, strict=True)
            }
            for row in relation.fetchall()
        ]
    return names, rows


def as_set(rows: list[dict[str, Any]]) -> list[str]:
    """Rows compared as the reference runner does: ignoring order, keys and values exact."""
    return sorted(json.dumps(row, sort_keys=True) for row in rows)


def official_cases() -> list[Any]:
    if not SUITE.is_dir():
        return [
            pytest.param(None, None, marks=pytest.mark.skip(reason=f"SQL-on-FHIR suite not found at {SUITE}"))
        ]
    cases = []
    for file in SUITE_FILES:
        suite = json.loads(file.read_text())
        for case in suite["tests"]:
            cases.append(pytest.param(suite["resources"], case, id=f"{file.stem}: {case['title']}"))
    return cases


@pytest.mark.shared
@pytest.mark.parametrize(("resources", "case"), official_cases())
def test_official_suite(resources: list[dict[str, Any]], case: dict[str, Any]) -> None:
    if case.get("expectError"):
        with pytest.raises((ViewError, duckdb.Error)):
            run_view(resources, case["view"])
    else:
        names, rows = run_view(resources, case["view"])
        assert as_set(rows) == as_set(case["expect"])
        if "expectColumns" in case:
            assert names == case["expectColumns"]


PATIENTS = [
    {
        "resourceType": "Patient",
        "id": "a",
        "name": [{"use": "official", "family": "Ek", "given": ["Al", "Bo"]}],
    },
    {"resourceType": "Patient", "id": "b", "name": [{"family": "Ng"}, {"family": "Ox"}], "active": True},
    {"resourceType": "Observation", "id": "o", "status": "final"},
]


def test_for_each_flattens_and_columns_keep_their_order() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {"column": [{"name": "id", "path": "getResourceKey()"}]},
            {
                "forEach": "name",
                "column": [{"name": "family", "path": "family"}, {"name": "n", "path": "%rowIndex"}],
            },
        ],
    }
    names, rows = run_view(PATIENTS, view)
    assert names == ["id", "family", "n"]
    assert as_set(rows) == as_set(
        [
            {"id": "a", "family": "Ek", "n": 0},
            {"id": "b", "family": "Ng", "n": 0},
            {"id": "b", "family": "Ox", "n": 1},
        ]
    )


def test_collections_constants_and_where() -> None:
    view = {
        "resource": "Patient",
        "constant": [{"name": "use", "valueCode": "official"}],
        "where": [{"path": "name.where(use = %use).exists()"}],
        "select": [
            {
                "column": [
                    {"name": "given", "path": "name.given", "collection": True},
                    {"name": "joined", "path": "name.given.join(' ')"},
                ]
            }
        ],
    }
    assert run_view(PATIENTS, view)[1] == [{"given": ["Al", "Bo"], "joined": "Al Bo"}]


def test_several_values_in_a_single_column_fail_with_the_column_named() -> None:
    view = {"resource": "Patient", "select": [{"column": [{"name": "family", "path": "name.family"}]}]}
    with pytest.raises(duckdb.Error, match="column family: several values; set collection = true"):
        run_view(PATIENTS, view)


@pytest.mark.parametrize(
    ("view", "message"),
    [
        ({"select": [{"column": [{"name": "id", "path": "id"}]}]}, "the view has no `resource`"),
        (
            {"resource": "Patient", "select": [{"forEach": 1}]},
            "view.select[0].forEach must be a FHIRPath string",
        ),
        (
            {"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.("}]}]},
            "in FHIRPath 'name.('",
        ),
        (
            {
                "resource": "Patient",
                "select": [{"column": [{"name": "x", "path": "name.where(use = %nope)"}]}],
            },
            "%nope is not a constant of the view",
        ),
        (
            {"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.descendants()"}]}]},
            "function descendants() is not supported",
        ),
        (
            {
                "resource": "Patient",
                "select": [
                    {
                        "unionAll": [
                            {"column": [{"name": "a", "path": "id"}]},
                            {"column": [{"name": "b", "path": "id"}]},
                        ]
                    }
                ],
            },
            "unionAll branches must have the same columns",
        ),
    ],
)
def test_invalid_views_fail_at_compile_time_naming_the_problem(view: dict[str, Any], message: str) -> None:
    with pytest.raises(ViewError) as caught:
        compile_view(view)
    assert message in str(caught.value)
