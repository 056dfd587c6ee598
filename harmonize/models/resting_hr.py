"""Resting heart-rate baseline: each twin's usual resting heart rate, its latest one, and whether
the latest strays from the usual.

Readings, one per day. A patient with wearable heart-rate data is read from the wearables only:
the day's resting heart rate from the vendor (`resting_heart_rate`) where it sent one, else the
lowest mean of the day's clock half-hours of `heart_rate` samples (a half-hour needs 5 samples, a
day 8 such half-hours). The lowest sustained half-hour, not the day's lowest sample: one sample
is at the mercy of a motion artefact or a dropout, and a percentile of the day's samples moves
with how much of the day was worn and how active it was; the quietest half-hour is mostly asleep
or sitting still, which is what vendors' resting figures come from too (it runs a few beats under
an awake resting rate, the same way every day, so deviations stay comparable). A patient without
wearable heart rates is read from clinic heart rates (vital_sign, LOINC 8867-4), the day's lowest.

The baseline is the median of the readings before the latest (the latest does not vote on the
figure it is compared with): wearables, the days in the 28 before the latest, at least 7; clinic,
up to the 5 readings before the latest within 3 years, at least 3, adults only (a child's heart
rate falls with age over years). Too few readings: refused, saying how many there are and how
many it needs. The latest is flagged when it is further from the baseline than 2 robust SDs
(1.4826 x the median absolute deviation, an SD that one odd day does not inflate) and than a
floor (5 bpm for wearables, 10 bpm for clinic readings): with a steady baseline the SD is under a
beat, and a rise of a few beats is day-to-day noise, not news. Numbers in `resting_hr.toml`.

"Now" is the patient's latest reading: no clock, the same snapshot gives the same output.
"""

from __future__ import annotations

import statistics
import tomllib
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from harmonize.models.twin_model import FhirOutput, TwinModel, output_frame

SETTINGS = tomllib.loads(Path(__file__).with_name("resting_hr.toml").read_text())
WEAR, CLINIC, FLAG = SETTINGS["wearable"], SETTINGS["vital_sign"], SETTINGS["flag"]
LOW, HIGH = SETTINGS["plausible_bpm"]
MAD_TO_SD = 1.4826
"""The median absolute deviation of a normal distribution times this is its SD."""

QUERY = f"""
WITH people AS (
    SELECT s.patient_id, try_cast(p.birth_date AS DATE) AS birth_date
    FROM (SELECT DISTINCT patient_id FROM scope_patients) s LEFT JOIN patient p ON p.id = s.patient_id),
wearers AS (
    SELECT patient_id, max(day) AS latest FROM wearable_daily
    WHERE metric IN ('resting_heart_rate', 'heart_rate') AND patient_id IN (FROM scope_patients)
    GROUP BY ALL),
vendor AS (
    SELECT patient_id, day, median(value) AS value,
           list('wearable_daily/' || observation_id ORDER BY source) AS ids
    FROM wearable_daily
    WHERE metric = 'resting_heart_rate' AND value BETWEEN {LOW} AND {HIGH}
      AND patient_id IN (FROM scope_patients)
    GROUP BY ALL),
samples AS (
    SELECT s.patient_id, s.value,
           timezone('UTC', s.start_time) + to_minutes(coalesce(s.utc_offset_minutes, 0)) AS local_time
    FROM wearable_sample s JOIN wearers w USING (patient_id)
    WHERE s.metric = 'heart_rate' AND s.value BETWEEN {LOW} AND {HIGH}
      AND s.start_time >= w.latest - INTERVAL {int(WEAR["baseline_days"]) + 2} DAY),
half_hours AS (
    SELECT patient_id, time_bucket(INTERVAL 30 MINUTE, local_time) AS half_hour, avg(value) AS mean
    FROM samples GROUP BY ALL HAVING count(*) >= {int(WEAR["half_hour_min_samples"])}),
estimated AS (
    SELECT h.patient_id, CAST(h.half_hour AS DATE) AS day, min(h.mean) AS value
    FROM half_hours h ANTI JOIN vendor v ON v.patient_id = h.patient_id AND v.day = CAST(h.half_hour AS DATE)
    GROUP BY ALL HAVING count(*) >= {int(WEAR["day_min_half_hours"])}),
heart_days AS (
    SELECT patient_id, day, list('wearable_daily/' || observation_id ORDER BY source) AS ids
    FROM wearable_daily WHERE metric = 'heart_rate' AND patient_id IN (FROM scope_patients)
    GROUP BY ALL),
clinic AS (
    SELECT patient_id, try_cast(left(effective, 10) AS DATE) AS day, value_numeric AS value,
           'vital_sign/' || id AS row_id
    FROM vital_sign
    WHERE code = '{SETTINGS["heart_rate_code"]}' AND value_numeric BETWEEN {LOW} AND {HIGH}
      AND coalesce(value_ucum, '/min') = '/min'
      AND patient_id IN (FROM scope_patients) AND patient_id NOT IN (SELECT patient_id FROM wearers)),
readings AS (
    SELECT patient_id, 'wearable' AS origin, 'vendor' AS kind, day, value, ids FROM vendor
    UNION ALL
    SELECT e.patient_id, 'wearable', 'estimate', e.day, e.value, coalesce(d.ids, [])
    FROM estimated e LEFT JOIN heart_days d USING (patient_id, day)
    UNION ALL
    SELECT patient_id, 'vital_sign', 'clinic', day, min(value), [arg_min(row_id, (value, row_id))]
    FROM clinic WHERE day IS NOT NULL GROUP BY patient_id, day)
SELECT p.patient_id, p.birth_date, w.patient_id IS NOT NULL AS wearer, r.origin, r.kind, r.day, r.value,
       list_filter(coalesce(r.ids, []), x -> x IS NOT NULL) AS ids
FROM people p LEFT JOIN wearers w USING (patient_id) LEFT JOIN readings r USING (patient_id)
ORDER BY p.patient_id, r.day
"""


