"""The resting heart-rate baseline's logic, on rows shaped like its query's."""

from __future__ import annotations

import statistics
from datetime import date, timedelta
from typing import Any

import orjson
import polars as pl
import pytest

from harmonize.models.resting_hr import compute

LATEST = date(2024, 3, 29)
SCHEMA = {
    "patient_id": pl.String,
    "birth_date": pl.Date,
    "wearer": pl.Boolean,
    "origin": pl.String,
    "kind": pl.String,
    "day": pl.Date,
    "value": pl.Float64,
    "ids": pl.List(pl.String),
}


def wearable(
    values: list[float], *, patient: str = "w", kind: str = "vendor", gap: int = 1
) -> list[dict[str, Any]]:
    """One reading a day (every `gap` days), the last on LATEST."""
    days = [LATEST - timedelta(days=gap * i) for i in reversed(range(len(values)))]
    head = {"patient_id": patient, "birth_date": None, "wearer": True, "origin": "wearable", "kind": kind}
    return [
        head | {"day": d, "value": v, "ids": [f"wearable_daily/{patient}-{d}"]}
        for d, v in zip(days, values, strict=True)
    ]


def clinic(
    days_values: list[tuple[date, float]], *, born: date | None = date(1970, 1, 1)
) -> list[dict[str, Any]]:
    return [
        {
            "patient_id": "c",
            "birth_date": born,
            "wearer": False,
            "origin": "vital_sign",
            "kind": "clinic",
            "day": d,
            "value": v,
            "ids": [f"vital_sign/c-{d}"],
        }
        for d, v in days_values
    ]


