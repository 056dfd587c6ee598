from __future__ import annotations

import orjson
import pytest
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from harmonize.labs.rows import observation
from harmonize.records import reason
from tests.support.labs import ROW, SOURCE


def mapped(**changes: str) -> dict[str, object]:
    result: dict[str, object] = orjson.loads(observation({**ROW, **changes}, SOURCE))
    return result


def test_a_numeric_row_becomes_a_valid_lab_observation_keeping_the_decimals_as_written() -> None:
    resource = mapped()
    Observation.model_validate(resource)
    assert resource["valueQuantity"] == {
        "value": 5.50,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert b'"value":5.50' in observation(ROW, SOURCE) and b'"value":6.10' in observation(ROW, SOURCE)
    assert resource["effectiveDateTime"] == "2024-03-01T08:30:00+01:00", "the time zone is kept"
    assert resource["subject"] == {"reference": "Patient/p1"}
    assert resource["code"]["coding"] == [  # type: ignore[index]
        {"system": "http://loinc.org", "code": "14749-6", "display": "Glucose"}
    ]
    assert resource["referenceRange"][0]["high"]["value"] == 6.1  # type: ignore[index]
    assert resource["interpretation"][0]["coding"][0]["code"] == "N"  # type: ignore[index]
    assert resource["category"][0]["coding"][0]["code"] == "laboratory"  # type: ignore[index]
    assert resource["identifier"] == [{"system": "urn:twinhub:source:lab", "value": "r1"}]


def test_ids_are_stable_per_source_and_row_and_never_collide_across_sources() -> None:
    other = SOURCE.model_copy(update={"name": "other-lab"})
    assert mapped()["id"] == mapped(result="6.0")["id"], "an updated value keeps the resource"
    assert mapped()["id"] != mapped(result_id="r2")["id"]
    assert mapped()["id"] != orjson.loads(observation(ROW, other))["id"]


def test_text_and_coded_values_are_kept() -> None:
    assert mapped(result="<0.5")["valueString"] == "<0.5"
    coded = mapped(result="", coded="260385009", coded_system="http://snomed.info/sct")
    assert coded["valueCodeableConcept"] == {
        "coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mrn": " "}, "no patient (column 'mrn' is empty)"),
        ({"test": ""}, "no code (column 'test' is empty)"),
        ({"low": "about 4"}, "'about 4' is not a number"),
    ],
)
def test_rows_that_cannot_map_say_why(change: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        observation({**ROW, **change}, SOURCE)


def test_an_invalid_time_fails_fhir_validation_naming_the_field() -> None:
    text = observation({**ROW, "taken": "01/03/2024"}, SOURCE)  # mapped as sent: validation judges it
    with pytest.raises(ValidationError) as caught:
        Observation.model_validate_json(text)
    assert reason(caught.value).startswith("not a valid FHIR Observation: effectiveDateTime: ")
