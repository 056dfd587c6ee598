"""Apple Health exports: the Health app's `export.zip` (read in place) or its `export.xml`,
streamed in bounded memory whatever their size.

The XML is fed in 1 MiB chunks, straight from the zip member, to the expat parser defusedxml
sets up: a file that declares an entity (billion laughs, `<!ENTITY x SYSTEM "file:///...">`) is
refused whole. XML only allows such declarations before the first element, so nothing of a
refused file has been read, let alone yielded; Apple's own internal DTD (element and attribute
declarations only) parses, and no DTD is ever fetched. No element tree is built: each top-level
`Record` of a mapped type (`apple_health.toml`) becomes a row of its attribute strings, turned
into Arrow a few thousand rows at a time (vectorized: dates, offsets, units, sleep durations),
and `batch_samples` rows make a batch. Records of other types, workouts and activity summaries
are counted per type; the Records inside a Correlation are copies of top-level ones (Apple's DTD
says so) and are not read twice.

A file broken part way (cut short, bad bytes, a damaged zip) keeps the samples read before the
break; the break is a problem with its line, so nothing is lost silently. A zip cut short has
lost its central directory (its list of members, at the end): it is read front to back instead,
member by member from their own headers (stream-unzip), up to the cut. Files are read whole,
once each: a changed file is read again whole (the store dedupes samples).
"""

from __future__ import annotations

import functools
import logging
import re
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from xml.parsers import expat
from xml.parsers.expat import XMLParserType

import polars as pl
import pyarrow as pa
from defusedxml.common import EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import DefusedXMLParser
from pydantic import Field

from connectors._files import FileConnector, describe_files, fingerprint
from connectors.base import PROBLEM_SCHEMA, RECORD_SCHEMA, SAMPLE_SCHEMA, Batch, Watermark, Window
from connectors.errors import SourceError
from connectors.kinds import SourceConfig, SourceKind
from connectors.wearables.apple_zip import READ_ERRORS, READ_SIZE, RefusedError, exports

log = logging.getLogger(__name__)

TYPES_FILE = Path(__file__).with_name("apple_health.toml")
MAX_TOKEN = 16 << 20
"""The most XML read without a single element starting or ending. Apple writes no attribute or
text near that long; a file that does (an attribute bomb: 1 GiB in one attribute, a megabyte
zipped) is cut there as if broken, in a second, instead of expat rescanning the growing token
for minutes and holding it in memory."""
SLICE = 8192
"""Rows are converted to Arrow this many at a time (as Python strings they take several times
the memory); a chunk is `batch_samples` of them."""
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
DATE_EXAMPLE = "2016-04-13 09:06:19 +0100"
CDA_COPY = "export_cda.xml"
"""Apple writes the same data again as a CDA document beside export.xml; it is not read."""
HEADER_ELEMENTS = frozenset({"ExportDate", "Me"})
"""Top-level elements that are not data (Me is the person's birth date and sex: not kept)."""
DEVICE_FIELD = re.compile(r"(\w+):(.*?)(?=, \w+:|>$)")
ROWS = {
    "type": pl.String,
    "unit": pl.String,
    "text": pl.String,
    "source_name": pl.String,
    "device": pl.String,
    "start": pl.String,
    "end": pl.String,
    "line_no": pl.Int64,
}
"""A record as read: its attributes as written (`text` is its value) and its line."""

Chunk = tuple[pa.Table, pa.Table, Counter[str]]
"""Samples, problems and what was counted, of a batch's worth of records."""


class AppleHealthSource(SourceConfig):
    """Config of an `apple-health` source: one person's export (export.zip or export.xml), a
    folder of them or a glob."""

    kind: Literal["apple-health"]
    path: Path
    patient: str = Field(min_length=1)
    """The twin's Patient id: an export is one person's."""
    batch_samples: int = Field(default=250_000, ge=1)


@dataclass(frozen=True, kw_only=True)
class RecordTypes:
    quantities: dict[str, str]
    """Quantity type -> metric."""
    fractions: frozenset[str]
    """Quantity types written as a fraction with unit "%"."""
    categories: dict[str, dict[str, str]]
    """Category type -> its value -> metric."""


@functools.cache
def record_types() -> RecordTypes:
    data = tomllib.loads(TYPES_FILE.read_text())
    return RecordTypes(
        quantities=data["quantities"],
        fractions=frozenset(data["percent_as_fraction"]),
        categories=data["categories"],
    )


