from __future__ import annotations

import orjson
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.base import RECORD_SCHEMA
from harmonize.fhir_checks import check_resources


def records(lines: list[str], file: str = "/x/Observation.ndjson") -> pa.Table:
    return pa.table(
        {
            "file": [file] * len(lines),
            "line_no": list(range(1, len(lines) + 1)),
            "raw": lines,
            "bad_utf8": [False] * len(lines),
        },
        schema=RECORD_SCHEMA,
    )


def obs(**extra: object) -> str:
    return orjson.dumps({"resourceType": "Observation", "id": "o1", **extra}).decode()


def reasons(lines: list[str], file: str = "/x/Observation.ndjson") -> list[str | None]:
    checked = check_resources(records(lines, file))
    by_line = {r["line_no"]: r["reason"] for r in checked.problems.to_pylist()}
    by_line |= {r["line_no"]: None for r in checked.resources.to_pylist()}
    return [by_line[i] for i in range(1, len(lines) + 1)]


def test_good_resources_pass_with_their_fields() -> None:
    line = obs(
        meta={"lastUpdated": "2024-03-01T10:00:00+02:00", "versionId": "3"},
        subject={"reference": "Patient/p-1"},
        performer=[{"reference": "https://ehr.example/fhir/Practitioner/9/_history/2"}],
        contained=[{"reference": "#c1"}],
        focus=[{"reference": "urn:uuid:0f0e0d0c-0b0a-4900-8f7e-6d5c4b3a2910"}],
    )
    [row] = check_resources(records([line])).resources.to_pylist()
    assert (row["resource_type"], row["id"], row["meta_version_id"]) == ("Observation", "o1", "3")
    assert row["last_updated"].isoformat() == "2024-03-01T08:00:00+00:00"
    assert row["resource"] == line


def test_each_kind_of_bad_line_gets_its_reason() -> None:
    lines = [
        '{"resourceType": "Observation", "id": ',
        orjson.dumps({"resourceType": "Observation"}).decode(),
        orjson.dumps({"resourceType": "Patient", "id": "p1"}).decode(),
        obs(meta={"lastUpdated": "2024-02-30T00:00:00Z"}),
        obs(meta={"lastUpdated": "yesterday"}),
        obs(subject={"reference": "not a reference"}),
        obs(id="has space"),
        "",
        "[1, 2]",
        "   ",
        "  " + obs(),
        obs(),
    ]
    assert reasons(lines) == [
        "invalid JSON",
        "missing id",
        'resourceType "Patient" does not match the file, which holds Observation',
        'meta.lastUpdated "2024-02-30T00:00:00Z" is not a FHIR instant',
        'meta.lastUpdated "yesterday" is not a FHIR instant',
        'malformed reference "not a reference"',
        'invalid id "has space" (FHIR ids are 1-64 of A-Z a-z 0-9 - .)',
        "empty line",
        "not a JSON object",
        "empty line",
        None,
        None,
    ]


def test_files_not_named_for_a_type_accept_any_type() -> None:
    line = orjson.dumps({"resourceType": "Patient", "id": "p1"}).decode()
    assert reasons([line, obs()], file="/x/export.ndjson") == [None, None]


def test_window_time_falls_back_to_the_clinical_date() -> None:
    line = obs(effectiveDateTime="2019-05-01T12:00:00Z")
    [row] = check_resources(records([line]), clinical_dates=True).resources.to_pylist()
    assert row["last_updated"] is None
    assert row["window_time"].isoformat() == "2019-05-01T12:00:00+00:00"
    [row] = check_resources(records([line])).resources.to_pylist()
    assert row["window_time"] is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.text(), st.builds(obs, id=st.text(max_size=70))), max_size=20))
def test_every_line_either_lands_or_is_quarantined(lines: list[str]) -> None:
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    checked = check_resources(records(lines))
    landed = {r["line_no"] for r in checked.resources.to_pylist()}
    quarantined = {r["line_no"] for r in checked.problems.to_pylist()}
    assert landed | quarantined == set(range(1, len(lines) + 1))
    assert not landed & quarantined
    assert all(r["reason"] for r in checked.problems.to_pylist())


def test_references_off_the_fast_path_get_the_exact_check() -> None:
    def ref(value: str) -> str:
        return obs(subject={"reference": value})

    lines = [
        ref("Patient"),
        ref("Patient/"),
        ref("Patient/" + "a" * 65),
        ref("P/1"),
        ref("Patient/a b"),
        ref("Patient/1/_history/2"),
        ref("http://x.org/fhir/Patient/1"),
    ]
    assert reasons(lines) == [
        'malformed reference "Patient"',
        'malformed reference "Patient/"',
        f'malformed reference "Patient/{"a" * 65}"',
        'malformed reference "P/1"',
        'malformed reference "Patient/a b"',
        None,
        None,
    ]


def test_operation_outcomes_are_quarantined_with_the_servers_words() -> None:
    outcome = orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "diagnostics": "Patient/9 is gone"}],
        }
    ).decode()
    assert reasons([outcome], file="https://ehr/bulk/errors.ndjson") == [
        "the server reported an error (OperationOutcome): Patient/9 is gone"
    ]


def test_an_id_that_is_not_a_json_string_is_quarantined_not_landed() -> None:
    """json_extract_string reads 123 and true as "123" and "true": the JSON type must be string."""
    lines = [
        obs(id=123),
        obs(id=True),
        obs(id=1.5),
        obs(id=["o1"]),
        '{"resourceType": "Observation", "id" :  false}',
        obs(id="123"),  # a string of digits is a good id
        obs(code={"coding": [{"id": 7, "code": "x"}]}),  # a nested id is not the resource's
    ]
    assert reasons(lines) == [
        "id 123 is a JSON number, not a string (FHIR ids are strings: write it in quotes)",
        "id true is a JSON boolean, not a string (FHIR ids are strings: write it in quotes)",
        "id 1.5 is a JSON number, not a string (FHIR ids are strings: write it in quotes)",
        'id ["o1"] is a JSON array, not a string (FHIR ids are strings: write it in quotes)',
        "id false is a JSON boolean, not a string (FHIR ids are strings: write it in quotes)",
        None,
        None,
    ]
