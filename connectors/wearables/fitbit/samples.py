"""What the Fitbit Web API answers, as samples: one parser per kind of data (intraday or by
range), each placing the patient's local clock times in their time zone. What cannot become a
sample is a problem with the reason (quarantined, never dropped)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa

from connectors.base import SAMPLE_SCHEMA
from connectors.wearables.fitbit.config import Data

SLEEP_LEVEL = {
    "asleep": "sleep_asleep",
    "restless": "sleep_awake",  # classic logs count restless minutes as awake (minutesAwake)
    "awake": "sleep_awake",
    "wake": "sleep_awake",
    "deep": "sleep_deep",
    "light": "sleep_light",
    "rem": "sleep_rem",
}
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


class PatientContext:
    __slots__ = ("device", "patient", "zone")

    def __init__(self, patient: str, zone: ZoneInfo, device: str) -> None:
        self.patient = patient
        self.zone = zone
        self.device = device


class Samples:
    """Samples gathered column by column; local times are placed in the patient's zone here."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA.names}
        self.reported: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA.names}
        """Fitbit's own totals of days whose intraday samples land (see `Batch.reported`)."""
        self.problems: list[tuple[str, int, str, str]] = []
        self.stats: Counter[str] = Counter()

    def problem(self, origin: str, reason: str, raw: object) -> None:
        """What Fitbit sent that cannot become a sample: quarantined with the reason."""
        self.problems.append((origin, 0, reason, orjson.dumps(raw).decode()))

    def __len__(self) -> int:
        return len(self.cols["value"])

    def __bool__(self) -> bool:
        return bool(self.cols["value"] or self.reported["value"] or self.problems or self.stats)

    def add(
        self,
        ctx: PatientContext,
        metric: str,
        start: datetime,
        end: datetime | None,
        value: float,
        unit: str,
        origin: str,
        device: str | None = None,
        *,
        reported: bool = False,
    ) -> None:
        """`start` and `end` are the patient's local clock times (naive), as Fitbit sends them."""
        aware = start.replace(tzinfo=ctx.zone)
        offset = aware.utcoffset() or timedelta()
        c = self.reported if reported else self.cols
        c["patient_id"].append(ctx.patient)
        c["device"].append(device or ctx.device)
        c["metric"].append(metric)
        c["start_time"].append((start - offset).replace(tzinfo=UTC))
        if end is not None:
            end = (end - (end.replace(tzinfo=ctx.zone).utcoffset() or timedelta())).replace(tzinfo=UTC)
        c["end_time"].append(end)
        c["utc_offset_minutes"].append(int(offset.total_seconds() // 60))
        c["value"].append(float(value))
        c["unit"].append(unit)
        c["origin"].append(origin)

    def table(self, *, reported: bool = False) -> pa.Table:
        cols = self.reported if reported else self.cols
        return pa.table(
            {name: pa.array(col, SAMPLE_SCHEMA.field(name).type) for name, col in cols.items()},
            schema=SAMPLE_SCHEMA,
        )


def request_path(data: Data, intraday: bool, start: date, end: date) -> str:
    if data == "heart_rate":
        return (
            f"/1/user/-/activities/heart/date/{start}/1d/1min.json"
            if intraday
            else f"/1/user/-/activities/heart/date/{start}/{end}.json"
        )
    if data == "steps":
        return (
            f"/1/user/-/activities/steps/date/{start}/1d/1min.json"
            if intraday
            else f"/1/user/-/activities/steps/date/{start}/{end}.json"
        )
    if data == "spo2":
        return (
            f"/1/user/-/spo2/date/{start}/all.json" if intraday else f"/1/user/-/spo2/date/{start}/{end}.json"
        )
    if data == "sleep":
        return f"/1.2/user/-/sleep/date/{start}/{end}.json"
    return f"/1/user/-/body/log/weight/date/{start}/{end}.json"


def _heart_intraday(samples: Samples, ctx: PatientContext, body: dict[str, Any], origin: str) -> None:
    _resting(samples, ctx, body, origin)
    for start, value in _intraday(samples, body, "activities-heart", origin):
        samples.add(ctx, "heart_rate", start, start + MINUTE, value, "bpm", origin)


def _resting(samples: Samples, ctx: PatientContext, body: dict[str, Any], origin: str) -> None:
    """The day's resting heart rate. The 2015-era API sent a plain number as `value` instead, of
    unstated meaning: that is counted in the stats, not landed."""
    for entry in body.get("activities-heart", []):
        value = entry.get("value")
        day = _day(entry.get("dateTime"))
        if isinstance(value, dict) and "restingHeartRate" in value:
            rate = _number(value["restingHeartRate"])
            if day is None or rate is None:
                samples.problem(origin, "a resting heart rate without a date or a number", entry)
                continue
            midnight = datetime.combine(day, datetime.min.time())
            samples.add(ctx, "resting_heart_rate", midnight, midnight + DAY, rate, "bpm", origin)
        elif not isinstance(value, dict):
            samples.stats["heart_rate_daily_values_skipped"] += 1


def _steps_intraday(samples: Samples, ctx: PatientContext, body: dict[str, Any], origin: str) -> None:
    """Steps per minute, and the day's total as Fitbit's reported figure (it may count steps
    the minutes miss). A day whose dataset is empty while its total is not (an app without
    intraday access gets only the total) lands the total as one day-long sample, so steps are
    never counted twice and never lost."""
    before = len(samples)
    for start, value in _intraday(samples, body, "activities-steps", origin):
        samples.add(ctx, "steps", start, start + MINUTE, value, "steps", origin)
    if len(samples) == before:
        _steps_daily(samples, ctx, body, origin, only_positive=True)
    else:
        _steps_daily(samples, ctx, body, origin, reported=True)


def _steps_daily(
    samples: Samples,
    ctx: PatientContext,
    body: dict[str, Any],
    origin: str,
    *,
    only_positive: bool = False,
    reported: bool = False,
) -> None:
    for entry in body.get("activities-steps", []):
        day, value = _day(entry.get("dateTime")), _number(entry.get("value"))
        if day is None or value is None:
            samples.problem(origin, "a daily step count without a date or a number", entry)
        elif value > 0 or not only_positive:
            midnight = datetime.combine(day, datetime.min.time())
            samples.add(ctx, "steps", midnight, midnight + DAY, value, "steps", origin, reported=reported)


def _intraday(
    samples: Samples, body: dict[str, Any], key: str, origin: str
) -> Iterator[tuple[datetime, float]]:
    """(local start, value) of each point of an intraday dataset; its day is the summary's dateTime."""
    summary = body.get(key) or [{}]
    day = _day(summary[0].get("dateTime"))
    dataset = (body.get(f"{key}-intraday") or {}).get("dataset") or []
    if day is None:
        if dataset:
            samples.problem(origin, f"an intraday dataset whose {key} summary has no date", summary[0])
        return
    for point in dataset:
        value = _number(point.get("value"))
        try:
            clock = datetime.strptime(str(point.get("time")), "%H:%M:%S").time()
        except ValueError:
            samples.problem(origin, "an intraday point whose time is not HH:MM:SS", point)
            continue
        if value is None:
            samples.problem(origin, "an intraday point whose value is not a number", point)
            continue
        yield datetime.combine(day, clock), value


def _sleep(samples: Samples, ctx: PatientContext, body: dict[str, Any], origin: str) -> None:
    """Each sleep log's stages (classic or stages levels) as samples of their length, and its
    time in bed."""
    for log_ in body.get("sleep", []):
        start, end = local_time(log_.get("startTime")), local_time(log_.get("endTime"))
        for segment in (log_.get("levels") or {}).get("data", []):
            begins, seconds = local_time(segment.get("dateTime")), _number(segment.get("seconds"))
            metric = SLEEP_LEVEL.get(str(segment.get("level")))
            if begins is None or seconds is None or metric is None:
                why = "an unknown sleep level" if metric is None else "a sleep stage without a time or length"
                samples.problem(origin, f"{why} in sleep log {log_.get('logId')}", segment)
                continue
            samples.add(ctx, metric, begins, begins + timedelta(seconds=seconds), seconds, "s", origin)
        in_bed = _number(log_.get("timeInBed"))
        if start is None or in_bed is None:
            samples.problem(origin, "a sleep log without a start time or time in bed", _summary(log_))
        else:
            samples.add(ctx, "time_in_bed", start, end, in_bed, "min", origin)


def _spo2_intraday(samples: Samples, ctx: PatientContext, body: Any, origin: str) -> None:
    for entry in body if isinstance(body, list) else [body]:
        for point in entry.get("minutes", []):
            start, value = local_time(point.get("minute")), _number(point.get("value"))
            if start is None or value is None:
                samples.problem(origin, "an SpO2 minute without a time or a number", point)
            else:
                samples.add(ctx, "oxygen_saturation", start, start + MINUTE, value, "%", origin)


def _spo2_daily(samples: Samples, ctx: PatientContext, body: Any, origin: str) -> None:
    """A night's mean SpO2, dated by Fitbit to the day the night ends, spans that day."""
    for entry in body if isinstance(body, list) else [body]:
        day, value = _day(entry.get("dateTime")), entry.get("value")
        mean = _number(value.get("avg")) if isinstance(value, dict) else None
        if day is None or mean is None:
            samples.problem(origin, "a nightly SpO2 without a date or an average", entry)
            continue
        midnight = datetime.combine(day, datetime.min.time())
        samples.add(ctx, "oxygen_saturation", midnight, midnight + DAY, mean, "%", origin)


def _weight(samples: Samples, ctx: PatientContext, body: dict[str, Any], origin: str) -> None:
    """Weight logs (kg: no Accept-Language header asks for Fitbit's metric units), with BMI and
    body fat when sent."""
    for entry in body.get("weight", []):
        when = local_time(f"{entry.get('date')}T{entry.get('time', '00:00:00')}")
        if when is None:
            samples.problem(origin, "a weight log without a date and time", entry)
            continue
        via = entry.get("source")
        device = None
        if isinstance(via, str):
            device = f"Fitbit {via}" if via.lower().startswith("aria") else f"Fitbit ({via} entry)"
        for key, metric, unit in (
            ("weight", "body_weight", "kg"),
            ("bmi", "body_mass_index", "kg/m2"),
            ("fat", "body_fat_percentage", "%"),
        ):
            if key not in entry:
                continue
            value = _number(entry[key])
            if value is None:
                samples.problem(origin, f"a weight log whose {key} is not a number", entry)
            else:
                samples.add(ctx, metric, when, None, value, unit, origin, device)


def _summary(log_: dict[str, Any]) -> dict[str, Any]:
    """A sleep log without its (long) levels, for a problem's raw text."""
    return {k: v for k, v in log_.items() if k != "levels"}


PARSERS: dict[tuple[Data, bool], Callable[[Samples, PatientContext, Any, str], None]] = {
    ("heart_rate", True): _heart_intraday,
    ("heart_rate", False): _resting,
    ("steps", True): _steps_intraday,
    ("steps", False): _steps_daily,
    ("spo2", True): _spo2_intraday,
    ("spo2", False): _spo2_daily,
    ("sleep", False): _sleep,
    ("weight", False): _weight,
}


def _day(value: object) -> date | None:
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        return None


def local_time(value: object) -> datetime | None:
    """A Fitbit local time ('2016-12-13T09:59:00.000'), naive."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed.replace(tzinfo=None)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