class AppleHealthConnector(FileConnector[AppleHealthSource]):
    suffixes = (".zip", ".xml", ".xml.gz")

    def files(self) -> list[Path]:
        """The files the path names, but not Apple's CDA copy of an export unless the path
        names that file itself."""
        found = [f for f in super().files() if f.name != CDA_COPY or f == self.source.path]
        if not found:
            raise SourceError(
                self.name,
                f"only Apple's CDA copy ({CDA_COPY}) at {str(self.source.path)!r}; point "
                "sources.path at the Health app's export.zip or its export.xml",
            )
        return found

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Files are read whole whatever the window; the store keeps what falls in it. A file's
        fingerprint joins the watermark with its last batch."""
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = dict(known)
        for path in self.files():
            now = fingerprint(path)
            if known.get(str(path)) == now:
                continue
            self.stats["files"] += 1
            chunks = self._chunks(path)
            chunk = next(chunks)  # every file yields at least one chunk (its last)
            for following in chunks:
                yield _batch(chunk, progress)
                chunk = following
            progress[str(path)] = now
            yield _batch(chunk, progress)

    def _chunks(self, path: Path) -> Iterator[Chunk]:
        """The file's samples in batches; one problem for a file refused whole."""
        try:
            for origin, stream in exports(path):
                yield from read_export(stream, origin, self.source.patient, self.source.batch_samples)
        except RefusedError as e:
            log.warning("source %r: %s", self.name, e)
            problem = pa.table(
                {"file": [e.origin], "line_no": [0], "reason": [str(e)], "raw": [""]}, schema=PROBLEM_SCHEMA
            )
            yield SAMPLE_SCHEMA.empty_table(), problem, Counter()


def read_export(stream: IO[bytes], origin: str, patient: str, limit: int) -> Iterator[Chunk]:
    """An export's samples in chunks of at most `limit` records (their last chunk carries the
    break, if the file breaks off). Raises `RefusedError` before the first record if it is
    hostile or not an export."""
    parser = defused_expat()
    records = RecordReader(origin, patient, limit, parser)
    broken: tuple[int, str] | None = None
    fed = 0
    try:
        while data := stream.read(READ_SIZE):
            parser.Parse(data, False)
            fed += len(data)
            if fed - records.last_event > MAX_TOKEN:
                line = parser.CurrentLineNumber
                broken = (
                    line,
                    f"holds more than {MAX_TOKEN >> 20} MiB without a tag after line {line} (byte "
                    f"{records.last_event:,}): an attribute or text that long is no Health record",
                )
                break
            yield from records.ready()
        else:
            parser.Parse(b"", True)
    except (EntitiesForbidden, ExternalReferenceForbidden) as e:
        declared = f" (SYSTEM {e.sysid!r})" if e.sysid else ""
        raise RefusedError(
            origin,
            f"is refused: it declares the XML entity {e.name!r}{declared}. Entities are never expanded "
            "(billion laughs, external files) and Health app exports declare none; export again",
        ) from None
    except expat.ExpatError as e:  # expat counts columns from 0
        reason = f"breaks off at line {e.lineno}, column {e.offset + 1} ({expat.ErrorString(e.code)})"
        broken = (e.lineno, reason)
    except READ_ERRORS as e:
        line = parser.CurrentLineNumber
        broken = (line, f"cannot be read past line {line} ({type(e).__name__}: {e})")
    yield from records.ready()
    yield records.last(broken)


def defused_expat() -> XMLParserType:
    """The expat parser defusedxml sets up, with its guards (an entity declaration or an external
    reference raises), but without ElementTree's Python layer: elements go to our handlers with
    their attributes as a dict made in C, and text is skipped unread."""
    parser: XMLParserType = DefusedXMLParser(target=object()).parser  # a target that builds nothing
    parser.DefaultHandlerExpand = None
    parser.ordered_attributes = False
    return parser


