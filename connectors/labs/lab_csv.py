"""Lab results exported as CSV: one row per result, columns named in the source's config.

The connector only reads: each row becomes a record holding the row as a JSON object (header ->
text), numbered by its line in the file; `harmonize.labs.rows` turns rows into Observations.
Files are read once each; a file that changed (size or mtime) is read again from its first row,
and a file cut short by a crash resumes after its last landed row. A row that is not valid CSV
(a bad quote, a field over 131,072 characters), is ragged or not UTF-8 is quarantined with its
line, and a damaged file lands up to its damage: one bad row or file never holds up the rest.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from connectors._files import FileConnector, describe_files, resume_point
from connectors._lines import RAW_KEPT, FileLines, Problem, unreadable
from connectors.base import Batch, Watermark, Window, problems_from, records_from
from connectors.errors import SourceError
from connectors.kinds import MappingFile, SourceConfig, SourceKind
from connectors.labs.hl7v2 import CONCEPT_MAP

MAX_LINE = 16 << 20
"""A CSV line over this many bytes is quarantined unread (a field over csv's 131,072 characters
already is)."""


class LabCsvColumns(BaseModel):
    """Which CSV column holds each part of a result (None: the file has none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient: str
    """The patient the result is about: the FHIR Patient id, or with the source's
    `patient_system` an identifier (e.g. an MRN) in that system."""
    code: str
    time: str
    """When the specimen was taken or the result observed (FHIR dateTime, time zone kept)."""
    value: str | None = None
    """A number becomes valueQuantity; other text valueString."""
    unit: str | None = None
    ucum: str | None = None
    """The unit as a UCUM code (e.g. mg/dL), when the file has one."""
    id: str | None = None
    """The result's id in the source system: kept as an identifier, and the key for updates."""
    display: str | None = None
    code_system: str | None = None
    encounter: str | None = None
    issued: str | None = None
    status: str | None = None
    value_code: str | None = None
    value_code_system: str | None = None
    value_code_display: str | None = None
    reference_low: str | None = None
    reference_high: str | None = None
    interpretation: str | None = None
    """An HL7 v3 ObservationInterpretation code (H, L, N, A, ...)."""


class LabCsvSource(SourceConfig):
    """Config of a `lab-csv` source: a CSV file (plain or gzip), a folder of them or a glob."""

    kind: Literal["lab-csv"]
    path: Path
    columns: LabCsvColumns
    code_system: str = "http://loinc.org"
    """The system of codes whose row names none (columns.code_system)."""
    patient_system: str | None = None
    """The identifier system of the patient column (e.g. the hospital's MRN system). Results
    then link to the twin's Patient with that identifier, and wait for it if it is not there."""
    concept_map: Path | None = None
    """A FHIR ConceptMap (JSON) from the source's local codes to LOINC; read when a sync starts."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    batch_rows: int = Field(default=50_000, ge=1)

    def mapping_files(self) -> dict[str, MappingFile]:
        return {"concept_map": MappingFile(self.concept_map, CONCEPT_MAP)} if self.concept_map else {}


class LabCsvConnector(FileConnector[LabCsvSource]):
    suffixes = (".csv", ".csv.gz")

    def check(self) -> None:
        """A file whose header lacks a configured column fails here, before anything lands; a
        damaged file does not (its sync quarantines the damage and lands the rest)."""
        for path in self.files():
            header, _ = self._header(path)
            if header is not None and (missing := self._missing(header)):
                raise SourceError(self.name, f"{str(path)!r} {missing}")

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Every row not yet landed; the store windows a backfill on the results' times. A row
        that is not valid CSV, not UTF-8 or ragged is quarantined, and a damaged file lands up
        to its damage (a replaced file is read again)."""
        files = self.files()
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = {str(f): known[str(f)] for f in files if str(f) in known}
        rows: list[tuple[str, int, str]] = []
        problems: list[Problem] = []
        for path in files:
            try:
                done = resume_point(progress, path, "rows")
            except OSError as e:  # it vanished since it was listed: the next sync looks again
                problems.append(unreadable(path, e))
                continue
            if done is None:
                continue
            self.stats["files"] += 1
            reader = _CsvFile(path, self.source.delimiter)
            for n, (line_no, row, problem) in enumerate(reader.rows(self._missing), start=1):
                if n <= done:
                    continue
                if problem is not None:
                    problems.append(problem)
                else:
                    rows.append((str(path), line_no, orjson.dumps(row).decode()))
                progress[str(path)]["rows"] = n
                if len(rows) + len(problems) >= self.source.batch_rows:
                    yield _batch(rows, progress, problems)
                    rows, problems = [], []
            if reader.read:
                progress[str(path)]["complete"] = True
            else:  # unreadable, or its header does not fit: read it again next time
                progress.pop(str(path))
                if str(path) in known:
                    progress[str(path)] = known[str(path)]
        yield _batch(rows, progress, problems)

    def _header(self, path: Path) -> tuple[list[str] | None, str]:
        """The file's header and its text (None when the file cannot be read as text)."""
        reader = _CsvFile(path, self.source.delimiter)
        return reader.header(), reader.header_raw

    def _missing(self, header: list[str]) -> str | None:
        """What the header lacks of the configured columns, in words with the fix."""
        wanted = {k: v for k, v in self.source.columns.model_dump().items() if v is not None}
        if missing := sorted(f"{key} = {column!r}" for key, column in wanted.items() if column not in header):
            return (
                f"has no column for {', '.join(missing)} (its columns: {', '.join(header) or 'none'}); "
                "fix sources.columns"
            )
        return None


class _CsvFile:
    """One CSV file's rows, each with the number of its first line, or the problem that keeps
    it from landing: every row is one or the other, and damage ends the file as a problem."""

    def __init__(self, path: Path, delimiter: str) -> None:
        self.path = path
        self.delimiter = delimiter
        self.lines = FileLines(path, max_line=MAX_LINE)
        self.fed: list[tuple[int, bytes, bool]] = []
        """The lines of the row being read: number, text, whether it is UTF-8."""
        self.problems: list[Problem] = []
        """Problems of the lines themselves (too long, damage), for `rows` to hand on."""
        self.header_raw = ""
        self.read = False
        """Whether the file was read to its end (or its damage)."""

    def header(self) -> list[str] | None:
        text = self._text()
        line = next(text, None)
        text.close()
        if line is None or not self.fed[-1][2]:
            return None
        self.header_raw = line
        return next(csv.reader([line], delimiter=self.delimiter), [])

    def rows(
        self, missing: Callable[[list[str]], str | None]
    ) -> Iterator[tuple[int, dict[str, str], Problem | None]]:
        text = self._text()
        first = next(text, None)
        if first is None or not self.fed[-1][2]:
            yield from self._flush()
            if first is not None:
                yield 1, {}, self._problem("the header is not UTF-8 text; save the file as UTF-8")
            self.read = self.lines.opened
            return
        header = next(csv.reader([first], delimiter=self.delimiter), [])
        if why := missing(header):
            yield 1, {}, self._problem(f"the file {why}")
            return
        self.fed.clear()
        reader = csv.reader(text, delimiter=self.delimiter, strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield from self._flush()
                problem = self._problem(f"not valid CSV ({e}); fix the row")
                yield problem[1], {}, problem
                continue
            yield from self._flush()
            if not row:  # a blank line is no result
                self.fed.clear()
                continue
            line_no = self.fed[0][0]
            if len(row) != len(header):
                why = f"the row has {len(row)} fields, the header {len(header)}; fix the row"
                yield line_no, {}, self._problem(why)
            elif not all(utf8 for _, _, utf8 in self.fed):
                yield line_no, {}, self._problem("the row is not UTF-8 text; save the file as UTF-8")
            else:
                yield line_no, dict(zip(header, row, strict=True)), None
                self.fed.clear()
        yield from self._flush()
        self.read = True

    def _text(self) -> Generator[str]:
        """The file's lines as text (with their line end, as `csv` wants), noting each in `fed`;
        a line that is not UTF-8 goes on escaped, for its row to be quarantined."""
        bom = True
        for first, lines, problem in self.lines.chunks():
            for line_no, line in enumerate(lines, start=first):
                if bom:
                    line, bom = line.removeprefix(codecs.BOM_UTF8), False
                try:
                    text, utf8 = line.decode(), True
                except UnicodeDecodeError:
                    text, utf8 = line.decode(errors="backslashreplace"), False
                self.fed.append((line_no, line, utf8))
                yield text + "\n"
            if problem is not None:
                self.problems.append(problem)

    def _flush(self) -> Iterator[tuple[int, dict[str, str], Problem | None]]:
        for problem in self.problems:
            yield problem[1], {}, problem
        self.problems.clear()

    def _problem(self, reason: str) -> Problem:
        """The row being read as a problem: its first line and its text (at most 64 KiB)."""
        raw = b"\n".join(line for _, line, _ in self.fed)
        line_no = self.fed[0][0] if self.fed else 1
        self.fed.clear()
        return (str(self.path), line_no, reason, raw[:RAW_KEPT].decode(errors="backslashreplace"))


def _batch(rows: list[tuple[str, int, str]], progress: dict[str, Any], problems: list[Problem]) -> Batch:
    return Batch(
        records=records_from(rows),
        watermark={"files": {p: dict(s) for p, s in progress.items()}},
        problems=problems_from(problems),
    )


KIND = SourceKind(
    kind="lab-csv",
    modality="labs",
    summary="Lab results in CSV files (plain or gzip), columns mapped in the config",
    config=LabCsvSource,
    build=lambda source, context: LabCsvConnector(source),
    records="lab-rows",
    describe=describe_files,
)
