"""Wearable samples to standard codes and units, columnar: millions of samples a pull, so no
Python per sample.

`wearable_metrics.toml` names each metric's LOINC code, the UCUM unit it is kept in and the unit
spellings vendors send with their conversion; `wearable_ranges.toml` the values a sample can
plausibly take. `normalize_samples` converts a connector's samples to that unit and codes them; a
sample whose metric or unit the file does not know, whose value is not a number or out of its
range, whose times make no sense or whose patient id is not a FHIR id is a problem with the
reason (quarantined, never dropped). Every wearable kind passes here, so the checks live in one
place.

Pure: the data file is read once per process.
"""

from __future__ import annotations

import functools
import tomllib
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import PROBLEM_SCHEMA, SAMPLE_SCHEMA
from connectors.kinds import PATIENT_ID
from harmonize.records import key_reference

METRICS_FILE = Path(__file__).with_name("wearable_metrics.toml")
WHERE = "harmonize/wearables/wearable_metrics.toml"
"""Where a user finds the metrics and unit spellings, for the reasons of samples refused."""
RANGES_FILE = Path(__file__).with_name("wearable_ranges.toml")
RANGES_WHERE = "harmonize/wearables/wearable_ranges.toml"
FHIR_ID = f"^{PATIENT_ID.pattern}$"
Rollup = Literal["sum", "mean", "last", "min", "max"]

NORMALIZED_SCHEMA = pa.schema(
    [
        *(f for f in SAMPLE_SCHEMA if f.name not in ("unit", "origin")),
        pa.field("loinc_code", pa.string()),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("origin", pa.string()),
    ]
)
"""Samples as they land in `wearable_sample`: the metric's LOINC code, the value in its unit."""


@dataclass(frozen=True, kw_only=True)
class Metric:
    name: str
    display: str
    loinc: str | None
    unit: str
    units: dict[str, tuple[float, float]]
    """Spelling -> (factor, offset) to `unit`."""
    daily: Rollup
    daily_loinc: str | None
    daily_display: str | None
    daily_unit: str | None
    day_of: Literal["start", "night"]
    category: Literal["vital-signs", "activity"]
    also: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Total:
    """A daily value summed from other metrics' daily sums (a night's sleep, whatever the stages)."""

    name: str
    display: str
    loinc: str
    unit: str
    sum_of: tuple[str, ...]
    category: Literal["vital-signs", "activity"]


@functools.cache
def metrics() -> dict[str, Metric]:
    return _catalogue()[0]


@functools.cache
def totals() -> dict[str, Total]:
    return _catalogue()[1]


@functools.cache
def _catalogue() -> tuple[dict[str, Metric], dict[str, Total]]:
    data = tomllib.loads(METRICS_FILE.read_text())
    found = {}
    for name, m in data["metrics"].items():
        units = {
            spelling: (float(c[0]), float(c[1])) if isinstance(c, list) else (float(c), 0.0)
            for spelling, c in m["units"].items()
        }
        found[name] = Metric(
            name=name,
            display=m["display"],
            loinc=m.get("loinc"),
            unit=m["unit"],
            units=units,
            daily=m["daily"],
            daily_loinc=m.get("daily_loinc"),
            daily_display=m.get("daily_display"),
            daily_unit=m.get("daily_unit"),
            day_of=m.get("day_of", "start"),
            category=m["category"],
            also=tuple(tuple(a) for a in m.get("also", [])),
        )
    summed = {
        name: Total(
            name=name,
            display=t["display"],
            loinc=t["loinc"],
            unit=t["unit"],
            sum_of=tuple(t["sum_of"]),
            category=t["category"],
        )
        for name, t in data.get("totals", {}).items()
    }
    return found, summed


@functools.cache
def ranges() -> dict[str, tuple[float, float]]:
    """Metric -> the lowest and highest plausible value of one sample, in the metric's unit."""
    data = tomllib.loads(RANGES_FILE.read_text())["ranges"]
    return {name: (float(low), float(high)) for name, (low, high) in data.items()}


def _range(metric: str) -> tuple[float, float]:
    return ranges().get(metric, (-float("inf"), float("inf")))


@functools.cache
def _conversions() -> pl.DataFrame:
    """(metric, sent unit) -> factor, offset, the metric's unit, LOINC code and plausible range."""
    rows = [
        (m.name, spelling, factor, offset, m.unit, m.loinc, *_range(m.name))
        for m in metrics().values()
        for spelling, (factor, offset) in m.units.items()
    ]
    return pl.DataFrame(
        rows,
        schema={
            "metric": pl.String,
            "unit": pl.String,
            "factor": pl.Float64,
            "offset": pl.Float64,
            "to_unit": pl.String,
            "loinc_code": pl.String,
            "low": pl.Float64,
            "high": pl.Float64,
        },
        orient="row",
    )


