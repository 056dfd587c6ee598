"""ViewDefinitions compiled to DuckDB SQL: the official SQL-on-FHIR v2 suite, read in place
from ../shared, plus the project's own cases so a fresh clone still tests the compiler. Every
case runs the relation `twinhub views run` runs (`view_relation` over a store's resources)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import duckdb
import pytest

from harmonize.sql_on_fhir.view_definition import ViewError, compile_view
from tests.support.data import SHARED
from twin_store.views import view_relation

SUITE = SHARED.parent / "sql-on-fhir"
SUITE_FILES = [*sorted((SUITE / "tests").glob("*.json")), SUITE / "upstream-newer" / "fn_reference_keys.json"]


@contextmanager
def view_over(resources: list[dict[str, Any]], view: dict[str, Any]) -> Iterator[duckdb.DuckDBPyRelation]:
    """The relation `twinhub views run` runs, over `resources` in a store's `twin.fhir_resource`
    (the store keeps each resource as JSON text)."""
    with duckdb.connect() as con:
        con.execute("ATTACH ':memory:' AS twin")
        con.execute(
            "CREATE TABLE twin.fhir_resource AS SELECT json_extract_string(r, '$.resourceType') AS "
            "resource_type, r::VARCHAR AS resource FROM (SELECT unnest(?::JSON[]) AS r)",
            [[json.dumps(r) for r in resources]],
        )
        yield view_relation(con, view)


def run_view(resources: list[dict[str, Any]], view: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of `view` over `resources`, each value as JSON has it (a decimal is
    a JSON number: the suite's 5 is 5.0, as in the reference runner's JavaScript)."""
    with view_over(resources, view) as relation:
        types = [str(t) for t in relation.types]
        rows = [
            {
                name: as_json(value, type_)
                for name, value, type_ in zip(relation.columns, row, types, strict=True)
            }
            for row in relation.fetchall()
        ]
        return relation.columns, rows


