"""The reference twin models refreshed in the real store: resting-hr-baseline on wearable samples
and on clinic heart rates, diabetes-risk trained, versioned and retrained; both on Synthea."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.riskassessment import RiskAssessment

from connectors.base import RECORD_SCHEMA, SAMPLE_SCHEMA, Batch
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from flows.sync import land_batches
from harmonize.models import diabetes_risk, resting_hr
from harmonize.models.twin_model import output_id
from harmonize.records import key_reference
from tests.support.data import write_ndjson
from tests.support.diabetes import Patient, population
from twin_store import TwinStore, connect
from twin_store.models import refresh

LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_ids = count()


def patient(pid: str, born: str = "1970-01-01", gender: str = "female") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": born}


def observation(pid: str, code: str, value: float, unit: str, day: date, category: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"{pid}-{code}-{day}-{next(_ids)}",
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": f"{day}T09:30:00+01:00",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def land_fhir(root: Path, folder: Path, resources: list[dict[str, Any]]) -> None:
    by_type: dict[str, list[dict[str, object] | str]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    for kind, items in by_type.items():
        write_ndjson(folder / f"{kind}.ndjson", items)
    source = FhirNdjsonSource(name="ehr", kind="fhir-ndjson", path=folder)
    with TwinStore(root) as store:
        run = store.begin_run("ehr", "sync")
        land_batches(store, run, FhirNdjsonConnector(source).pull(None))
        store.finish_run(run, "succeeded")


def land_samples(root: Path, rows: list[dict[str, object]]) -> None:
    batch = Batch(
        records=RECORD_SCHEMA.empty_table(), watermark={}, samples=pa.Table.from_pylist(rows, SAMPLE_SCHEMA)
    )
    with TwinStore(root) as store:
        run = store.begin_run("fit", "sync")
        land_batches(store, run, iter([batch]))
        store.finish_run(run, "succeeded")


def outputs(root: Path, model: str) -> dict[str, list[dict[str, Any]]]:
    con = connect(root)
    got: dict[str, list[dict[str, Any]]] = {}
    for row in (
        con.sql(f"FROM model_output WHERE model = '{model}' ORDER BY computed_at").pl().iter_rows(named=True)
    ):
        got.setdefault(row["patient_id"], []).append(row)
    return got


def model_resources(root: Path, model: str) -> dict[str, dict[str, Any]]:
    rows = (
        connect(root).sql(f"SELECT id, resource FROM fhir_resource WHERE source = 'model:{model}'").fetchall()
    )
    return {ident: orjson.loads(text) for ident, text in rows}


# -- resting heart rate ------------------------------------------------------------------------

NIGHT = datetime(2024, 3, 1, 23, 0, tzinfo=UTC)  # local midnight of 2 March at UTC+1


def night(day: int, bpm: float) -> list[dict[str, object]]:
    """Six hours of a night's heart rate, a sample every 6 minutes (5 per half-hour), around `bpm`."""
    start = NIGHT + timedelta(days=day)
    head = {
        "patient_id": "w1",
        "device": "Charge 6",
        "metric": "heart_rate",
        "end_time": None,
        "utc_offset_minutes": 60,
        "unit": "bpm",
        "origin": "test",
    }
    return [
        head | {"start_time": start + timedelta(minutes=m), "value": bpm + (m // 6) % 3 - 1}
        for m in range(0, 360, 6)
    ]


def resting(day: int, bpm: float) -> dict[str, object]:
    return {
        "patient_id": "w1",
        "device": "Charge 6",
        "metric": "resting_heart_rate",
        "start_time": NIGHT + timedelta(days=day, hours=8),
        "end_time": None,
        "utc_offset_minutes": 60,
        "value": bpm,
        "unit": "bpm",
        "origin": "test",
    }


@pytest.mark.slow
def test_resting_hr_refreshes_a_wearable_twin_and_a_clinic_one_and_then_only_what_changed(
    tmp_path: Path,
) -> None:
    root, model = tmp_path / "store", resting_hr.MODEL
    # w1: a wearable and no Patient resource; eight nights around 56, the vendor's 50 on the second
    # day, then a night around 71. c1: four clinic heart rates. c2: none.
    land_samples(root, [s for d in range(9) for s in night(d, 71 if d == 8 else 56)] + [resting(1, 50)])
    clinic = [(date(2019, 1, 1), 72), (date(2019, 7, 1), 74), (date(2020, 1, 1), 70), (date(2020, 6, 1), 73)]
    land_fhir(
        root,
        tmp_path / "ehr1",
        [patient("c1"), patient("c2")]
        + [observation("c1", "8867-4", v, "/min", d, "vital-signs") for d, v in clinic],
    )
    with TwinStore(root) as store:
        snapshot = store.snapshot_id()
        report = refresh(store, model, trigger="test")
    assert (report.scope, report.counts["ok"], report.counts["refused"]) == ("full", 2, 1)
    got = outputs(root, model.name)
    (w1,), (c1,), (c2,) = got["fit/w1"], got["ehr/c1"], got["ehr/c2"]
    assert {r["input_snapshot_id"] for r in (w1, c1, c2)} == {snapshot}
    assert (w1["status"], w1["version"]) == ("ok", "1.0.0")
    out = orjson.loads(w1["outputs"])
    # each estimated night: its lowest half-hour mean (55 + (0+1+2+0+1)/5 - 1 = 55.8, or 56.0)
    assert out["baseline_days_by_kind"] == {"vendor": 1, "estimate": 7}
    assert 55.5 < w1["value"] < 56.5 and out["as_of"] == "2024-03-10" and out["latest_kind"] == "estimate"
    assert (out["flagged"], out["flag"]) == (True, "above") and out["deviation_bpm"] > 14
    assert len(w1["inputs"]) == 9 and all(i.startswith("wearable_daily/") for i in w1["inputs"])
    assert (c1["status"], c1["value"]) == ("ok", 72.0)
    assert orjson.loads(c1["outputs"])["latest_bpm"] == 73.0 and len(c1["inputs"]) == 4
    assert (c2["status"], c2["reason"]) == (
        "refused",
        "no heart-rate readings (wearable, or clinic heart rates LOINC 8867-4)",
    )

    resources = model_resources(root, model.name)
    assert set(resources) == {output_id(model.name, "fit/w1"), output_id(model.name, "ehr/c1")}, (
        "a new refusal writes nothing"
    )
    for resource in resources.values():
        Observation.model_validate_json(orjson.dumps(resource))
        assert resource["code"]["coding"][0]["code"] == "40443-4"
        assert resource["valueQuantity"]["unit"] == "/min"
    wearable = resources[output_id(model.name, "fit/w1")]
    daily_ids = {i for (i,) in connect(root).sql("SELECT observation_id FROM wearable_daily").fetchall()}
    # The daily Observations are the wearable source's: the model's FHIR names them on its base.
    derived = {d["reference"] for d in wearable["derivedFrom"]}
    keys = {i.removeprefix("wearable_daily/") for i in w1["inputs"]}
    assert derived == {key_reference(k, "Observation") for k in keys}
    assert keys <= daily_ids
    assert wearable["valueQuantity"]["value"] == round(w1["value"], 2)

    land_samples(root, night(9, 57))  # a tenth night, back to normal
    with TwinStore(root) as store:
        again = refresh(store, model, trigger="test")
        unchanged = refresh(store, model, trigger="test")
    assert (again.scope, again.counts["patients"]) == ("changed", 1)
    assert unchanged.scope == "unchanged"
    got = outputs(root, model.name)
    assert (len(got["fit/w1"]), len(got["ehr/c1"]), len(got["ehr/c2"])) == (2, 1, 1)
    assert orjson.loads(got["fit/w1"][1]["outputs"])["flagged"] is False


# -- diabetes risk -----------------------------------------------------------------------------

CODES = {
    "bmi": ("39156-5", "kg/m2", "vital-signs"),
    "systolic_bp": ("8480-6", "mm[Hg]", "vital-signs"),
    "hdl": ("2085-9", "mg/dL", "laboratory"),
    "triglycerides": ("2571-8", "mg/dL", "laboratory"),
    "hba1c": ("4548-4", "%", "laboratory"),
}


def as_fhir(people: list[Patient]) -> list[dict[str, Any]]:
    resources = []
    for p in people:
        head = p.head
        resources.append(patient(head["patient_id"], head["birth_date"].isoformat(), head["gender"]))
        for row in p.rows:
            code, unit, category = CODES[row["kind"]]
            resources.append(
                observation(head["patient_id"], code, round(row["value"], 2), unit, row["day"], category)
            )
    return resources


def trainings(root: Path) -> list[tuple[Any, ...]]:
    return (
        connect(root)
        .sql("SELECT training, training_snapshot_id, patients, metrics FROM model_training ORDER BY training")
        .fetchall()
    )


@pytest.mark.slow
def test_diabetes_risk_trains_versions_its_outputs_and_retrains_only_after_enough_new_patients(
    tmp_path: Path,
) -> None:
    root, model = tmp_path / "store", diabetes_risk.MODEL
    people = population(140, seed=3)
    land_fhir(root, tmp_path / "ehr1", as_fhir(people[:100]))
    with TwinStore(root) as store:
        snapshot = store.snapshot_id()
        first = refresh(store, model, trigger="test", retrain_after=20)
    assert (first.version, first.trained, first.scope) == ("1.0.0+t1", True, "full")
    ((number, trained_at, patients, metrics),) = trainings(root)
    metrics = orjson.loads(metrics)
    assert (number, trained_at, patients) == (1, snapshot, 100)
    assert metrics["positives"] >= 10 and metrics["patients"] > 50 and 0.5 < metrics["cv_roc_auc"] <= 1
    got = outputs(root, model.name)
    assert len(got) == 100 and {r[0]["version"] for r in got.values()} == {"1.0.0+t1"}
    ok = [r[0] for r in got.values() if r[0]["status"] == "ok"]
    refused = [r[0] for r in got.values() if r[0]["status"] == "refused"]
    assert len(ok) > 50 and all(0 < r["value"] < 1 for r in ok)
    assert all(r["reason"].startswith("has the outcome already (an HbA1c") for r in refused)
    resources = model_resources(root, model.name)
    assert len(resources) == len(ok)
    sample = ok[0]
    resource = resources[output_id(model.name, sample["patient_id"])]
    RiskAssessment.model_validate_json(orjson.dumps(resource))
    assert resource["prediction"][0]["probabilityDecimal"] == round(sample["value"], 6)
    assert resource["method"]["coding"][0]["version"] == "1.0.0+t1"
    assert resource["prediction"][0]["outcome"]["text"].endswith("within 5 years")
    assert {b["reference"] for b in resource["basis"]} >= {key_reference(sample["patient_id"])}

    with TwinStore(root) as store:
        assert refresh(store, model, trigger="test", retrain_after=20).scope == "unchanged"
    # a changed lab of a known patient: everyone computed again, with the same training
    changed = Patient(people[0].head["patient_id"]).visit(date(2017, 6, 1), hdl=40)
    changed.head = people[0].head
    land_fhir(root, tmp_path / "ehr2", as_fhir([changed])[1:])
    with TwinStore(root) as store:
        second = refresh(store, model, trigger="test", retrain_after=20)
    assert (second.version, second.trained, second.counts["patients"]) == ("1.0.0+t1", False, 100)
    land_fhir(root, tmp_path / "ehr3", as_fhir(people[100:119]))  # 19 new: one short
    with TwinStore(root) as store:
        third = refresh(store, model, trigger="test", retrain_after=20)
    assert (third.version, third.trained, third.counts["patients"], len(trainings(root))) == (
        "1.0.0+t1",
        False,
        119,
        1,
    )
    land_fhir(root, tmp_path / "ehr4", as_fhir(people[119:]))
    with TwinStore(root) as store:
        latest = store.snapshot_id()
        fourth = refresh(store, model, trigger="test", retrain_after=20)
    assert (fourth.version, fourth.trained, fourth.counts["patients"]) == ("1.0.0+t2", True, 140)
    assert [(n, s, p) for n, s, p, _ in trainings(root)] == [(1, snapshot, 100), (2, latest, 140)]
    versions = (
        connect(root)
        .sql(
            f"SELECT version, count(*) FROM model_output WHERE model = '{model.name}' GROUP BY ALL ORDER BY 1"
        )
        .fetchall()
    )
    assert versions == [("1.0.0+t1", 100 + 100 + 119), ("1.0.0+t2", 140)]


# -- on Synthea --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthea_store(synthea: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("synthea") / "store"
    source = FhirNdjsonSource(name="synthea", kind="fhir-ndjson", path=synthea)
    with TwinStore(root) as store:
        run = store.begin_run("synthea", "sync")
        land_batches(store, run, FhirNdjsonConnector(source).pull(None))
        store.finish_run(run, "succeeded")
    yield root


@pytest.mark.slow
@pytest.mark.shared
def test_on_synthea_both_models_give_every_patient_an_output(synthea_store: Path) -> None:
    with TwinStore(synthea_store) as store:
        heart = refresh(store, resting_hr.MODEL, trigger="test")
        risk = refresh(store, diabetes_risk.MODEL, trigger="test")
    # The export has no heart rates (no 8867-4, no wearable data): every twin is refused, saying so.
    assert (heart.counts["patients"], heart.counts["refused"]) == (615, 615)
    reasons = (
        connect(synthea_store)
        .sql("SELECT DISTINCT reason FROM model_output WHERE model = 'resting-hr-baseline'")
        .fetchall()
    )
    assert reasons == [("no heart-rate readings (wearable, or clinic heart rates LOINC 8867-4)",)]
    assert risk.trained and risk.version == "1.0.0+t1"
    assert risk.counts["patients"] == 615 and risk.counts["ok"] > 150 and risk.counts["error"] == 0
    ((metrics,),) = connect(synthea_store).sql("SELECT metrics FROM model_training").fetchall()
    metrics = orjson.loads(metrics)
    assert metrics["patients"] > 150 and metrics["positives"] >= 10 and metrics["cv_roc_auc"] > 0.5
    assert len(model_resources(synthea_store, diabetes_risk.MODEL.name)) == risk.counts["ok"]