def run(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = compute(pl.DataFrame(rows, schema=SCHEMA), None)
    return {
        r["patient_id"]: r | {"outputs": orjson.loads(r["outputs"]) if r["outputs"] else None}
        for r in out.iter_rows(named=True)
    }


def test_the_baseline_is_the_median_of_the_28_days_before_the_latest_which_does_not_vote() -> None:
    before = [60.0 + (i % 5) for i in range(40)]  # 60..64; only the last 28 count
    got = run(wearable([*before, 90.0]))["w"]
    window = before[-28:]
    assert got["status"] == "ok"
    assert got["value"] == statistics.median(window) == 62.0
    out = got["outputs"]
    assert (out["baseline_readings"], out["latest_bpm"], out["as_of"]) == (28, 90.0, LATEST.isoformat())
    assert out["baseline_from"] == (LATEST - timedelta(days=28)).isoformat()
    assert out["deviation_bpm"] == pytest.approx(90.0 - got["value"])
    assert (out["flagged"], out["flag"]) == (True, "above")
    assert len(got["inputs"]) == 29 and got["inputs"][-1] == f"wearable_daily/w-{LATEST}"


@pytest.mark.parametrize(
    ("latest", "flagged"),
    [(65.0, False), (65.5, True), (54.5, True), (55.0, False)],
)
def test_a_steady_baseline_flags_only_beyond_the_5_bpm_floor(latest: float, flagged: bool) -> None:
    out = run(wearable([60.0] * 10 + [latest]))["w"]["outputs"]
    assert (out["robust_sd_bpm"], out["threshold_bpm"]) == (0.0, 5.0)
    assert out["flagged"] is flagged
    assert out["flag"] == (("above" if latest > 60 else "below") if flagged else None)


def test_a_noisy_baseline_flags_beyond_2_robust_sds() -> None:
    noisy = [57.0, 63.0] * 5 + [60.0]  # median 60, MAD 3: robust SD 4.45, threshold 8.9
    assert run(wearable([*noisy, 68.5]))["w"]["outputs"]["flagged"] is False
    out = run(wearable([*noisy, 69.0]))["w"]["outputs"]
    assert out["robust_sd_bpm"] == pytest.approx(4.45, abs=0.01)
    assert (out["threshold_bpm"], out["flagged"]) == (pytest.approx(8.9, abs=0.01), True)


def test_one_wild_day_in_the_baseline_neither_moves_it_nor_widens_the_threshold() -> None:
    days = [60.0] * 9 + [120.0] + [60.0] * 5
    out = run(wearable([*days, 67.0]))["w"]["outputs"]
    assert (out["baseline_bpm"], out["robust_sd_bpm"], out["flagged"]) == (60.0, 0.0, True)


def test_vendor_and_estimated_days_are_counted_apart() -> None:
    rows = wearable([60.0] * 10) + wearable([58.0] * 5, kind="estimate", gap=1)
    # the estimates fall on the last 5 days: drop the vendor days on those days (the query does)
    rows = [r for r in rows if not (r["kind"] == "vendor" and r["day"] > LATEST - timedelta(days=5))]
    out = run(rows)["w"]["outputs"]
    assert out["baseline_days_by_kind"] == {"vendor": 5, "estimate": 4}
    assert out["latest_kind"] == "estimate"


def test_too_few_wearable_days_is_refused_saying_how_many_it_needs() -> None:
    got = run(wearable([60.0] * 7))["w"]
    assert (got["status"], got["value"], got["outputs"]) == ("refused", None, None)
    assert (
        got["reason"]
        == f"resting heart rate on 6 of the 28 days before {LATEST} (wearable); the baseline needs 7"
    )
    assert len(got["inputs"]) == 7, "a refusal still names the rows it saw"
    # 7 days, but spread over 70: only 2 fall in the window
    assert "on 2 of the 28 days" in run(wearable([60.0] * 8, gap=10))["w"]["reason"]
    assert run(wearable([60.0] * 8))["w"]["status"] == "ok"


def test_no_readings_is_refused_and_a_wearer_is_told_what_a_day_needs() -> None:
    nothing = {"wearer": False, "origin": None, "kind": None, "day": None, "value": None, "ids": []}
    got = run(
        [
            {"patient_id": "n", "birth_date": None} | nothing,
            {"patient_id": "m", "birth_date": None} | nothing | {"wearer": True},
        ]
    )
    assert got["n"]["reason"] == "no heart-rate readings (wearable, or clinic heart rates LOINC 8867-4)"
    assert got["m"]["reason"].startswith("wearable heart rate, but no day with a resting value")
    assert "8 half-hours of 5 heart-rate samples" in got["m"]["reason"]


def test_clinic_readings_use_up_to_5_before_the_latest_within_3_years() -> None:
    readings = [(date(2014, 1, 1), 100.0)] + [
        (date(2018 + i // 2, 1 + 6 * (i % 2), 1), 70.0 + i) for i in range(7)
    ]
    got = run(clinic(readings))["c"]
    out = got["outputs"]
    # the latest is 76 (2021-01-01); the 5 before it within 3 years: 71..75; 2014 is too old
    assert (out["source"], out["latest_bpm"], out["baseline_readings"], out["baseline_bpm"]) == (
        "vital_sign",
        76.0,
        5,
        73.0,
    )
    assert (out["threshold_bpm"], out["flagged"]) == (10.0, False), "the clinic floor is 10 bpm"
    assert got["inputs"] == [f"vital_sign/c-{d}" for d, _ in readings[-6:]]


def test_clinic_readings_refused_for_children_too_few_or_no_birth_date() -> None:
    readings = [
        (date(2019, 1, 1), 80.0),
        (date(2020, 1, 1), 82.0),
        (date(2021, 1, 1), 81.0),
        (date(2021, 6, 1), 80.0),
    ]
    assert run(clinic(readings))["c"]["status"] == "ok"
    child = run(clinic(readings, born=date(2005, 1, 1)))["c"]["reason"]
    assert child.startswith("aged 16 on 2021-06-01: a child's heart rate falls with age")
    assert run(clinic(readings, born=None))["c"]["reason"].startswith("no birth date")
    few = run(clinic(readings[1:]))["c"]["reason"]
    assert few == "2 clinic heart rates in the 3 years before 2021-06-01; the baseline needs 3"
