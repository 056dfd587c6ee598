"""Lab result rows (from CSV exports) as FHIR R4 laboratory Observations.

Each row maps through the source's column config; the result is validated with the
fhir.resources R4B model before it may land. A row that cannot become a valid Observation goes
to quarantine with the reason; nothing is dropped. Ids are derived from the source name and the
row's own id (or, without one, its patient, code and time), so re-reading a file updates the
same resources, and two sources never collide.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from functools import partial
from typing import Any

import orjson
from fhir.resources.R4B.observation import Observation

from connectors.base import Batch
from connectors.labs.lab_csv import LabCsvSource
from harmonize.labs.codes import CodeMap, normalize_observation
from harmonize.records import map_records, patient_reference

UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
"""A FHIR decimal; kept as written (1.50 stays 1.50), never through a float."""
TWINHUB_IDS = uuid.UUID("8f0c5a52-4a5e-4a53-9a39-0b1e6d0f7c11")


def observations_from_rows(batch: Batch, source: LabCsvSource, codes: CodeMap | None = None) -> Batch:
    """The batch's rows (JSON objects, header -> text) as Observation records, bad rows as
    problems; codes and units normalized (`harmonize.labs.codes`), with `codes` as the local code map."""
    return map_records(batch, partial(row_observation, source=source, codes=codes))


def row_observation(
    raw: str, *, source: LabCsvSource, codes: CodeMap | None, noted: Counter[str]
) -> list[bytes]:
    """One row (a JSON object) as its validated Observation."""
    notes: list[str] = []
    resource = observation(orjson.loads(raw), source, codes, notes)
    Observation.model_validate_json(resource)
    noted.update(notes)
    return [resource]


def observation(
    row: dict[str, str], source: LabCsvSource, codes: CodeMap | None = None, notes: list[str] | None = None
) -> bytes:
    """One row as Observation JSON, codes and units normalized (what that did is appended to
    `notes`); raises ValueError naming what is missing."""
    columns = source.columns

    def cell(column: str | None) -> str | None:
        value = (row.get(column) or "").strip() if column else ""
        return value or None

    patient, code, time = cell(columns.patient), cell(columns.code), cell(columns.time)
    for name, value in (("patient", patient), ("code", code), ("time", time)):
        if value is None:
            raise ValueError(f"no {name} (column {getattr(columns, name)!r} is empty)")
    assert patient is not None
    key = cell(columns.id) or f"{patient}|{code}|{time}"
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": str(uuid.uuid5(TWINHUB_IDS, f"{source.name}|{key}")),
        "meta": {"source": f"urn:twinhub:source:{source.name}"},
    }
    if original := cell(columns.id):
        resource["identifier"] = [{"system": f"urn:twinhub:source:{source.name}", "value": original}]
    resource["status"] = cell(columns.status) or "final"
    resource["category"] = [{"coding": [{"system": CATEGORY, "code": "laboratory", "display": "Laboratory"}]}]
    coding = {"system": cell(columns.code_system) or source.code_system, "code": code}
    if display := cell(columns.display):
        coding["display"] = display
    resource["code"] = {"coding": [coding], **({"text": display} if display else {})}
    resource["subject"] = patient_reference(patient, source.patient_system)
    if encounter := cell(columns.encounter):
        resource["encounter"] = {"reference": f"Encounter/{encounter}"}
    resource["effectiveDateTime"] = time
    if issued := cell(columns.issued):
        resource["issued"] = issued
    value = cell(columns.value)
    if value is not None and NUMBER.fullmatch(value):
        resource["valueQuantity"] = _quantity(value, cell(columns.unit), cell(columns.ucum))
    elif value_code := cell(columns.value_code):
        concept = {"system": cell(columns.value_code_system), "code": value_code}
        concept |= {"display": d} if (d := cell(columns.value_code_display)) else {}
        resource["valueCodeableConcept"] = {"coding": [{k: v for k, v in concept.items() if v}]}
    elif value is not None:
        resource["valueString"] = value
    ranges = {
        side: _quantity(bound, cell(columns.unit), cell(columns.ucum))
        for side, bound in (("low", cell(columns.reference_low)), ("high", cell(columns.reference_high)))
        if bound is not None
    }
    if ranges:
        resource["referenceRange"] = [ranges]
    if flag := cell(columns.interpretation):
        resource["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]
    done = normalize_observation(resource, codes)
    if notes is not None:
        notes += done
    return orjson.dumps(resource)


def _quantity(number: str, unit: str | None, ucum: str | None) -> dict[str, Any]:
    if not NUMBER.fullmatch(number):
        raise ValueError(f"{number!r} is not a number")
    quantity: dict[str, Any] = {"value": orjson.Fragment(number)}
    if unit or ucum:
        quantity["unit"] = unit or ucum
    if ucum:
        quantity |= {"system": UCUM, "code": ucum}
    return quantity