def normalize_samples(samples: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The samples in their metric's unit with its LOINC code (NORMALIZED_SCHEMA), and the
    samples that cannot land as problems (PROBLEM_SCHEMA) with the reason."""
    samples = samples.cast(SAMPLE_SCHEMA)
    if (fast := _one_clean_series(samples)) is not None:
        return fast, PROBLEM_SCHEMA.empty_table()
    frame = pl.from_arrow(samples)
    assert isinstance(frame, pl.DataFrame)
    known = frame.join(_conversions(), on=["metric", "unit"], how="left", maintain_order="left")
    converted = pl.col("value") * pl.col("factor") + pl.col("offset")
    reason = (
        pl.when(~pl.col("metric").is_in(list(metrics())))
        .then(pl.format(f"unknown metric {{}} (not in {WHERE})", pl.col("metric")))
        .when(pl.col("factor").is_null())
        .then(
            pl.format(
                f"metric {{}} does not take unit {{}} (its spellings are in {WHERE})",
                pl.col("metric"),
                pl.col("unit").fill_null("(none)"),
            )
        )
        .when(~pl.col("value").is_finite())
        .then(pl.format("value {} is not a number", pl.col("value")))
        .when((converted < pl.col("low")) | (converted > pl.col("high")) | ~converted.is_finite())
        .then(pl.lit(OUT_OF_RANGE))
        .when(pl.col("end_time") < pl.col("start_time"))
        .then(pl.lit("the sample ends before it starts"))
        .when(pl.col("patient_id") == "")
        .then(pl.lit("no patient"))
        .when(~pl.col("patient_id").str.contains(FHIR_ID))
        .then(pl.lit(NOT_AN_ID))
    )
    judged = known.with_columns(reason.alias("reason"), converted.alias("converted"))
    bad = _out_of_range_reasons(judged.filter(pl.col("reason").is_not_null()))
    good = judged.filter(pl.col("reason").is_null()).select(
        *(name for name in NORMALIZED_SCHEMA.names if name not in ("value", "unit", "loinc_code")),
        pl.col("converted").alias("value"),
        pl.col("loinc_code"),
        pl.col("to_unit").alias("unit"),
    )
    problems = bad.select(
        pl.col("origin").str.replace(ORIGIN_AT, "${1}").alias("file"),
        pl.col("origin").str.extract(ORIGIN_AT, 2).cast(pl.Int64).fill_null(0).alias("line_no"),
        pl.format("{} sample of {}: {}", pl.col("metric"), pl.col("patient_id"), pl.col("reason")).alias(
            "reason"
        ),
        pl.struct(*SAMPLE_SCHEMA.names).struct.json_encode().alias("raw"),
    )
    return good.select(NORMALIZED_SCHEMA.names).to_arrow().cast(NORMALIZED_SCHEMA), problems.to_arrow().cast(
        PROBLEM_SCHEMA
    )


ORIGIN_AT = r"^(.*):(?:line|item) ([0-9]+)$"
"""An origin that names the line (or JSON array item) of its file, "<path>:line 5": a problem
names the file and the line apart."""
OUT_OF_RANGE = "out of range"
"""Stands for the reason until it is written (with the value, in Python: such rows are few)."""
NOT_AN_ID = (
    "the patient id is neither a FHIR id (1-64 of A-Z a-z 0-9 - .) nor a key <source>/<id>; map the "
    "account to a Patient in the source's config"
)


def _out_of_range_reasons(bad: pl.DataFrame) -> pl.DataFrame:
    """The bad samples, those out of range with the metric, the value and the range in words:
    "steps -5 is outside the plausible range 0..100,000 (harmonize/...)"."""
    out = bad["reason"] == OUT_OF_RANGE
    if not out.any():
        return bad
    words = [
        out_of_range(metric, value, unit) if reason == OUT_OF_RANGE else reason
        for metric, value, unit, reason in bad.select("metric", "converted", "to_unit", "reason").iter_rows()
    ]
    return bad.with_columns(pl.Series("reason", words, pl.String))


def out_of_range(metric: str, value: float, unit: str) -> str:
    """Why a sample of `metric` with `value` (in `unit`, the metric's) is refused."""
    low, high = _range(metric)
    shown = "" if unit == "1" or unit.startswith("{") else f" {unit}"
    return (
        f"{metric} {value:,.10g}{shown} is outside the plausible range {low:,.10g}..{high:,.10g}{shown} "
        f"({RANGES_WHERE})"
    )


def _one_clean_series(samples: pa.Table) -> pa.Table | None:
    """The usual batch (one metric in one unit, every value a number in range, every time in
    order, one valid patient id) normalized without a join or a copy of its columns; None when
    it is not that batch."""
    if not len(samples) or any(pc.count_distinct(samples[c]).as_py() != 1 for c in ("metric", "unit")):
        return None
    metric = metrics().get(samples["metric"][0].as_py())
    if metric is None or (conversion := metric.units.get(samples["unit"][0].as_py())) is None:
        return None
    ends, starts = samples["end_time"], samples["start_time"]
    backwards = pc.any(pc.less(ends, starts)).as_py() if ends.null_count < len(ends) else False
    patients = pc.unique(samples["patient_id"])
    if (
        not pc.all(pc.is_finite(samples["value"])).as_py()
        or backwards
        or not pc.all(pc.match_substring_regex(patients, FHIR_ID)).as_py()
    ):
        return None
    factor, offset = conversion
    value = samples["value"]
    if (factor, offset) != (1.0, 0.0):
        value = pc.add(pc.multiply(value, factor), offset)
    low, high = _range(metric.name)
    bounds = pc.min_max(value).as_py()
    if bounds["min"] < low or bounds["max"] > high or not pc.all(pc.is_finite(value)).as_py():
        return None
    n = len(samples)
    columns = {name: samples[name] for name in NORMALIZED_SCHEMA.names if name in samples.column_names}
    columns |= {
        "value": value,
        "loinc_code": pa.repeat(pa.scalar(metric.loinc, pa.string()), n),
        "unit": pa.repeat(pa.scalar(metric.unit, pa.string()), n),
    }
    return pa.table([columns[name] for name in NORMALIZED_SCHEMA.names], schema=NORMALIZED_SCHEMA)


# -- daily rollups as FHIR --------------------------------------------------------------------

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
STATISTIC = "urn:twinhub:statistic"
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DAILY_TAG = {
    "system": "urn:twinhub:tag",
    "code": "wearable-daily",
    "display": "Daily rollup of wearable samples",
}
TWINHUB_IDS = uuid.UUID("1d6f3c0e-8b8e-4c55-9a6f-3f2b7c9d0e21")
DAILY_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("patient_id", pa.string()),
        ("metric", pa.string()),
        ("day", pa.date32()),
        ("utc_offset_minutes", pa.int32()),
        ("value", pa.float64()),
        ("samples", pa.int64()),
        ("min", pa.float64()),
        ("max", pa.float64()),
        ("device", pa.string()),
        ("parts", pa.list_(pa.struct([("metric", pa.string()), ("value", pa.float64())]))),
    ]
)
"""What the daily FHIR resources are made from: one `wearable_daily` row (a metric or a total
of one source, patient and local day), its main device, and for totals the parts summed."""


