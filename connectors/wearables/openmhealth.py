"""Open mHealth data points in JSON files: one per file, a JSON array of them, or NDJSON (one a
line), plain or gzipped. Each is validated against the schemas its header names (the folder
`schemas`, see `connectors.wearables.openmhealth_schemas`) and its body becomes wearable samples, columnar,
named as in `harmonize/wearables/wearable_metrics.toml` (`openmhealth.toml` says which schema maps to which
metric). A data point that cannot become samples is a problem with the reason, never dropped:

- invalid header or body: the schema, the JSON path and the validator's message;
- a schema not in the folder, or one twinhub does not map;
- no patient: its `user_id` is not in `patients` and there is no `patient`;
- a `descriptive_statistic` (an average, minimum, ... over a period): a summary, not a
  measurement; landed beside raw samples it would be counted again in the daily rollups that
  twinhub derives itself, so it is quarantined with the statistic and the period;
- no `effective_time_frame` (older schemas allow it): the header's `creation_date_time` says when
  the data point was made, not when the body was measured, so twinhub does not guess;
- a time interval that ends before it starts, or a time or duration that cannot be one;
- the damaged end of a file (a gzip file cut short): the data points before it land.

Times become UTC instants; `utc_offset_minutes` is the offset the timestamp was written with (the
start's; for end + duration the end's). A date + part_of_day has no offset: it is read in the
source's `timezone`, with the hours `[part_of_day]` gives. Files are read whole, once each (a
changed file is read again; the store drops the samples it already holds).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from connectors._files import GZIP_MAGIC, FileConnector, describe_files, fingerprint, open_maybe_gzipped
from connectors._lines import DAMAGE, _gunzipped
from connectors.base import PROBLEM_SCHEMA, RECORD_SCHEMA, SAMPLE_SCHEMA, Batch, Watermark, Window
from connectors.kinds import SourceConfig, SourceKind
from connectors.wearables.openmhealth_schemas import (
    SchemaFolder,
    SchemaGapError,
    SchemaId,
    SchemaMismatchError,
    parse_instant,
    rules,
)

BOM = b"\xef\xbb\xbf"
WHOLE_FILE = "the file"
READ_ERRORS = DAMAGE
"""What reading a damaged file (a gzip file cut short) raises part way."""
MAX_RAW = 64 * 1024
"""The most of a data point's text kept in quarantine."""


class OpenMHealthSource(SourceConfig):
    """Config of an `openmhealth` source: JSON files of data points, a folder of them or a glob."""

    kind: Literal["openmhealth"]
    path: Path
    schemas: Path
    """The Open mHealth schemas' `schema/` folder (omh/<name>-<version>.json), e.g. a checkout of
    github.com/openmhealth/schemas: the data points are validated against it."""
    patients: dict[str, str] = Field(default_factory=dict)
    """A data point's header.user_id -> the twin's Patient id."""
    patient: str | None = None
    """The Patient id of data points whose user_id is absent or not in `patients`."""
    timezone: str = "UTC"
    """Where a time interval of date + part_of_day (which has no offset) was lived."""
    batch_samples: int = Field(default=200_000, ge=1)
    """Samples (and problems) per batch at most, so memory stays bounded whatever the files."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone {zone!r} is not an IANA time zone; use e.g. 'Europe/Berlin'"
            ) from None
        return zone

    @model_validator(mode="after")
    def _someone(self) -> OpenMHealthSource:
        if not self.patients and self.patient is None:
            raise ValueError(
                f'source {self.name!r} names no patient; set `patient = "<Patient id>"` or a '
                "[sources.patients] table of user_id = Patient id"
            )
        return self


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One data point as read: where it is in its file and its text; `value` is its JSON (None
    with `error` when the text is not JSON)."""

    position: int
    """Its line (NDJSON), its 1-based place in the array, or 1 (a file of one data point)."""
    where: str
    raw: str
    value: Any = None
    error: str | None = None


class DataPointError(ValueError):
    """A data point that cannot become samples; the message is the problem's reason."""


