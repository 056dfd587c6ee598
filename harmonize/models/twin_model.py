"""The seam a twin model plugs into: what it reads, for whom, and a pure function from a frame
of inputs to a frame of outputs.

A model is found by the Python entry-point group `twinhub.models` (so a user's package adds
models without touching twinhub) and runs when the config enables it. The store runs its
`query` over the tables it `reads`, pinned to one snapshot, and hands the rows to `compute`;
`compute` returns one row per patient (OUTPUT_COLUMNS). A patient whose inputs are missing or out
of range gets status "refused" and the reason, never a number; an exception while computing one
patient's row becomes that patient's "error", and the others still refresh.

Population models that learn (`trainable`) are fitted on every patient's rows with `train`,
retrained when enough new patients have arrived; `compute` then receives the fitted parameters.

Pure: no I/O, no clock. Models read only the sources' tables, never other models' outputs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import polars as pl

from harmonize.records import key_reference

Scope = Literal["patient", "population"]
OUTPUT_COLUMNS: dict[str, pl.DataType | type[pl.DataType]] = {
    "patient_id": pl.String,
    "status": pl.String,
    "value": pl.Float64,
    "outputs": pl.String,
    "reason": pl.String,
    "inputs": pl.List(pl.String),
}
"""What `compute` returns, per patient: status ok/refused/error, the main number (a risk as a
fraction, a heart rate), every output as a JSON object, the reason when not ok, and the ids of
the rows it used (`<table>/<id>`, e.g. lab_result/abc), which lineage follows back."""


@dataclass(frozen=True, kw_only=True)
class FhirOutput:
    """How an ok output becomes FHIR: a RiskAssessment of `outcome`, or an Observation coded
    `code` (LOINC) in `unit`."""

    resource: Literal["RiskAssessment", "Observation"]
    outcome: str = ""
    code: str = ""
    display: str = ""
    unit: str = ""


@dataclass(frozen=True, kw_only=True)
class Trained:
    """What `train` returns: the fitted parameters (JSON-able) and how well they fit."""

    params: dict[str, Any]
    metrics: dict[str, float]
    patients: int


@dataclass(frozen=True, kw_only=True)
class TwinModel:
    name: str
    version: str
    """Bump it when `compute` changes: every patient is then computed again."""
    description: str
    reads: tuple[str, ...]
    """Store tables and views the query reads; a change in any of them (for a patient, with
    scope "patient") triggers a refresh."""
    scope: Scope
    query: str
    """DuckDB SQL over the tables in `reads` (as of the snapshot computed from); for scope
    "patient" it keeps to the patients in the table `scope_patients(patient_id)`."""
    compute: Callable[[pl.DataFrame, dict[str, Any] | None], pl.DataFrame]
    """Input rows (and the fitted parameters of a trainable model, else None) -> OUTPUT_COLUMNS."""
    fhir: FhirOutput
    train: Callable[[pl.DataFrame], Trained] | None = None
    retrain_after: int = 50
    """A trainable model is fitted again once this many patients have arrived since its last
    training (the config may set it per model)."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.train is not None


def output_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """OUTPUT_COLUMNS rows as a frame (models build their rows as dicts)."""
    return pl.DataFrame(rows, schema=OUTPUT_COLUMNS)


# -- outputs as FHIR ---------------------------------------------------------------------------

MODEL_SYSTEM = "urn:twinhub:model"
TWINHUB_IDS = uuid.UUID("5c6b7d2a-0f4e-4b8d-9a51-2e7c3f6a9b10")
RESOURCE_OF_TABLE = {
    "lab_result": "Observation",
    "observation": "Observation",
    "vital_sign": "Observation",
    "observation_component": "Observation",
    "condition": "Condition",
    "medication_request": "MedicationRequest",
    "patient": "Patient",
    "procedure": "Procedure",
    "encounter": "Encounter",
    "immunization": "Immunization",
    "diagnostic_report": "DiagnosticReport",
    "allergy_intolerance": "AllergyIntolerance",
    "wearable_daily": "Observation",
}
"""The store's views and the resource type their rows are, for an output's references to its inputs
(a `wearable_daily` row is named by its `observation_id`, the daily Observation made of it)."""


def output_id(model: str, patient_id: str) -> str:
    """The id of a patient's output resource: one per model and patient, versioned by the store."""
    return str(uuid.uuid5(TWINHUB_IDS, f"{model}|{patient_id}"))


def output_resources(model: TwinModel, version: str, outputs: pl.DataFrame, as_of: datetime) -> list[bytes]:
    """The FHIR of a refresh's outputs (R4B-validated): a RiskAssessment or an Observation per
    patient computed; a refusal is a cancelled one saying why (so an earlier figure never stands
    as current), an error leaves the patient's last resource as it was. `as_of` is the input
    snapshot's time, so the same snapshot gives the same resource."""
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.riskassessment import RiskAssessment

    made = []
    for row in outputs.filter(pl.col("status") != "error").iter_rows(named=True):
        resource = (_risk_assessment if model.fhir.resource == "RiskAssessment" else _observation)(
            model, version, row, as_of
        )
        text = orjson.dumps(resource)
        (RiskAssessment if model.fhir.resource == "RiskAssessment" else Observation).model_validate_json(text)
        made.append(text)
    return made


def _common(model: TwinModel, version: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": model.fhir.resource,
        "id": output_id(model.name, row["patient_id"]),
        "meta": {"source": f"{MODEL_SYSTEM}:{model.name}"},
        "subject": {"reference": key_reference(row["patient_id"])},
        "note": [{"text": row["reason"] if row["status"] == "refused" else f"outputs: {row['outputs']}"}],
    }


def _method(model: TwinModel, version: str) -> dict[str, Any]:
    coding = {"system": MODEL_SYSTEM, "code": model.name, "version": version, "display": model.description}
    return {"coding": [coding], "text": f"{model.name} {version}"}


def _references(inputs: list[str] | None) -> list[dict[str, str]]:
    refs = []
    for item in inputs or []:
        table, _, ident = item.partition("/")
        if kind := RESOURCE_OF_TABLE.get(table):  # a view row's key names its source too
            refs.append({"reference": key_reference(ident, kind)})
    return list({r["reference"]: r for r in refs}.values())


def _risk_assessment(model: TwinModel, version: str, row: dict[str, Any], as_of: datetime) -> dict[str, Any]:
    resource = _common(model, version, row) | {
        "status": "final" if row["status"] == "ok" else "cancelled",
        "method": _method(model, version),
        "occurrenceDateTime": as_of.astimezone(UTC).isoformat(timespec="seconds"),
    }
    if basis := _references(row["inputs"]):
        resource["basis"] = basis
    if row["status"] == "ok":
        resource["prediction"] = [
            {"outcome": {"text": model.fhir.outcome}, "probabilityDecimal": round(row["value"], 6)}
        ]
    return resource


def _observation(model: TwinModel, version: str, row: dict[str, Any], as_of: datetime) -> dict[str, Any]:
    resource = _common(model, version, row) | {
        "status": "final" if row["status"] == "ok" else "cancelled",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": model.fhir.code, "display": model.fhir.display}
            ],
            "text": f"{model.fhir.display} ({model.name})",
        },
        "method": _method(model, version),
        "effectiveDateTime": as_of.astimezone(UTC).isoformat(timespec="seconds"),
    }
    if derived := _references(row["inputs"]):
        resource["derivedFrom"] = derived
    if row["status"] == "ok" and row["value"] is not None:
        unit = model.fhir.unit
        resource["valueQuantity"] = {
            "value": round(row["value"], 2),
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        }
    return resource
