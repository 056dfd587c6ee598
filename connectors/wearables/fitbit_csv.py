"""Fitbit data exported as CSV by Fitabase (the research export of Fitbit accounts): daily
activity, hourly steps, calories and intensities, minute steps and intensities (wide: one row an
hour, a column a minute), heart rate every few seconds, sleep days and weight logs.

Times in these files are the account's local clock without an offset: the source's `timezone`
turns them into instants and keeps the offset. The same quantity often comes at several grains
(daily totals, hourly, by the minute); of an hour or a day that finer rows cover, only the
finer land as samples, so a day's steps are never counted twice. A daily total they cover is
Fitbit's own figure for the day and may hold more (steps the hourly files miss): it is kept as
the day's reported value (`Batch.reported`); hourly rows covered by minute ones are only counted
in the run's stats. The files of a source are read together (they decide together which grain
wins), again only when one of them changed.

Nothing is dropped unsaid: an empty value, a row of the wrong width, a line that is not UTF-8, a
time that is not one, an account Id that cannot make a Patient id, or a gzip file cut short is
a problem (quarantined) with its line, and the rest of the file lands. A file is read in one go
with polars; only a file that read refuses is read again line by line to find the bad ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from connectors._files import GZIP_MAGIC, FileConnector, describe_files, fingerprint
from connectors.base import PROBLEM_SCHEMA, RECORD_SCHEMA, SAMPLE_SCHEMA, Batch, Watermark, Window
from connectors.kinds import PATIENT_ID, SourceConfig, SourceKind

Grain = Literal["minute", "hour", "day"]
GRAIN_ORDER = {"minute": 0, "hour": 1, "day": 2}
LOCAL_TIME = "%m/%d/%Y %I:%M:%S %p"
LOCAL_DAY = "%m/%d/%Y"
"""A FHIR id: an account's Patient id becomes `Patient/<id>` in the daily FHIR."""
MAX_RAW = 64 * 1024
"""The most of a bad line kept in quarantine."""
OPTIONAL_COLUMNS = frozenset({"Fat"})
"""Columns a device fills only when it measured them (a scale without body fat): their empty
cells are counted in the run's stats, not quarantined."""


class FitbitCsvSource(SourceConfig):
    """Config of a `fitbit-csv` source: a folder of Fitabase CSV exports (plain or gzip), a
    file or a glob."""

    kind: Literal["fitbit-csv"]
    path: Path
    patients: dict[str, str] = Field(default_factory=dict)
    """Fitbit account id (the files' `Id`) -> the twin's Patient id."""
    patient_prefix: str | None = None
    """For accounts not in `patients`: the Patient id is this prefix and the account id
    (research exports of many accounts). Without it their rows are quarantined."""
    timezone: str = "UTC"
    """The IANA zone of the accounts' local clocks (the files carry no offset)."""
    device: str = "Fitbit"
    batch_samples: int = Field(default=500_000, ge=1)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not an IANA time zone; use e.g. 'America/New_York'") from None
        return name


