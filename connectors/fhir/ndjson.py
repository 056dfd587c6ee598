"""FHIR Bulk Data NDJSON files (plain or gzip), streamed in bounded memory.

The watermark records, per file, its size and mtime and how many lines have landed, so an
unchanged file is skipped and a file cut short by a crash resumes at its next line. A damaged
file lands up to its damage, which is quarantined (`connectors._lines`), and counts as read: a
replaced file (new size or mtime) is read again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from connectors._files import FileConnector, describe_files, resume_point
from connectors._lines import FileLines, Problem, unreadable
from connectors.base import RECORD_SCHEMA, Batch, Watermark, Window, problems_from
from connectors.kinds import SourceConfig, SourceKind

READ_HINT = 4 << 20
FIRST_BATCH = 4 << 20


class FhirNdjsonSource(SourceConfig):
    """Config of a `fhir-ndjson` source: a file, a folder of files or a glob."""

    kind: Literal["fhir-ndjson"]
    path: Path
    batch_mb: int = Field(default=32, ge=1, le=1024)
    max_line_mb: int = Field(default=64, ge=1, le=2048)
    """A line (one resource) over this many MB is quarantined (its first 64 KiB kept) without
    being held whole in memory."""


class FhirNdjsonConnector(FileConnector[FhirNdjsonSource]):
    suffixes = (".ndjson", ".ndjson.gz")

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Files are read whole whatever the window; the store keeps what falls in it."""
        files = self.files()
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = {str(f): known[str(f)] for f in files if str(f) in known}
        # Start small and double up to batch_mb, so the first rows land (and the pipeline fills)
        # quickly; later batches are large so per-commit costs stay small.
        limit = min(FIRST_BATCH, self.source.batch_mb << 20)
        chunks: list[pa.Table] = []
        size = 0
        changed = False
        problems: list[Problem] = []
        for path in files:
            try:
                done = resume_point(progress, path, "lines")
            except OSError as e:  # it vanished since it was listed: the next sync looks again
                problems.append(unreadable(path, e))
                continue
            if done is None:
                continue
            changed = True
            self.stats["files"] += 1
            lines_of = FileLines(path, max_line=self.source.max_line_mb << 20, option="max_line_mb")
            for first_line, lines, problem in lines_of.chunks(skip=done, hint=min(READ_HINT, limit)):
                chunks.append(records_table(str(path), first_line, lines))
                size += sum(map(len, lines))
                if problem is not None:
                    problems.append(problem)
                    size += len(problem[3])
                progress[str(path)]["lines"] = first_line - 1 + len(lines) + (problem is not None)
                if size >= limit:
                    yield _batch(chunks, progress, problems)
                    limit = min(2 * limit, self.source.batch_mb << 20)
                    chunks, size, changed, problems = [], 0, False, []
            if not lines_of.opened:  # unreadable: read it again next time
                progress.pop(str(path))
                if str(path) in known:
                    progress[str(path)] = known[str(path)]
            else:  # whole, or damaged: landed as far as it can be; a replaced file is read again
                progress[str(path)]["complete"] = True
            changed = True
        if chunks or changed or problems:
            yield _batch(chunks, progress, problems)


def line_chunks(fh: IO[bytes], skip: int, hint: int) -> Iterator[tuple[int, list[bytes]]]:
    """(1-based number of the first line, lines) in chunks of a few MB, after `skip` lines."""
    line_no = 1
    while lines := fh.readlines(hint):
        if line_no + len(lines) <= skip + 1:
            line_no += len(lines)
            continue
        if line_no <= skip:
            lines = lines[skip + 1 - line_no :]
            line_no = skip + 1
        yield line_no, lines
        line_no += len(lines)


def records_table(file: str, first_line: int, lines: list[bytes]) -> pa.Table:
    """Lines as records, numbered from `first_line`; trailing CR/LF trimmed."""
    n = len(lines)
    raw, bad = _decode(lines)
    return pa.table(
        [
            pa.array([file] * n, pa.string()),
            pa.array(range(first_line, first_line + n), pa.int64()),
            pc.ascii_rtrim(raw, characters="\r\n"),
            bad,
        ],
        schema=RECORD_SCHEMA,
    )


def _decode(lines: list[bytes]) -> tuple[pa.Array, pa.Array]:
    """Lines as UTF-8 text; an undecodable line is kept (escaped) and flagged, never dropped."""
    try:
        return pa.array(lines, pa.binary()).cast(pa.string()), pa.repeat(False, len(lines))
    except pa.ArrowInvalid:
        texts, flags = [], []
        for line in lines:
            try:
                texts.append(line.decode())
                flags.append(False)
            except UnicodeDecodeError:
                texts.append(line.decode(errors="backslashreplace"))
                flags.append(True)
        return pa.array(texts, pa.string()), pa.array(flags, pa.bool_())


def _batch(chunks: list[pa.Table], progress: dict[str, Any], problems: list[Problem]) -> Batch:
    records = pa.concat_tables(chunks) if chunks else RECORD_SCHEMA.empty_table()
    snapshot = {path: dict(state) for path, state in progress.items()}
    return Batch(records=records, watermark={"files": snapshot}, problems=problems_from(problems))


KIND = SourceKind(
    kind="fhir-ndjson",
    modality="ehr",
    summary="FHIR Bulk Data NDJSON files (plain or gzip): one file, a folder of them or a glob",
    config=FhirNdjsonSource,
    build=lambda source, context: FhirNdjsonConnector(source),
    records="fhir",
    describe=describe_files,
)