def daily_id(source: str, patient_id: str, metric: str, day: date) -> str:
    """The id of a day's Observation: stable, so a recomputed day updates the same resource."""
    return str(uuid.uuid5(TWINHUB_IDS, f"{source}|{patient_id}|{metric}|{day.isoformat()}"))


def device_id(source: str, patient_id: str, device: str) -> str:
    return str(uuid.uuid5(TWINHUB_IDS, f"device|{source}|{patient_id}|{device}"))


def daily_resources(days: pa.Table, recorded: datetime, activity: str) -> list[bytes]:
    """For each day of a metric with a LOINC code, a vital-signs or activity Observation (LOINC,
    UCUM, the local day as its period, the device); a Device for each device named; and per
    patient one Provenance naming the Observations this `activity` (a run's batch) computed, the
    devices that measured and the source, `recorded` then. Each is validated with the
    fhir.resources R4B models; raises ValueError for one that does not validate."""
    from fhir.resources.R4B.device import Device
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.provenance import Provenance

    made: list[bytes] = []
    devices: dict[str, bytes] = {}
    targets: dict[tuple[str, str], list[str]] = {}
    agents: dict[tuple[str, str], set[str]] = {}
    for row in days.cast(DAILY_SCHEMA).to_pylist():
        coded = _daily_code(row["metric"])
        if coded is None:
            continue
        source, patient = row["source"], row["patient_id"]
        device = None
        if row["device"]:
            device = f"Device/{device_id(source, patient, row['device'])}"
            devices.setdefault(device, _device(row, device))
            agents.setdefault((source, patient), set()).add(device)
        obs_id = daily_id(source, patient, row["metric"], row["day"])
        observation = _observation(row, obs_id, coded, device)
        Observation.model_validate_json(observation)
        made.append(observation)
        targets.setdefault((source, patient), []).append(f"Observation/{obs_id}")
    for device_json in devices.values():
        Device.model_validate_json(device_json)
    for (source, patient), observations in targets.items():
        who = sorted(agents.get((source, patient), ()))
        provenance = _provenance(source, patient, observations, who, recorded, activity)
        Provenance.model_validate_json(provenance)
        made.append(provenance)
    return made + list(devices.values())