# File -> (grain, time column, time format, [(metric, value expression, unit)]).
# A value expression is a column, or for the wide minute files the column prefix of minutes 00-59.
FILES: dict[str, tuple[Grain, str, str, list[tuple[str, str, str]]]] = {
    "dailyActivity_merged": (
        "day",
        "ActivityDate",
        LOCAL_DAY,
        [
            ("steps", "TotalSteps", "steps"),
            ("distance", "TotalDistance", "km"),
            ("calories", "Calories", "kcal"),
            ("active_minutes", "VeryActiveMinutes+FairlyActiveMinutes", "min"),
        ],
    ),
    "dailySteps_merged": ("day", "ActivityDay", LOCAL_DAY, [("steps", "StepTotal", "steps")]),
    "dailyCalories_merged": ("day", "ActivityDay", LOCAL_DAY, [("calories", "Calories", "kcal")]),
    "dailyIntensities_merged": (
        "day",
        "ActivityDay",
        LOCAL_DAY,
        [("active_minutes", "VeryActiveMinutes+FairlyActiveMinutes", "min")],
    ),
    "hourlySteps_merged": ("hour", "ActivityHour", LOCAL_TIME, [("steps", "StepTotal", "steps")]),
    "hourlyCalories_merged": ("hour", "ActivityHour", LOCAL_TIME, [("calories", "Calories", "kcal")]),
    "hourlyIntensities_merged": (
        "hour",
        "ActivityHour",
        LOCAL_TIME,
        [("activity_intensity", "TotalIntensity", "1")],
    ),
    "minuteStepsWide_merged": ("minute", "ActivityHour", LOCAL_TIME, [("steps", "Steps*", "steps")]),
    "minuteIntensitiesWide_merged": (
        "minute",
        "ActivityHour",
        LOCAL_TIME,
        [("activity_intensity", "Intensity*", "1")],
    ),
    "sleepDay_merged": (
        "day",
        "SleepDay",
        LOCAL_TIME,
        [("sleep_asleep", "TotalMinutesAsleep", "min"), ("time_in_bed", "TotalTimeInBed", "min")],
    ),
    "heartrate_seconds_merged": ("minute", "Time", LOCAL_TIME, [("heart_rate", "Value", "bpm")]),
    "weightLogInfo_merged": (
        "minute",
        "Date",
        LOCAL_TIME,
        [
            ("body_weight", "WeightKg", "kg"),
            ("body_fat_percentage", "Fat", "%"),
            ("body_mass_index", "BMI", "kg/m2"),
        ],
    ),
}
"""Daily sleep, heart rate and weight rows are instants (a day's figure, a reading every few
seconds, a weighing): they have no end and count to the day they name; other rows last their grain."""
DURATION = {"minute": "1m", "hour": "1h", "day": "1d"}
POINTS = {"sleepDay_merged", "heartrate_seconds_merged", "weightLogInfo_merged"}