class OpenMHealthConnector(FileConnector[OpenMHealthSource]):
    suffixes = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")

    def __init__(self, source: OpenMHealthSource) -> None:
        super().__init__(source)
        self._schemas: SchemaFolder | None = None

    def check(self) -> None:
        self.files()
        self.schemas()

    def schemas(self) -> SchemaFolder:
        """The schema folder, read once (a SourceError naming the fix when it is missing or empty)."""
        if self._schemas is None:
            self._schemas = SchemaFolder(self.name, self.source.schemas)
        return self._schemas

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Every data point of the files not read yet whatever the window (the store keeps what
        falls in it); a file's fingerprint enters the watermark with its last batch."""
        reader = _Reader(source=self.source, schemas=self.schemas())
        files = self.files()
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = {str(f): known[str(f)] for f in files if str(f) in known}
        for path in files:
            now = fingerprint(path)
            if progress.get(str(path)) == now:
                continue
            self.stats["files"] += 1
            last = 0
            try:
                for entry in data_points(path):
                    reader.read(str(path), entry)
                    last = entry.position
                    if reader.size >= self.source.batch_samples:
                        yield reader.batch(progress)
            except READ_ERRORS as e:  # the rest of the file cannot be read; what came before lands
                reader.damaged(str(path), last + 1, f"{type(e).__name__}: {e}")
            progress[str(path)] = now
        yield reader.batch(progress)


def data_points(path: Path) -> Iterator[Entry]:
    """The data points of a file: NDJSON files line by line; a JSON file as one document (a data
    point or an array of them), else as JSON lines."""
    if path.name.endswith((".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")):
        yield from _lines(_file_lines(path))
        return
    with open_maybe_gzipped(path) as fh:
        data = fh.read().removeprefix(BOM)
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        first = next((line for line in data.splitlines() if line.strip()), b"")
        if _is_json(first):
            yield from _lines(io.BytesIO(data))
        else:
            yield Entry(position=1, where=WHOLE_FILE, raw=_text(data), error=f"not JSON ({e})")
        return
    if isinstance(document, list):
        for n, item in enumerate(document, start=1):
            yield Entry(position=n, where=f"item {n}", raw=orjson.dumps(item).decode(), value=item)
    else:
        yield Entry(position=1, where=WHOLE_FILE, raw=_text(data), value=document)


