"""Wearable samples to standard codes and units, columnar: millions of samples a pull, so no
Python per sample.

`wearable_metrics.toml` names each metric's LOINC code, the UCUM unit it is kept in and the unit
spellings vendors send with their conversion. `normalize_samples` converts a connector's samples
to that unit and codes them; a sample whose metric or unit the file does not know, or whose
value or times make no sense, is a problem with the reason (quarantined, never dropped).

Pure: the data file is read once per process.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa

from connectors.base import PROBLEM_SCHEMA, SAMPLE_SCHEMA

METRICS_FILE = Path(__file__).with_name("wearable_metrics.toml")
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
    day_of: Literal["start", "end"]
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
def _conversions() -> pl.DataFrame:
    """(metric, sent unit) -> factor, offset, the metric's unit and LOINC code."""
    rows = [
        (m.name, spelling, factor, offset, m.unit, m.loinc)
        for m in metrics().values()
        for spelling, (factor, offset) in m.units.items()
    ]
    return pl.DataFrame(
        rows,
        schema={"metric": pl.String, "unit": pl.String, "factor": pl.Float64, "offset": pl.Float64,
                "to_unit": pl.String, "loinc_code": pl.String},
        orient="row",
    )  # fmt: skip


def normalize_samples(samples: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The samples in their metric's unit with its LOINC code (NORMALIZED_SCHEMA), and the
    samples that cannot land as problems (PROBLEM_SCHEMA) with the reason."""
    frame = pl.from_arrow(samples.cast(SAMPLE_SCHEMA))
    assert isinstance(frame, pl.DataFrame)
    known = frame.join(_conversions(), on=["metric", "unit"], how="left", maintain_order="left")
    reason = (
        pl.when(~pl.col("metric").is_in(list(metrics())))
        .then(pl.format("unknown metric {}; known: {}", pl.col("metric"), pl.lit(", ".join(metrics()))))
        .when(pl.col("factor").is_null())
        .then(
            pl.format("metric {} does not take unit {}", pl.col("metric"), pl.col("unit").fill_null("(none)"))
        )
        .when(~pl.col("value").is_finite())
        .then(pl.format("value {} is not a number", pl.col("value")))
        .when(pl.col("end_time") < pl.col("start_time"))
        .then(pl.lit("the sample ends before it starts"))
        .when(pl.col("patient_id") == "")
        .then(pl.lit("no patient"))
    )
    judged = known.with_columns(reason.alias("reason"))
    bad = judged.filter(pl.col("reason").is_not_null())
    good = judged.filter(pl.col("reason").is_null()).select(
        *(name for name in NORMALIZED_SCHEMA.names if name not in ("value", "unit", "loinc_code")),
        (pl.col("value") * pl.col("factor") + pl.col("offset")).alias("value"),
        pl.col("loinc_code"),
        pl.col("to_unit").alias("unit"),
    )
    problems = bad.select(
        pl.col("origin").alias("file"),
        pl.lit(0, pl.Int64).alias("line_no"),
        pl.format("{} sample of {}: {}", pl.col("metric"), pl.col("patient_id"), pl.col("reason")).alias(
            "reason"
        ),
        pl.struct(*SAMPLE_SCHEMA.names).struct.json_encode().alias("raw"),
    )
    return good.select(NORMALIZED_SCHEMA.names).to_arrow().cast(NORMALIZED_SCHEMA), problems.to_arrow().cast(
        PROBLEM_SCHEMA
    )