class RecordReader:
    """The parser's element handlers: top-level Records of mapped types into rows of their
    attributes, everything else counted; a chunk every `limit` rows."""

    def __init__(self, origin: str, patient: str, limit: int, parser: XMLParserType) -> None:
        self.origin, self.patient, self.limit = origin, patient, limit
        self.parser = parser
        parser.StartElementHandler, parser.EndElementHandler = self.start, self.end
        types = record_types()
        self.mapped = {name: name for name in [*types.quantities, *types.categories]}
        self.depth = 0
        self.last_event = 0
        """Where the last element started or ended (its byte index)."""
        self.rows: list[tuple[str | int | None, ...]] = []
        self.slices: list[tuple[pa.Table, pa.Table]] = []
        """The chunk's rows so far as samples and problems."""
        self.sliced = 0
        self.unmapped: Counter[str] = Counter()
        self.done: list[Chunk] = []
        self.same: dict[str | None, str | None] = {}
        """One copy of each unit and source name of the current slice."""
        self.devices: dict[tuple[str | None, str], str | None] = {}
        """Device labels of the current slice, by source and device text."""

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.depth += 1
        self.last_event = self.parser.CurrentByteIndex
        if self.depth != 2:
            if self.depth == 1 and tag != "HealthData":
                raise RefusedError(
                    self.origin,
                    f"is not an Apple Health export (its root element is <{tag}>, not <HealthData>); "
                    "point sources.path at the Health app's export.zip or its export.xml",
                )
            return
        if tag != "Record":
            if tag not in HEADER_ELEMENTS:
                self.unmapped[tag] += 1
            return
        kind = self.mapped.get(attrs.get("type", ""))
        if kind is None:
            self.unmapped[attrs.get("type", "(no type)")] += 1
            return
        same = self.same
        source_name = same.setdefault(attrs.get("sourceName"), attrs.get("sourceName"))
        start, end = attrs.get("startDate"), attrs.get("endDate")
        self.rows.append(
            (
                kind,
                same.setdefault(attrs.get("unit"), attrs.get("unit")),
                attrs.get("value"),
                source_name,
                self._device(source_name, attrs.get("device")),
                start,
                start if end == start else end,
                self.parser.CurrentLineNumber,
            )
        )
        if len(self.rows) >= min(SLICE, self.limit - self.sliced):
            self._slice()
            if self.sliced >= self.limit:
                self.done.append(self.flush())

    def end(self, tag: str) -> None:
        self.depth -= 1
        self.last_event = self.parser.CurrentByteIndex

    def _device(self, source_name: str | None, device: str | None) -> str | None:
        text = device[device.find(">") + 1 :] if device else ""  # without <<HKDevice: 0x...>
        key = (source_name, text)
        if key not in self.devices:
            self.devices[key] = device_label(source_name, text)
        return self.devices[key]

    def ready(self) -> list[Chunk]:
        done, self.done = self.done, []
        return done

    def _slice(self) -> None:
        """The rows so far into Arrow, where they take a fraction of the memory."""
        self.slices.append(samples_from(self.rows, self.patient, self.origin))
        self.sliced += len(self.rows)
        self.rows, self.same, self.devices = [], {}, {}

    def flush(self) -> Chunk:
        if self.rows or not self.slices:
            self._slice()
        samples, problems = (pa.concat_tables(tables) for tables in zip(*self.slices, strict=True))
        stats = Counter({f"unmapped {kind}": n for kind, n in self.unmapped.items()})
        self.slices, self.sliced, self.unmapped = [], 0, Counter()
        return samples, problems, stats

    def last(self, broken: tuple[int, str] | None) -> Chunk:
        """The rest, and the break as a problem if the file broke off."""
        samples, problems, stats = self.flush()
        if broken is None:
            return samples, problems, stats
        line, reason = broken
        log.warning("%s %s", self.origin, reason)
        reason += "; the samples before it are kept: export again from the Health app to get the rest"
        problem = pa.table(
            {"file": [self.origin], "line_no": [line], "reason": [f"{self.origin} {reason}"], "raw": [""]},
            schema=PROBLEM_SCHEMA,
        )
        return samples, pa.concat_tables([problems, problem]), stats


def device_label(source_name: str | None, device: str) -> str | None:
    """What measured: "Apple Watch (Watch2,3)" from the HKDevice text (name, hardware or model),
    else the source app or device's own name."""
    fields = dict(DEVICE_FIELD.findall(device))
    name, hardware = fields.get("name"), fields.get("hardware") or fields.get("model")
    if name and hardware and hardware != name:
        return f"{name} ({hardware})"
    return name or hardware or source_name