def _file_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file, plain or gzip. A GzipFile loses the lines it decompressed before a
    damaged stream fails; here every whole line before the damage comes out first."""
    with path.open("rb") as fh:
        if fh.read(2) != GZIP_MAGIC:
            fh.seek(0)
            yield from fh
            return
        fh.seek(0)
        parts: list[bytes] = []  # the line not finished yet, in pieces
        for piece in _gunzipped(fh):
            *ended, rest = piece.split(b"\n")
            if ended:
                yield b"".join([*parts, ended[0]]) + b"\n"
                yield from (line + b"\n" for line in ended[1:])
                parts = []
            parts.append(rest)
        if last := b"".join(parts):
            yield last


def _lines(fh: Iterable[bytes]) -> Iterator[Entry]:
    for n, line in enumerate(fh, start=1):
        line = line.removeprefix(BOM) if n == 1 else line
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield Entry(position=n, where=f"line {n}", raw=_text(line), error=f"not JSON ({e})")
            continue
        yield Entry(position=n, where=f"line {n}", raw=_text(line), value=value)


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _text(data: bytes) -> str:
    return data.decode(errors="backslashreplace").rstrip("\r\n")


@dataclass(kw_only=True)
class _Reader:
    """Data points in, columns of samples and problems out, a batch at a time."""

    source: OpenMHealthSource
    schemas: SchemaFolder
    columns: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in SAMPLE_SCHEMA.names})
    problems: list[dict[str, Any]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return len(self.columns["metric"]) + len(self.problems)

    def read(self, file: str, entry: Entry) -> None:
        self.stats["data_points"] += 1
        try:
            if entry.error is not None:
                raise DataPointError(entry.error)
            samples = self._samples(entry.value)
        except DataPointError as e:
            self._problem(file, entry.position, f"{entry.where}: {e}", entry.raw)
            return
        except (ValueError, OverflowError, KeyError, TypeError) as e:  # a date or duration no clock has
            self._problem(file, entry.position, f"{entry.where}: cannot become samples ({e})", entry.raw)
            return
        origin = file if entry.where == WHOLE_FILE else f"{file}:{entry.where}"
        for sample in samples:
            for name, value in zip(SAMPLE_SCHEMA.names, (*sample, origin), strict=True):
                self.columns[name].append(value)
        self.stats["samples"] += len(samples)

    def _problem(self, file: str, line: int, reason: str, raw: str) -> None:
        self.stats["quarantined"] += 1
        self.problems.append({"file": file, "line_no": line, "raw": raw[:MAX_RAW], "reason": reason})

    def damaged(self, file: str, line: int, error: str) -> None:
        """The file breaks off at data point (or line) `line`: that is a problem, not the end."""
        where = f"after line {line - 1:,}" if line > 1 else "at its start"
        reason = (
            f"file damaged {where}: {error}; the data points before it landed; "
            "replace the file and sync again"
        )
        self._problem(file, line, reason, "")

    def batch(self, progress: dict[str, Any]) -> Batch:
        samples = pa.table(
            {n: pa.array(v, SAMPLE_SCHEMA.field(n).type) for n, v in self.columns.items()},
            schema=SAMPLE_SCHEMA,
        )
        batch = Batch(
            records=RECORD_SCHEMA.empty_table(),
            watermark={"files": dict(progress)},
            samples=samples,
            problems=pa.Table.from_pylist(self.problems, PROBLEM_SCHEMA),
            stats=self.stats,
        )
        self.columns = {name: [] for name in SAMPLE_SCHEMA.names}
        self.problems, self.stats = [], Counter()
        return batch

    def _samples(self, point: Any) -> list[tuple[Any, ...]]:
        """(patient, device, metric, start, end, offset, value, unit) of each sample of a data point."""
        if not (
            isinstance(point, dict)
            and isinstance(point.get("header"), dict)
            and isinstance(point.get("body"), dict)
        ):
            raise DataPointError("not an Open mHealth data point: it needs a `header` and a `body` object")
        header, body = point["header"], point["body"]
        schema = self._schema(header)
        uri = self.schemas.find(schema)
        if uri is None:
            raise DataPointError(
                f"schema {schema} is not in the schemas folder {str(self.schemas.folder)!r}; add "
                f"{schema.namespace}/{schema.name}-{schema.version}.json there or fix header.schema_id"
            )
        try:
            self.schemas.check(uri, body)
        except SchemaMismatchError as e:
            self.stats["schema_invalid"] += 1
            raise DataPointError(f"body does not match schema {schema} {e}") from None
        except SchemaGapError as e:
            raise DataPointError(f"body cannot be checked against schema {schema}: {e}") from None
        fields = rules()["measures"].get(schema.namespace, {}).get(schema.name)
        if fields is None:
            raise DataPointError(
                f"schema {schema} is valid but not one twinhub maps to samples ({_mapped()})"
            )
        patient = self._patient(header)
        if "descriptive_statistic" in body:
            raise DataPointError(
                f"{schema} body is the {body['descriptive_statistic']} over "
                f"{_period(body.get('effective_time_frame'))}, a summary, not a measurement: twinhub "
                "lands measurements and derives daily statistics itself"
            )
        if "effective_time_frame" not in body:
            raise DataPointError(
                f"{schema} body has no effective_time_frame, so it is not known when it was measured "
                "(header.creation_date_time is when the data point was made); add one to the body"
            )
        start, end, offset = time_frame(body["effective_time_frame"], ZoneInfo(self.source.timezone))
        device = _device(header)
        samples = []
        for name, rule in fields.items():
            measured = body.get(name)
            if isinstance(measured, dict):
                value, unit = measured.get("value"), measured.get("unit")
            else:
                value, unit = measured, rule.get("unit")
            if isinstance(value, int | float) and not isinstance(value, bool):
                samples.append((patient, device, rule["metric"], start, end, offset, float(value), unit))
        if not samples:
            raise DataPointError(f"{schema} body has none of {', '.join(fields)}, so it makes no sample")
        return samples

    def _schema(self, header: dict[str, Any]) -> SchemaId:
        """The schema the header names, with the header checked against header-1.x if the folder has it."""
        if (uri := self.schemas.alias("omh", "header", 1)) is not None:
            try:
                self.schemas.check(uri, header)
            except SchemaMismatchError as e:
                self.stats["schema_invalid"] += 1
                raise DataPointError(f"header does not match schema omh:header:1.x {e}") from None
            except SchemaGapError as e:
                raise DataPointError(f"header cannot be checked: {e}") from None
        named = header.get("schema_id")
        match [named.get(k) for k in ("namespace", "name", "version")] if isinstance(named, dict) else []:
            case [str() as namespace, str() as name, str() as version]:
                return SchemaId(namespace=namespace, name=name, version=version)
        raise DataPointError("header.schema_id must name the body's schema: namespace, name and version")

    def _patient(self, header: dict[str, Any]) -> str:
        user = header.get("user_id")
        patient = self.source.patients.get(user) if isinstance(user, str) else None
        if patient is None:
            patient = self.source.patient
        if patient is None:
            key = f"sources.{self.source.name}"
            raise DataPointError(
                f"no patient for user_id {user!r}: add it to {key}.patients or set {key}.patient"
                if user is not None
                else f"the data point has no header.user_id and {key}.patient is not set"
            )
        return patient


def time_frame(frame: dict[str, Any], zone: ZoneInfo) -> tuple[datetime, datetime | None, int]:
    """(start, end or None for an instant, both UTC, and the written offset in minutes) of a
    checked effective_time_frame."""
    if "date_time" in frame:
        moment = parse_instant(frame["date_time"])
        return moment.astimezone(UTC), None, _minutes(moment)
    interval = frame["time_interval"]
    if "date" in interval:
        first, last = rules()["part_of_day"][interval["part_of_day"]]
        day = date.fromisoformat(interval["date"])
        midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
        start, end = midnight + timedelta(hours=first), midnight + timedelta(hours=last)
    elif "start_date_time" not in interval:
        end = parse_instant(interval["end_date_time"])
        start = end - _duration(interval["duration"])
    else:
        start = parse_instant(interval["start_date_time"])
        has_end = "end_date_time" in interval
        end = parse_instant(interval["end_date_time"]) if has_end else start + _duration(interval["duration"])
    if end < start:
        raise DataPointError(
            f"its time interval ends ({end.isoformat()}) before it starts ({start.isoformat()})"
        )
    return start.astimezone(UTC), end.astimezone(UTC), _minutes(start)


def _duration(value: dict[str, Any]) -> timedelta:
    seconds = rules()["durations"].get(value["unit"])
    if seconds is None:
        raise DataPointError(
            f"duration unit {value['unit']!r} is unknown; use one of {', '.join(rules()['durations'])}"
        )
    return timedelta(seconds=value["value"] * seconds)


def _minutes(moment: datetime) -> int:
    offset = moment.utcoffset()
    assert offset is not None
    return int(offset.total_seconds() // 60)


def _device(header: dict[str, Any]) -> str | None:
    """acquisition_provenance.source_name, with its modality (sensed, self-reported) if given."""
    provenance = header.get("acquisition_provenance") or {}
    name, modality = provenance.get("source_name"), provenance.get("modality")
    return f"{name} ({modality})" if name and modality else name


def _period(frame: Any) -> str:
    """An effective_time_frame as written, for a problem's reason."""
    frame = frame if isinstance(frame, dict) else {}
    interval = frame.get("time_interval", {})
    if "date_time" in frame:
        return str(frame["date_time"])
    if "date" in interval:
        return f"the {interval['part_of_day']} of {interval['date']}"
    duration = interval.get("duration", {})
    start, end = interval.get("start_date_time"), interval.get("end_date_time")
    if start and end:
        return f"{start} to {end}"
    if start or end:
        return f"{duration.get('value')} {duration.get('unit')} {'from' if start else 'to'} {start or end}"
    return "an unstated period"


def _mapped() -> str:
    measures = rules()["measures"]
    return "it maps " + ", ".join(f"{ns}:{name}" for ns, names in measures.items() for name in names)


KIND = SourceKind(
    kind="openmhealth",
    modality="wearables",
    summary="Open mHealth / IEEE 1752 data points (JSON files), validated against their schemas",
    config=OpenMHealthSource,
    build=lambda source, context: OpenMHealthConnector(source),
    records="samples",
    describe=describe_files,
)