@dataclass(frozen=True, kw_only=True)
class _Coded:
    codings: list[dict[str, str]]
    display: str
    unit: str
    category: str
    rollup: Rollup


def _daily_code(name: str) -> _Coded | None:
    """How a metric's (or total's) day is coded in FHIR; None when it has no LOINC code."""
    if (total := totals().get(name)) is not None:
        codings = [{"system": LOINC, "code": total.loinc, "display": total.display}]
        return _Coded(
            codings=codings, display=total.display, unit=total.unit, category=total.category, rollup="sum"
        )
    metric = metrics().get(name)
    if metric is None or metric.loinc is None:
        return None
    code, display = metric.daily_loinc or metric.loinc, metric.daily_display or metric.display
    codings = [{"system": LOINC, "code": code, "display": display}]
    codings += [{"system": LOINC, "code": c, "display": d} for c, d in metric.also]
    return _Coded(
        codings=codings,
        display=display,
        unit=metric.daily_unit or metric.unit,
        category=metric.category,
        rollup=metric.daily,
    )


def _local_day(row: dict[str, Any]) -> dict[str, str]:
    offset = timedelta(minutes=row["utc_offset_minutes"] or 0)
    zone = timezone(offset)
    start = datetime.combine(row["day"], time(), zone)
    return {"start": start.isoformat(), "end": (start + timedelta(days=1)).isoformat()}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(value, 2), "unit": unit, "system": UCUM, "code": unit}


def _observation(row: dict[str, Any], obs_id: str, coded: _Coded, device: str | None) -> bytes:
    source = row["source"]
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": obs_id,
        "meta": {"source": f"urn:twinhub:source:{source}", "tag": [DAILY_TAG]},
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": coded.category}]}],
        "code": {"coding": coded.codings, "text": coded.display},
        "subject": {"reference": key_reference(row["patient_id"])},
        "effectivePeriod": _local_day(row),
        "valueQuantity": _quantity(row["value"], coded.unit),
    }
    if device:
        resource["device"] = {"reference": device}
    components = [_statistic("count", "samples", {"valueInteger": row["samples"]})]
    if coded.rollup in ("mean", "last"):
        components += [
            _statistic(name, name, {"valueQuantity": _quantity(row[key], coded.unit)})
            for name, key in (("minimum", "min"), ("maximum", "max"))
        ]
    for part in row["parts"] or []:
        metric = metrics()[part["metric"]]
        code = (
            {"coding": [{"system": LOINC, "code": metric.loinc, "display": metric.display}]}
            if metric.loinc
            else {"coding": [{"system": "urn:twinhub:metric", "code": metric.name}], "text": metric.display}
        )
        components.append({"code": code, "valueQuantity": _quantity(part["value"], metric.unit)})
    resource["component"] = components
    return orjson.dumps(resource)


def _statistic(code: str, text: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"code": {"coding": [{"system": STATISTIC, "code": code}], "text": text}, **value}


def _provenance(
    source: str, patient: str, observations: list[str], devices: list[str], recorded: datetime, activity: str
) -> bytes:
    performers: list[dict[str, Any]] = [{"reference": d} for d in devices] or [
        {"identifier": {"system": "urn:twinhub:source", "value": source}}
    ]
    return orjson.dumps(
        {
            "resourceType": "Provenance",
            "id": str(uuid.uuid5(TWINHUB_IDS, f"provenance|{activity}|{source}|{patient}")),
            "meta": {"source": f"urn:twinhub:source:{source}"},
            "target": [{"reference": o} for o in observations],
            "recorded": recorded.astimezone(UTC).isoformat(timespec="seconds"),
            "activity": {"text": f"daily rollup of wearable samples ({activity})"},
            "agent": [
                {"type": {"coding": [{"system": PARTICIPANT, "code": "performer"}]}, "who": who}
                for who in performers
            ],
            "entity": [
                {
                    "role": "source",
                    "what": {
                        "identifier": {"system": "urn:twinhub:source", "value": source},
                        "display": f"wearable samples of source {source} (table wearable_sample)",
                    },
                }
            ],
        }
    )


def _device(row: dict[str, Any], reference: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Device",
            "id": reference.removeprefix("Device/"),
            "meta": {"source": f"urn:twinhub:source:{row['source']}"},
            "deviceName": [{"name": row["device"], "type": "user-friendly-name"}],
            "patient": {"reference": key_reference(row["patient_id"])},
        }
    )