class FitbitCsvConnector(FileConnector[FitbitCsvSource]):
    suffixes = (".csv", ".csv.gz")
    recursive = True

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Every file is read when any changed: they decide together which grain wins."""
        paths = [p for p in self.files() if _kind(p) is not None]
        self.stats["files not a Fitabase export (skipped)"] += len(self.files()) - len(paths)
        prints = {str(p): fingerprint(p) for p in paths}
        if (since or {}).get("files") == prints:
            return
        samples, reported, problems = self._read_all(paths)
        size = self.source.batch_samples
        for start in range(0, max(len(samples), 1), size):
            last = start + size >= len(samples)
            yield Batch(
                records=RECORD_SCHEMA.empty_table(),
                watermark={"files": prints if last else (since or {}).get("files", {})},
                samples=samples.slice(start, size),
                reported=reported if last else None,
                problems=problems if last else PROBLEM_SCHEMA.empty_table(),
            )

    def _read_all(self, paths: list[Path]) -> tuple[pa.Table, pa.Table, pa.Table]:
        """The samples no finer row covers; the daily totals finer rows cover (Fitbit's own
        figure for the day); and the problems."""
        frames, problems = [], []
        for path in paths:
            self.stats["files"] += 1
            samples, bad = self._read_file(path)
            frames.append(samples)
            problems.append(bad)
        every = pl.concat(frames).with_columns(pl.col("start_time").dt.truncate("1h").alias("hour"))
        # A row is covered where a finer one falls in its span (an hour's minutes, a day's hours
        # or minutes): only the finest lands, so nothing is counted twice.
        series = ["patient_id", "metric"]
        for span in ("hour", "day"):
            finest = every.group_by(*series, span).agg(pl.col("grain").min().alias(f"finest_{span}"))
            every = every.join(finest, on=[*series, span])
        daily = pl.col("grain") == GRAIN_ORDER["day"]
        covered = pl.when(daily).then(pl.col("finest_day")).otherwise(pl.col("finest_hour")) < pl.col("grain")
        reported = every.filter(covered & daily)
        self.stats["daily totals kept beside finer samples"] += len(reported)
        kept = every.filter(~covered)
        self.stats["hourly rows covered by minute ones (not landed twice)"] += (
            len(every) - len(kept) - len(reported)
        )
        return _table(kept), _table(reported), pa.concat_tables(problems).cast(PROBLEM_SCHEMA)

    def _read_file(self, path: Path) -> tuple[pl.DataFrame, pa.Table]:
        kind = _kind(path)
        assert kind is not None
        grain, time_column, time_format, measures = FILES[kind]
        raw, problems = read_rows(path, kind)
        if raw is None:
            return self._finish(_empty(), path, grain), _problems(str(path), problems)
        missing = [c for c in ["Id", time_column, *_columns(measures, raw.columns)] if c not in raw.columns]
        if missing:
            reason = f"{path.name} has no column {', '.join(missing)}; is it a Fitabase {kind} export?"
            return self._finish(_empty(), path, grain), _problems(
                str(path), [*problems, (1, reason, ",".join(c for c in raw.columns if c != "line_no"))]
            )
        zone = self.source.timezone
        local = pl.col(time_column).str.strptime(pl.Datetime("us"), time_format, strict=False)
        rows = raw.with_columns(
            local.alias("local"),
            pl.col("Id").replace_strict(self.source.patients, default=None).alias("patient_id"),
        )
        if self.source.patient_prefix is not None:
            prefixed = pl.lit(self.source.patient_prefix) + pl.col("Id")
            rows = rows.with_columns(pl.col("patient_id").fill_null(prefixed))
        rows = rows.with_columns(
            pl.col("local")
            .dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
            .alias("start"),
            # Checked here, at the boundary: an Id like "../x" must not become a Patient.
            pl.col("patient_id").str.contains(f"^{PATIENT_ID.pattern}$").fill_null(False).alias("valid_id"),
        )
        text = raw.select(
            "line_no", pl.concat_str(pl.exclude("line_no").fill_null(""), separator=",").alias("raw")
        )
        usable = pl.col("start").is_not_null() & pl.col("valid_id")
        bad_rows = rows.filter(~usable)
        problems += [
            (line, self._row_reason(kind, time_column, when, account, patient), raw_text)
            for line, when, account, patient, raw_text in bad_rows.join(text, on="line_no")
            .select("line_no", time_column, "Id", "patient_id", "raw")
            .iter_rows()
        ]
        # Times are worked out once per row: a wide row's 60 minutes share its hour's offset.
        good = rows.filter(usable).with_columns(
            pl.col("start").dt.convert_time_zone("UTC").alias("start_time"),
            (
                pl.lit(None, pl.Datetime("us", "UTC"))
                if kind in POINTS or grain == "minute"
                else pl.col("start").dt.offset_by(DURATION[grain]).dt.convert_time_zone("UTC")
            ).alias("end_time"),
            (pl.col("start").dt.base_utc_offset() + pl.col("start").dt.dst_offset())
            .dt.total_minutes()
            .cast(pl.Int32)
            .alias("utc_offset_minutes"),
            pl.col("start").dt.date().alias("day"),
        )
        samples = [_measure(good, metric, spec, unit) for metric, spec, unit in measures]
        frame = pl.concat(samples) if samples else _empty()
        bad_values = frame.filter(pl.col("value").is_null() & pl.col("text").is_not_null())
        problems += [
            (line, f"{kind}: {metric} value {value!r} is not a number", raw_text)
            for line, metric, value, raw_text in bad_values.join(text, on="line_no")
            .select("line_no", "metric", "text", "raw")
            .iter_rows()
        ]
        problems += self._empty_values(kind, frame.filter(pl.col("text").is_null()), text)
        return self._finish(frame.filter(pl.col("value").is_not_null()), path, grain), _problems(
            str(path), problems
        )

    def _empty_values(self, kind: str, empty: pl.DataFrame, text: pl.DataFrame) -> list[tuple[int, str, str]]:
        """A problem for each row and metric with an empty cell (per row, however many of a
        wide row's minutes); empty optional cells only counted."""
        optional = empty["column"].is_in(list(OPTIONAL_COLUMNS))
        for column, n in empty.filter(optional)["column"].value_counts().iter_rows():
            self.stats[f"empty {column} cells (not measured)"] += n
        per_row = (
            empty.filter(~optional)
            .group_by("line_no", "metric", maintain_order=True)
            .agg(pl.col("column").first(), pl.len().alias("cells"))
            .join(text, on="line_no")
        )
        return [
            (
                line,
                f"{kind}: the row has no {metric} value ({column} is empty)"
                if cells == 1
                else f"{kind}: the row has no {metric} value in {cells} of its minute columns "
                f"({column}, ...)",
                raw_text,
            )
            for line, metric, column, cells, raw_text in per_row.iter_rows()
        ]

    def _finish(self, frame: pl.DataFrame, path: Path, grain: Grain) -> pl.DataFrame:
        return frame.with_columns(
            pl.lit(self.source.device).alias("device"),
            pl.lit(str(path)).alias("origin"),
            pl.lit(GRAIN_ORDER[grain]).alias("grain"),
        )

    def _row_reason(
        self, kind: str, column: str, when: str | None, account: str | None, patient: str | None
    ) -> str:
        patients = f"sources.{self.source.name}.patients"
        if not account:
            return f"{kind}: the row has no account Id"
        if patient is None:
            return (
                f"{kind}: account {account} is not in {patients}; map it to its Patient id there "
                "(or set patient_prefix)"
            )
        if not PATIENT_ID.fullmatch(patient):
            return (
                f"{kind}: account Id {account!r} makes the Patient id {patient!r}, which is not a FHIR id "
                f"(1-64 of A-Z a-z 0-9 - .); map the account to its Patient id in {patients}"
            )
        if when is None:
            return f"{kind}: the row has no {column}"
        zone = self.source.timezone
        return f"{kind}: {column} {when!r} is not a time like 3/25/2016 1:00:00 PM that {zone} has"


def read_rows(path: Path, kind: str) -> tuple[pl.DataFrame | None, list[tuple[int, str, str]]]:
    """The file's rows as text columns with their `line_no`, and the problems of the lines that
    cannot be rows: not UTF-8, the wrong number of fields, the damaged end of a gzip file. None
    for a file of which no row can be read (its problem says why)."""
    data, damage = _unpacked(path)
    problems: list[tuple[int, str, str]] = []
    if damage is not None:
        end = data.rfind(b"\n") + 1  # the line the damage cuts is part of the damage
        cut = data.count(b"\n", 0, end) + 1
        reason = (
            f"file damaged after line {cut - 1:,} (byte {end:,} unpacked): {damage}; the lines "
            "before it landed; replace the file and sync again"
        )
        problems.append((cut, reason, _shown(data[end:])))
        data = data[:end]
    if not data.strip():
        return None, problems or [(1, f"{kind}: the file is empty; replace it with the export", "")]
    try:
        rows = pl.read_csv(data, infer_schema=False).with_row_index("line_no", offset=2)
        return rows.with_columns(pl.col("line_no").cast(pl.Int64)), problems
    except (pl.exceptions.PolarsError, ValueError):
        pass  # a bad line somewhere: find it
    lines = data.split(b"\n")
    try:
        header = lines[0].rstrip(b"\r").decode()
    except UnicodeDecodeError:
        return None, [
            *problems,
            (1, f"{kind}: the header line is not valid UTF-8; is it a Fitabase export?", _shown(lines[0])),
        ]
    width, kept, numbers, at = header.count(",") + 1, [lines[0]], [], len(lines[0]) + 1
    for n, line in enumerate(lines[1:], start=2):
        try:
            fields = line.decode().count(",") + 1
        except UnicodeDecodeError as e:
            reason = f"{kind}: line {n:,} (byte {at + e.start:,}) is not valid UTF-8 ({e.reason})"
            problems.append((n, reason, _shown(line)))
        else:
            if line.strip() and fields != width:
                problems.append((n, f"{kind}: the row has {fields} fields, the header {width}", _shown(line)))
            elif line.strip():
                kept.append(line)
                numbers.append(n)
        at += len(line) + 1
    try:
        rows = pl.read_csv(b"\n".join(kept), infer_schema=False, quote_char=None)
    except (pl.exceptions.PolarsError, ValueError) as e:
        return None, [*problems, (1, f"{kind}: the file cannot be read as CSV ({type(e).__name__})", "")]
    return rows.with_columns(pl.Series("line_no", numbers, pl.Int64)), problems


def _unpacked(path: Path) -> tuple[bytes, str | None]:
    """The file's bytes (unpacked if gzipped), and what broke off reading them, if anything: a
    damaged gzip stream is unpacked a megabyte at a time, so all but the last one's text is kept."""
    with path.open("rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            fh.seek(0)
            return fh.read(), None
        fh.seek(0)
        out: list[bytes] = []
        unpack = zlib.decompressobj(wbits=31)
        while chunk := fh.read(1 << 20):
            while chunk:
                try:
                    out.append(unpack.decompress(chunk))
                except zlib.error as e:
                    return b"".join(out), f"damaged gzip stream ({e})"
                chunk = unpack.unused_data if unpack.eof else b""
                if chunk:  # another gzip member follows
                    unpack = zlib.decompressobj(wbits=31)
        return b"".join(out), None if unpack.eof else "truncated gzip stream"


def _shown(line: bytes) -> str:
    """A bad line as kept in quarantine: its bytes as text, at most MAX_RAW of them."""
    return line[:MAX_RAW].decode(errors="backslashreplace").rstrip("\r\n")


def _kind(path: Path) -> str | None:
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    return stem if stem in FILES else None


def _columns(measures: list[tuple[str, str, str]], present: list[str]) -> list[str]:
    """The columns the measures read (a wide file's minute columns are checked by prefix)."""
    needed = []
    for _, spec, _ in measures:
        if spec.endswith("*"):
            if not any(c.startswith(spec[:-1]) for c in present):
                needed.append(spec[:-1] + "00")
        else:
            needed += spec.split("+")
    return needed


COLUMNS = [
    "patient_id",
    "start_time",
    "end_time",
    "utc_offset_minutes",
    "day",
    "line_no",
    "metric",
    "value",
    "unit",
    "text",
    "column",
]


def _measure(rows: pl.DataFrame, metric: str, spec: str, unit: str) -> pl.DataFrame:
    """One metric's samples from the rows: a column, a sum of columns, or 60 minute columns."""
    keep = ["patient_id", "start_time", "end_time", "utc_offset_minutes", "day", "line_no"]
    if spec.endswith("*"):  # wide: minute NN of the hour is column <prefix>NN
        prefix = spec[:-1]
        minutes = [c for c in rows.columns if c.startswith(prefix) and c[len(prefix) :].isdigit()]
        long = rows.select(*keep, *minutes).unpivot(index=keep, variable_name="minute", value_name="text")
        offset = pl.duration(minutes=pl.col("minute").str.slice(len(prefix)).cast(pl.Int32))
        long = long.with_columns(
            pl.col("minute").alias("column"),
            (pl.col("start_time") + offset).alias("start_time"),
            (pl.col("start_time") + offset + pl.duration(minutes=1)).alias("end_time"),
            pl.col("text").cast(pl.Float64, strict=False).alias("value"),
        )
    else:  # a column, or the sum of some ("VeryActiveMinutes+FairlyActiveMinutes")
        parts = [pl.col(p).cast(pl.Float64, strict=False) for p in spec.split("+")]
        long = rows.with_columns(
            pl.concat_str(spec.split("+"), separator="+").alias("text"),
            pl.lit(spec).alias("column"),
            pl.when(pl.any_horizontal(p.is_null() for p in parts))
            .then(None)
            .otherwise(pl.sum_horizontal(parts))
            .alias("value"),
        )
    return long.with_columns(pl.lit(metric).alias("metric"), pl.lit(unit).alias("unit")).select(COLUMNS)


def _table(frame: pl.DataFrame) -> pa.Table:
    return frame.sort("patient_id", "start_time").select(SAMPLE_SCHEMA.names).to_arrow().cast(SAMPLE_SCHEMA)


def _problems(file: str, rows: list[tuple[int, str, str]]) -> pa.Table:
    return pa.table(
        {
            "file": [file] * len(rows),
            "line_no": [r[0] for r in rows],
            "reason": [r[1] for r in rows],
            "raw": [r[2] for r in rows],
        },
        schema=PROBLEM_SCHEMA,
    )


def _empty() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "patient_id": pl.String,
            "start_time": pl.Datetime("us", "UTC"),
            "end_time": pl.Datetime("us", "UTC"),
            "utc_offset_minutes": pl.Int32,
            "day": pl.Date,
            "line_no": pl.Int64,
            "metric": pl.String,
            "value": pl.Float64,
            "unit": pl.String,
            "text": pl.String,
            "column": pl.String,
        }
    )


KIND = SourceKind(
    kind="fitbit-csv",
    modality="wearables",
    summary="Fitbit data exported as Fitabase CSV files (minute, hour and day grains)",
    config=FitbitCsvSource,
    build=lambda source, context: FitbitCsvConnector(source),
    records="samples",
    describe=describe_files,
)