def as_json(value: Any, sql_type: str) -> Any:
    if value is None:
        return None
    if sql_type == "JSON":
        return json.loads(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    assert isinstance(value, bool | int | str), f"{value!r} of {sql_type} has no JSON form in the suite"
    return value


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


def column_view(resource: str, path: str, **select: Any) -> dict[str, Any]:
    return {
        "name": "typo",
        "resource": resource,
        "select": [{"column": [{"name": "c", "path": path}], **select}],
    }


@pytest.mark.parametrize(
    ("view", "unknown", "closest"),
    [
        (column_view("Patient", "birthdate"), "Patient has no element 'birthdate'", "birthDate"),
        (column_view("Patient", "name.givne.first()"), "HumanName has no element 'givne'", "given"),
        (
            column_view("Observation", "value.ofType(Quantity).valu"),
            "Quantity has no element 'valu'",
            "value",
        ),
        (
            column_view("Observation", "value.ofType(Quantiy).value"),
            "Observation.value has no type 'Quantiy'",
            "Quantity",
        ),
        (
            column_view("Observation", "component.cod.text", collection=True),
            "ObservationComponent has no element 'cod'",
            "code",
        ),
        (
            column_view("Observation", "valu.ofType(Quantity).value", forEach="component"),
            "ObservationComponent has no element 'valu'",
            "value",
        ),
        (
            column_view("Patient", "extension('http://example.org/x').value.ofType(Codng).code"),
            "Extension.value has no type 'Codng'",
            "Coding",
        ),
        (
            column_view("Patient", "extension('http://example.org/x').valueCodng.code"),
            "Extension has no element 'valueCodng'",
            "valueCoding",
        ),
        (
            column_view("Patient", "name.where(uze = 'official').family.first()"),
            "HumanName has no element 'uze'",
            "use",
        ),
    ],
)
def test_an_unknown_element_fails_naming_the_view_column_and_closest_element(
    view: dict[str, Any], unknown: str, closest: str
) -> None:
    with pytest.raises(ViewError) as caught:
        compile_view(view)
    message = str(caught.value)
    path = view["select"][0]["column"][0]["path"]
    assert "\n" not in message
    assert message.startswith("view 'typo': column c: "), message
    assert f"{unknown}; did you mean {closest}?" in message and repr(path) in message, message


def test_unknown_resources_and_elements_of_for_each_and_where_fail_too() -> None:
    for view, message in [
        ({**column_view("Patient", "id"), "resource": "Patinet"}, "'Patinet' is not a FHIR R4 resource type"),
        (
            column_view("Patient", "family", forEach="nmae"),
            "Patient has no element 'nmae'; did you mean name?",
        ),
        (
            {**column_view("Patient", "id"), "where": [{"path": "activ = true"}]},
            "Patient has no element 'activ'; did you mean active?",
        ),
    ]:
        with pytest.raises(ViewError, match="^view 'typo': .*" + message.replace("?", r"\?")):
            compile_view(view)


PEOPLE = [
    {
        "resourceType": "Patient",
        "id": "a",
        "active": True,
        "gender": "female",
        "birthDate": "1970-02",
        "multipleBirthInteger": 2,
        "deceasedBoolean": False,
        "name": [{"family": "Ek", "given": ["Al"]}],
    },
    {"resourceType": "Patient", "id": "b", "active": False},
    {
        "resourceType": "Observation",
        "id": "o",
        "status": "final",
        "code": {"text": "hr"},
        "valueQuantity": {"value": 0.1},
        "issued": "2024-03-01T09:20:00.5+01:00",
    },
]
PATIENT_COLUMNS = {  # path: the column's DuckDB type, from the schema or the function
    "getResourceKey()": "VARCHAR",
    "active": "BOOLEAN",
    "name.exists()": "BOOLEAN",
    "deceased.exists()": "BOOLEAN",
    "multipleBirth.ofType(integer)": "INTEGER",
    "name.count()": "INTEGER",
    "gender": "VARCHAR",
    "birthDate": "VARCHAR",
    "name.first()": "JSON",
    "name.family": "JSON",  # a collection
}


@pytest.mark.parametrize("general", [False, True], ids=["projection", "general form"])
def test_columns_take_their_type_from_the_schema_and_the_path(general: bool) -> None:
    columns = [
        {"name": f"c{i}", "path": path, **({"collection": True} if path == "name.family" else {})}
        for i, path in enumerate(PATIENT_COLUMNS)
    ]
    if general:  # %rowIndex needs the general (collection) form of the query
        columns.append({"name": "row", "path": "%rowIndex"})
    view = {"resource": "Patient", "select": [{"column": columns}]}
    with view_over(PEOPLE, view) as relation:
        types = dict(zip(relation.columns, map(str, relation.types), strict=True))
        rows = sorted(relation.fetchall())
    assert [types[f"c{i}"] for i in range(len(PATIENT_COLUMNS))] == list(PATIENT_COLUMNS.values())
    assert rows[0][:9] == ("a", True, True, True, 2, 1, "female", "1970-02", '{"family":"Ek","given":["Al"]}')
    assert rows[1][:9] == ("b", False, False, False, None, 0, None, None, None)
    if general:
        assert types["row"] == "INTEGER"


def test_decimals_are_exact_and_instants_timestamps() -> None:
    view = {
        "resource": "Observation",
        "select": [
            {
                "column": [
                    {"name": "value", "path": "value.ofType(Quantity).value"},
                    {"name": "declared", "path": "value.ofType(Quantity).value", "type": "decimal"},
                    {"name": "sum", "path": "value.ofType(Quantity).value + 0.2"},
                    {"name": "issued", "path": "issued"},
                    {"name": "as_text", "path": "issued", "type": "string"},
                ]
            }
        ],
    }
    with view_over(PEOPLE, view) as relation:
        assert [str(t) for t in relation.types] == [
            "DECIMAL(38,12)",
            "DECIMAL(38,12)",
            "DECIMAL(38,12)",
            "TIMESTAMP WITH TIME ZONE",
            "VARCHAR",
        ]
        [(value, declared, total, issued, as_text)] = relation.fetchall()
    assert value == declared == Decimal("0.1") and total == Decimal("0.3")
    assert issued.isoformat() == "2024-03-01T08:20:00.500000+00:00"
    assert as_text == "2024-03-01T09:20:00.5+01:00"
