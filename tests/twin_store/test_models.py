"""Twin model refreshes in the real store: what changed decides who is computed, outputs keep
their input snapshot, a model's own FHIR never triggers it, one patient's error stays theirs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from fhir.resources.R4B import get_fhir_model_class

from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from flows.sync import land_batches
from harmonize.models.ascvd_pce import MODEL as PCE
from harmonize.models.twin_model import TwinModel, output_frame
from tests.support.data import write_ndjson
from twin_store import TwinStore, connect
from twin_store.models import ModelRunReport, refresh

LOINC = "http://loinc.org"


def patient(pid: str, born: str, gender: str, race: str = "2106-3") -> dict[str, Any]:
    omb = {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race}
    race_ext = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [{"url": "ombCategory", "valueCoding": omb}],
    }
    return {
        "resourceType": "Patient",
        "id": pid,
        "birthDate": born,
        "gender": gender,
        "extension": [race_ext],
    }


def category(code: str) -> list[dict[str, Any]]:
    return [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": code}]}
    ]


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def lab(oid: str, pid: str, code: str, value: float, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": category("laboratory"),
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": quantity(value, "mg/dL"),
    }


def blood_pressure(oid: str, pid: str, systolic: float, when: str) -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": quantity(value, "mm[Hg]"),
        }

    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": category("vital-signs"),
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "component": [component("8480-6", systolic), component("8462-4", 80)],
    }


def smoking(oid: str, pid: str, snomed: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "72166-2"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": snomed}]},
    }


def twins(cholesterol_of_p2: float = 213) -> list[dict[str, Any]]:
    """Three people the equations take (55-year-olds as in the paper's example), one too young."""
    resources: list[dict[str, Any]] = []
    people = (
        ("p1", "female", "2106-3", 213),
        ("p2", "male", "2054-5", cholesterol_of_p2),
        ("p3", "male", "2106-3", 213),
    )
    for pid, gender, race, chol in people:
        resources += [
            patient(pid, "1965-03-01", gender, race),
            lab(f"{pid}-tc", pid, "2093-3", chol, "2020-06-01T09:00:00Z"),
            lab(f"{pid}-hdl", pid, "2085-9", 50, "2020-06-01T09:00:00Z"),
            blood_pressure(f"{pid}-bp", pid, 120, "2020-06-01T09:10:00Z"),
            smoking(f"{pid}-smk", pid, "266919005", "2020-06-01T09:15:00Z"),
        ]
    resources += [
        patient("kid", "2015-01-01", "female"),
        lab("kid-tc", "kid", "2093-3", 150, "2020-06-01T09:00:00Z"),
    ]
    return resources


def land(store_root: Path, folder: Path) -> int:
    with TwinStore(store_root) as store:
        run = store.begin_run("ehr", "sync")
        source = FhirNdjsonSource(name="ehr", kind="fhir-ndjson", path=folder)
        land_batches(store, run, FhirNdjsonConnector(source).pull(store.watermark("ehr")))
        return store.finish_run(run, "succeeded").snapshot_id or 0


def run_model(store_root: Path, model: TwinModel = PCE) -> ModelRunReport:
    with TwinStore(store_root) as store:
        return refresh(store, model, trigger="test")


def outputs(store_root: Path, model: str = "ascvd-pce") -> list[tuple[Any, ...]]:
    return (
        connect(store_root)
        .sql(
            f"""SELECT patient_id, status, value, input_snapshot_id FROM model_output
        WHERE model = '{model}' ORDER BY patient_id, input_snapshot_id"""
        )
        .fetchall()
    )


def test_outputs_carry_their_snapshot_and_valid_fhir_and_a_rerun_adds_nothing(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    snapshot = land(tmp_path / "store", tmp_path / "ehr")
    first = run_model(tmp_path / "store")
    assert first.scope == "full" and first.input_snapshot_id >= snapshot, "computed from the sync's data"
    got = {pid: (status, value) for pid, status, value, _ in outputs(tmp_path / "store")}
    assert got["kid"][0] == "refused"
    # The paper's worked example: white woman 2.1 %, African-American man 6.1 %, white man 5.3 %.
    assert [100 * got[p][1] for p in ("p1", "p2", "p3")] == pytest.approx([2.1, 6.1, 5.3], abs=0.1)
    assert {snap for *_, snap in outputs(tmp_path / "store")} == {first.input_snapshot_id}
    con = connect(tmp_path / "store")
    stored = con.sql("SELECT resource FROM fhir_resource WHERE resource_type = 'RiskAssessment'").fetchall()
    assert len(stored) == 3, "the refused kid, never computed before, gets no RiskAssessment"
    for (text,) in stored:
        risk = get_fhir_model_class("RiskAssessment").model_validate_json(text)
        assert risk.prediction[0].probabilityDecimal > 0 and risk.basis  # lineage to the inputs
    again = run_model(tmp_path / "store")
    assert again.scope == "unchanged" and len(outputs(tmp_path / "store")) == 4
    reland = land(tmp_path / "store", tmp_path / "ehr")  # nothing new in the source
    assert run_model(tmp_path / "store").scope == "unchanged" and reland > snapshot
    assert len(outputs(tmp_path / "store")) == 4


def test_a_changed_lab_refreshes_that_patient_only(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    run_model(tmp_path / "store")
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins(cholesterol_of_p2=250))  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    report = run_model(tmp_path / "store")
    snapshot = report.input_snapshot_id
    assert (report.scope, report.counts["patients"]) == ("changed", 1)
    per_patient = pl.DataFrame(outputs(tmp_path / "store"), schema=["p", "s", "v", "snap"], orient="row")
    counts = dict(per_patient.group_by("p").len().iter_rows())
    assert counts == {"p1": 1, "p2": 2, "p3": 1, "kid": 1}
    newest = per_patient.filter(pl.col("p") == "p2").sort("snap")
    assert newest["snap"][-1] == snapshot and newest["v"][-1] > newest["v"][0], "more cholesterol, more risk"
    # Time travel from the output back to the exact input it was computed from
    (inputs,) = connect(tmp_path / "store").sql(
        f"SELECT inputs FROM model_output WHERE patient_id = 'p2' AND input_snapshot_id = {snapshot}"
    ).fetchone() or ([],)
    lab_id = next(i.removeprefix("lab_result/") for i in inputs if i.startswith("lab_result/p2-tc"))
    then = (
        connect(tmp_path / "store")
        .sql(f"SELECT value_numeric FROM lab_result AT (VERSION => {snapshot}) WHERE id = '{lab_id}'")
        .fetchall()
    )
    assert then == [(250.0,)]


def test_a_new_version_computes_everyone_and_its_own_fhir_never_triggers_it(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    run_model(tmp_path / "store")
    bumped = dataclasses.replace(PCE, version="1.0.1")
    report = run_model(tmp_path / "store", bumped)
    assert (report.scope, report.counts["patients"]) == ("full", 4)
    assert run_model(tmp_path / "store", bumped).scope == "unchanged", "its RiskAssessments are not inputs"


def test_a_model_that_fails_for_one_patient_records_it_and_computes_the_others(tmp_path: Path) -> None:
    def fragile(rows: pl.DataFrame, params: dict[str, Any] | None) -> pl.DataFrame:
        if "p2" in rows["patient_id"].to_list():
            raise ZeroDivisionError("p2's data broke the model")
        ok = {"status": "ok", "value": 0.5, "outputs": orjson.dumps({"n": 1}).decode(), "reason": None}
        return output_frame(
            [ok | {"patient_id": p, "inputs": [f"patient/{p}"]} for p in rows["patient_id"].to_list()]
        )

    model = dataclasses.replace(
        PCE,
        name="fragile",
        query="SELECT id AS patient_id FROM patient WHERE id IN (FROM scope_patients)",
        compute=fragile,
    )
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    report = run_model(tmp_path / "store", model)
    assert (report.counts["ok"], report.counts["error"]) == (3, 1)
    rows = (
        connect(tmp_path / "store")
        .sql(
            "SELECT patient_id, status, reason FROM model_output WHERE model = 'fragile' AND status = 'error'"
        )
        .fetchall()
    )
    assert rows == [("p2", "error", "ZeroDivisionError: p2's data broke the model")]
    (run,) = (
        connect(tmp_path / "store")
        .sql("SELECT ok, errors, status FROM model_run WHERE model = 'fragile'")
        .fetchall()
    )
    assert run == (3, 1, "succeeded")


def test_the_summary_counts_each_patient_once_where_they_stand_now(tmp_path: Path) -> None:
    """A patient refused for a missing input, computed once it arrives, counts as computed only:
    computed + refused + errors is the number of patients."""
    from twin_store import queries

    without_hdl = [r for r in twins() if r["id"] != "p3-hdl"]
    write_ndjson(tmp_path / "ehr" / "data.ndjson", without_hdl)  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    assert run_model(tmp_path / "store").counts["refused"] == 2, "the kid, and p3 without HDL"
    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    assert run_model(tmp_path / "store").counts["ok"] == 1, "p3, now with HDL"
    summary = queries.model_summary(connect(tmp_path / "store"))
    rows = [dict(zip(summary.columns, row, strict=True)) for row in summary.fetchall()]
    assert [(r["model"], r["computed"], r["refused"], r["errors"]) for r in rows] == [("ascvd-pce", 3, 1, 0)]


def test_a_patient_the_store_does_not_know_is_refused_before_anything_is_computed(tmp_path: Path) -> None:
    from connectors.errors import TwinhubError
    from harmonize.models.resting_hr import MODEL as RESTING_HR

    write_ndjson(tmp_path / "ehr" / "data.ndjson", twins())  # type: ignore[arg-type]
    land(tmp_path / "store", tmp_path / "ehr")
    with TwinStore(tmp_path / "store") as store, pytest.raises(TwinhubError) as raised:
        refresh(store, RESTING_HR, trigger="cli", patients=["p1", "nobody", "p2"])
    assert str(raised.value) == (
        "model resting-hr-baseline: 1 of the 3 patients asked for (#2) is not in the store; "
        'list them with: twinhub sql "SELECT id FROM patient"'
    )
    assert "nobody" not in str(raised.value)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM model_output").fetchone() == (0,)
    assert con.sql("SELECT count(*) FROM model_run").fetchone() == (0,)