def compute(rows: pl.DataFrame, params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Each patient's baseline (the output's value, in /min), or the refusal."""
    out = []
    for patient in rows.partition_by("patient_id", maintain_order=True):
        first = patient.row(0, named=True)
        readings = patient.filter(pl.col("value").is_not_null()).sort("day")
        base = {"patient_id": first["patient_id"]}
        result = _baseline(readings, wearer=first["wearer"], born=first["birth_date"])
        if isinstance(result, str):
            inputs = readings["ids"].explode().drop_nulls().to_list()
            refused = {"status": "refused", "value": None, "outputs": None, "reason": result}
            out.append(base | refused | {"inputs": inputs})
            continue
        outputs, inputs = result
        value, text = outputs["baseline_bpm"], orjson.dumps(outputs).decode()
        out.append(base | {"status": "ok", "value": value, "reason": None, "outputs": text, "inputs": inputs})
    return output_frame(out)


def _baseline(
    readings: pl.DataFrame, *, wearer: bool, born: date | None
) -> tuple[dict[str, Any], list[str]] | str:
    """The outputs and the ids of the readings used, or why there are none."""
    if readings.is_empty():
        if wearer:
            return (
                "wearable heart rate, but no day with a resting value (a vendor resting heart rate, or "
                f"{WEAR['day_min_half_hours']} half-hours of {WEAR['half_hour_min_samples']} heart-rate "
                "samples each)"
            )
        return f"no heart-rate readings (wearable, or clinic heart rates LOINC {SETTINGS['heart_rate_code']})"
    latest = readings.row(-1, named=True)
    now: date = latest["day"]
    earlier = readings.head(len(readings) - 1)
    if latest["origin"] == "wearable":
        days = int(WEAR["baseline_days"])
        window = earlier.filter(pl.col("day") >= now - timedelta(days=days))
        if len(window) < WEAR["baseline_min_readings"]:
            return (
                f"resting heart rate on {len(window)} of the {days} days before {now} (wearable); "
                f"the baseline needs {WEAR['baseline_min_readings']}"
            )
        rules = WEAR
    else:
        if born is None:
            return "no birth date: the clinic heart-rate baseline is for adults only"
        age = now.year - born.year - ((now.month, now.day) < (born.month, born.day))
        if age < CLINIC["adult_age"]:
            return (
                f"aged {age} on {now}: a child's heart rate falls with age, so clinic readings over "
                f"years make no baseline (adults, {CLINIC['adult_age']} and over)"
            )
        years = int(CLINIC["baseline_years"])
        since = now - timedelta(days=round(365.25 * years))
        window = earlier.filter(pl.col("day") >= since).tail(int(CLINIC["baseline_readings"]))
        if len(window) < CLINIC["baseline_min_readings"]:
            return (
                f"{len(window)} clinic heart rates in the {years} years before {now}; the baseline needs "
                f"{CLINIC['baseline_min_readings']}"
            )
        rules = CLINIC
    values = window["value"].to_list()
    baseline = statistics.median(values)
    robust_sd = MAD_TO_SD * statistics.median(abs(v - baseline) for v in values)
    deviation = latest["value"] - baseline
    threshold = max(FLAG["robust_sds"] * robust_sd, rules["flag_floor_bpm"])
    flagged = abs(deviation) > threshold
    outputs: dict[str, Any] = {
        "source": latest["origin"],
        "as_of": now.isoformat(),
        "latest_bpm": round(latest["value"], 2),
        "latest_kind": latest["kind"],
        "baseline_bpm": round(baseline, 2),
        "baseline_readings": len(values),
        "baseline_from": window["day"].min().isoformat(),  # type: ignore[union-attr]
        "baseline_to": window["day"].max().isoformat(),  # type: ignore[union-attr]
        "robust_sd_bpm": round(robust_sd, 2),
        "deviation_bpm": round(deviation, 2),
        "threshold_bpm": round(threshold, 2),
        "flagged": flagged,
        "flag": ("above" if deviation > 0 else "below") if flagged else None,
    }
    if latest["origin"] == "wearable":
        kinds = window["kind"].value_counts()
        outputs["baseline_days_by_kind"] = dict(zip(kinds["kind"], kinds["count"], strict=True))
    inputs = pl.concat([window, readings.tail(1)])["ids"].explode().drop_nulls().to_list()
    return outputs, inputs


MODEL = TwinModel(
    name="resting-hr-baseline",
    version="1.0.0",
    description="Resting heart-rate baseline (median of recent daily resting rates) and the latest deviation",
    reads=("patient", "wearable_daily", "wearable_sample", "vital_sign"),
    scope="patient",
    query=QUERY,
    compute=compute,
    fhir=FhirOutput(resource="Observation", code="40443-4", display="Heart rate --resting", unit="/min"),
)