def samples_from(
    rows: list[tuple[str | int | None, ...]], patient: str, origin: str
) -> tuple[pa.Table, pa.Table]:
    """Rows of record attributes as samples (SAMPLE_SCHEMA) and the records that cannot be
    read as problems (PROBLEM_SCHEMA), vectorized."""
    types = record_types()
    frame = pl.DataFrame(rows, schema=ROWS, orient="row")
    category = pl.col("type").is_in(list(types.categories))
    by_value = {
        f"{kind}\t{value}": metric
        for kind, values in types.categories.items()
        for value, metric in values.items()
    }
    frame = frame.with_columns(
        start_time=pl.col("start").str.to_datetime(DATE_FORMAT, strict=False, time_unit="us"),
        end_time=pl.col("end").str.to_datetime(DATE_FORMAT, strict=False, time_unit="us"),
        number=pl.col("text").cast(pl.Float64, strict=False),
        molar_mass=pl.col("unit").str.extract(r"^mmol<([0-9.]+)>/L$").cast(pl.Float64, strict=False),
        metric=pl.when(category)
        .then(pl.concat_str("type", pl.lit("\t"), "text").replace_strict(by_value, default=None))
        .otherwise(pl.col("type").replace_strict(types.quantities, default=None)),
    )
    local = (
        pl.col("start").str.slice(0, 19).str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
    )
    minutes = (pl.col("end_time") - pl.col("start_time")).dt.total_microseconds() / 60e6
    fraction = pl.col("type").is_in(list(types.fractions)) & (pl.col("unit") == "%")
    value = (
        pl.when(category)
        .then(minutes)
        .when(pl.col("molar_mass").is_not_null())
        .then(pl.col("number") * pl.col("molar_mass") / 10)
        .when(fraction)
        .then(pl.col("number") * 100)
        .otherwise(pl.col("number"))
    )
    unit = (
        pl.when(category)
        .then(pl.lit("min"))
        .when(pl.col("molar_mass").is_not_null())
        .then(pl.lit("mg/dL"))
        .otherwise(pl.col("unit"))
    )
    reason = (
        pl.when(pl.col("metric").is_null())
        .then(
            pl.format(
                "value {} is not one twinhub maps (see connectors/wearables/apple_health.toml)",
                _shown("text"),
            )
        )
        .when(pl.col("start_time").is_null())
        .then(pl.format("startDate {} is not a date like {}", _shown("start"), pl.lit(DATE_EXAMPLE)))
        .when(pl.col("end_time").is_null())
        .then(pl.format("endDate {} is not a date like {}", _shown("end"), pl.lit(DATE_EXAMPLE)))
        .when(~category & (pl.col("number").is_null() | ~pl.col("number").is_finite()))
        .then(pl.format("value {} is not a number", _shown("text")))
    )
    judged = frame.with_columns(reason=reason)
    samples = judged.filter(pl.col("reason").is_null()).select(
        patient_id=pl.lit(patient),
        device=pl.col("device"),
        metric=pl.col("metric"),
        start_time=pl.col("start_time"),
        end_time=pl.when(pl.col("end") == pl.col("start")).then(None).otherwise(pl.col("end_time")),
        utc_offset_minutes=(local - pl.col("start_time").dt.replace_time_zone(None))
        .dt.total_minutes()
        .cast(pl.Int32),
        value=value,
        unit=unit,
        origin=pl.lit(origin),
    )
    problems = judged.filter(pl.col("reason").is_not_null()).select(
        file=pl.lit(origin),
        line_no=pl.col("line_no"),
        reason=pl.format("{} record at line {}: {}", pl.col("type"), pl.col("line_no"), pl.col("reason")),
        raw=pl.struct(
            type="type",
            sourceName="source_name",
            device="device",
            unit="unit",
            value="text",
            startDate="start",
            endDate="end",
        ).struct.json_encode(),
    )
    return samples.to_arrow().cast(SAMPLE_SCHEMA), problems.to_arrow().cast(PROBLEM_SCHEMA)


def _shown(column: str) -> pl.Expr:
    """An attribute quoted as written, or (none) if the record lacks it."""
    return pl.format("'{}'", pl.col(column)).fill_null("(none)")


def _batch(chunk: Chunk, progress: dict[str, Any]) -> Batch:
    samples, problems, stats = chunk
    return Batch(
        records=RECORD_SCHEMA.empty_table(),
        watermark={"files": dict(progress)},
        samples=samples,
        problems=problems,
        stats=stats,
    )


KIND = SourceKind(
    kind="apple-health",
    modality="wearables",
    summary="Apple Health exports (export.zip or export.xml), one person each",
    config=AppleHealthSource,
    build=lambda source, context: AppleHealthConnector(source),
    records="samples",
    describe=describe_files,
)
