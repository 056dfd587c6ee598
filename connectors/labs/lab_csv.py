"""Lab results exported as CSV: one row per result, columns named in the source's config.

The connector only reads: each row becomes a record holding the row as a JSON object (header ->
text), numbered by its line in the file; `harmonize.labs.rows` turns rows into Observations.
Files are read once each; a file that changed (size or mtime) is read again from its first row,
and a file cut short by a crash resumes after its last landed row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from connectors._files import FileConnector, describe_files, open_maybe_gzipped, resume_point
from connectors.base import Batch, Watermark, Window, records_from
from connectors.errors import SourceError
from connectors.kinds import MappingFile, SourceConfig, SourceKind
from connectors.labs.hl7v2 import CONCEPT_MAP


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
        for path in self.files():
            self._header(path)

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Every row not yet landed; the store windows a backfill on the results' times."""
        files = self.files()
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = {str(f): known[str(f)] for f in files if str(f) in known}
        rows: list[tuple[str, int, str]] = []
        for path in files:
            done = resume_point(progress, path, "rows")
            if done is None:
                continue
            self.stats["files"] += 1
            for n, (line_no, row) in enumerate(self._rows(path), start=1):
                if n <= done:
                    continue
                rows.append((str(path), line_no, orjson.dumps(row).decode()))
                progress[str(path)]["rows"] = n
                if len(rows) >= self.source.batch_rows:
                    yield _batch(rows, progress)
                    rows = []
            progress[str(path)]["complete"] = True
        yield _batch(rows, progress)

    def _header(self, path: Path) -> list[str]:
        with open_maybe_gzipped(path) as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="backslashreplace")
            header = next(csv.reader(text, delimiter=self.source.delimiter), [])
        wanted = {k: v for k, v in self.source.columns.model_dump().items() if v is not None}
        if missing := sorted(f"{key} = {column!r}" for key, column in wanted.items() if column not in header):
            raise SourceError(
                self.name,
                f"{str(path)!r} has no column for {', '.join(missing)} (its columns: "
                f"{', '.join(header) or 'none'}); fix sources.columns",
            )
        return header

    def _rows(self, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
        """(line number, row) for each data row; the header is line 1."""
        self._header(path)
        with open_maybe_gzipped(path) as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="backslashreplace", newline="")
            reader = csv.DictReader(text, delimiter=self.source.delimiter)
            for row in reader:
                yield reader.line_num, row


def _batch(rows: list[tuple[str, int, str]], progress: dict[str, Any]) -> Batch:
    return Batch(records=records_from(rows), watermark={"files": {p: dict(s) for p, s in progress.items()}})


KIND = SourceKind(
    kind="lab-csv",
    modality="labs",
    summary="Lab results in CSV files (plain or gzip), columns mapped in the config",
    config=LabCsvSource,
    build=lambda source, context: LabCsvConnector(source),
    records="lab-rows",
    describe=describe_files,
)
