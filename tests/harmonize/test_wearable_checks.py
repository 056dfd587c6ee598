"""The checks every wearable sample and daily rollup passes in harmonize, whatever its kind:
plausible values (ranges as data), patient ids that FHIR can hold, and daily FHIR that fails
for one patient without stopping the others."""

from __future__ import annotations

from datetime import UTC, date, datetime

import orjson
import pyarrow as pa
import pytest

from connectors.base import SAMPLE_SCHEMA
from harmonize.wearables.daily_fhir import daily_fhir
from harmonize.wearables.metrics import DAILY_SCHEMA, normalize_samples

AT = datetime(2024, 5, 1, 8, tzinfo=UTC)
WHERE = "(harmonize/wearables/wearable_ranges.toml)"


def samples(rows: list[tuple[str, str, float, str]]) -> pa.Table:
    """(patient, metric, value, unit) rows, a minute apart."""
    return pa.Table.from_pylist(
        [
            {
                "patient_id": patient,
                "metric": metric,
                "start_time": AT.replace(minute=n),
                "value": value,
                "unit": unit,
                "origin": "f.csv",
            }
            for n, (patient, metric, value, unit) in enumerate(rows)
        ],
        SAMPLE_SCHEMA,
    )


def test_implausible_values_are_quarantined_naming_the_metric_the_value_and_the_range() -> None:
    normalized, problems = normalize_samples(
        samples(
            [
                ("p1", "steps", 120, "steps"),
                ("p1", "steps", -5, "steps"),
                ("p1", "heart_rate", 1e308, "bpm"),
                ("p1", "heart_rate", 61, "bpm"),
                ("p1", "body_weight", 2000, "lb"),  # 907 kg: judged in the metric's unit
                ("p1", "body_temperature", 98.6, "[degF]"),
            ]
        )
    )
    assert [(r["metric"], round(r["value"], 1)) for r in normalized.to_pylist()] == [
        ("steps", 120.0),
        ("heart_rate", 61.0),
        ("body_temperature", 37.0),
    ]
    assert [(p["file"], p["reason"]) for p in problems.to_pylist()] == [
        ("f.csv", f"steps sample of p1: steps -5 is outside the plausible range 0..100,000 {WHERE}"),
        (
            "f.csv",
            "heart_rate sample of p1: heart_rate 1e+308 /min is outside the plausible range 20..300 /min "
            + WHERE,
        ),
        (
            "f.csv",
            "body_weight sample of p1: body_weight 907.18474 kg is outside the plausible range 0.2..700 kg "
            + WHERE,
        ),
    ]
    assert orjson.loads(problems["raw"][0].as_py())["value"] == -5


@pytest.mark.parametrize("bad", [-5.0, 100_001.0, 1e308])
def test_one_series_with_one_implausible_value_is_judged_like_any(bad: float) -> None:
    """The usual batch (one metric, one unit) takes a fast path that must not skip the ranges."""
    normalized, problems = normalize_samples(samples([("p1", "steps", v, "steps") for v in (10, bad, 20)]))
    assert normalized["value"].to_pylist() == [10.0, 20.0]
    [reason] = problems["reason"].to_pylist()
    assert f"is outside the plausible range 0..100,000 {WHERE}" in reason


def test_every_metric_has_a_plausible_range() -> None:
    from harmonize.wearables.metrics import metrics, ranges

    assert set(ranges()) == set(metrics())
    assert all(low < high for low, high in ranges().values())


@pytest.mark.parametrize("patient", ["fitabase-../x", "a b", "x" * 65, "p1/../p2", "ehr/a b"])
def test_a_patient_id_that_is_no_fhir_id_is_quarantined_whatever_the_kind(patient: str) -> None:
    normalized, problems = normalize_samples(
        samples([(patient, "steps", 10, "steps"), ("p1", "steps", 10, "steps")])
    )
    assert normalized["patient_id"].to_pylist() == ["p1"]
    [reason] = problems["reason"].to_pylist()
    assert reason.endswith(
        "the patient id is neither a FHIR id (1-64 of A-Z a-z 0-9 - .) nor a key <source>/<id>; map the "
        "account to a Patient in the source's config"
    )


def day(patient: str, metric: str = "heart_rate") -> dict[str, object]:
    return {
        "source": "fa",
        "patient_id": patient,
        "metric": metric,
        "day": date(2016, 4, 12),
        "utc_offset_minutes": 0,
        "value": 70.0,
        "samples": 10,
        "min": 60.0,
        "max": 80.0,
        "device": "Fitbit",
        "parts": None,
    }


def test_a_patient_whose_daily_fhir_fails_the_checks_is_a_problem_and_the_others_fhir_is_made() -> None:
    days = pa.Table.from_pylist(
        [day("p1"), day("fitabase-a b"), day("fitabase-a b", "body_weight"), day("p2")], DAILY_SCHEMA
    )
    made = daily_fhir(days, AT, "run r1")
    subjects = {orjson.loads(r).get("subject", {}).get("reference") for r in made.resources}
    assert subjects == {"Patient/p1", "Patient/p2", None}  # None: the Devices and Provenances
    assert sorted(orjson.loads(r)["resourceType"] for r in made.resources) == [
        "Device",
        "Device",
        "Observation",
        "Observation",
        "Provenance",
        "Provenance",
    ]
    assert made.failed["patient_id"].to_pylist() == ["fitabase-a b"] * 2
    reasons = made.problems["reason"].to_pylist()
    assert reasons[0].startswith(
        "the daily FHIR of heart_rate on 2016-04-12 for patient 'fitabase-a b' of source fa fails the "
        'checks (malformed reference "Patient/fitabase-a b"'
    )
    assert reasons[1].startswith("the daily FHIR of body_weight on 2016-04-12")
    assert set(made.problems["file"].to_pylist()) == {"wearable_daily"}
