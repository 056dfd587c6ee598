"""HL7 v2 messages in files: one or many per file, CR, LF or CRLF segment ends, an optional BOM
and MLLP framing. Each message becomes one record (its segments joined by CR), numbered by its
place in the file; `harmonize.labs.hl7v2` maps them to FHIR.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from connectors._files import FileConnector, describe_files, fingerprint, open_maybe_gzipped
from connectors.base import Batch, Watermark, Window, records_from
from connectors.kinds import MappingFile, SourceConfig, SourceKind
from connectors.labs.mllp import MllpListener

SEGMENT_END = re.compile(r"\r\n|\n|\r")
MLLP_FRAMING = str.maketrans("", "", "\x0b\x1c")
SUFFIXES = (".hl7", ".txt", ".hl7.gz")
CONCEPT_MAP = "a FHIR ConceptMap JSON file"


class Hl7v2Source(SourceConfig):
    """Config of an `hl7v2` source: a file of messages, a folder of them or a glob."""

    kind: Literal["hl7v2"]
    path: Path
    timezone: str = "UTC"
    """For times a message sends without an offset (FHIR needs one wherever there is a time)."""
    concept_map: Path | None = None
    """A FHIR ConceptMap (JSON) from the source's local codes to LOINC; read when a sync starts."""
    patient_systems: dict[str, str] = Field(default_factory=dict)
    """PID-3 assigning authority -> the identifier system it stands for (e.g. MRN =
    "http://hospital.example.org/mrn"); others get urn:twinhub:hl7v2:<authority>."""
    create_patients: bool = True
    """Make a Patient from PID. Set false when the twin's patients come from the EHR: results
    then link to the Patient with the PID-3 identifier, and wait for it if it has not arrived."""
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)
    """Where `twinhub listen` takes MLLP connections (0: any free port, printed at start)."""
    batch_messages: int = Field(default=5_000, ge=1)

    def mapping_files(self) -> dict[str, MappingFile]:
        return {"concept_map": MappingFile(self.concept_map, CONCEPT_MAP)} if self.concept_map else {}


class Hl7v2Connector(FileConnector[Hl7v2Source]):
    suffixes = SUFFIXES
    recursive = True

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """The messages of every file not landed whole yet (a changed file is read again)."""
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = dict(known)
        records: list[tuple[str, int, str]] = []
        for path in self.files():
            now = fingerprint(path)
            if known.get(str(path)) == now:
                continue
            self.stats["files"] += 1
            messages = split_messages(path)
            self.stats["messages"] += len(messages)  # the run counts the resources they map to
            records += [(str(path), n, message) for n, message in enumerate(messages, start=1)]
            progress[str(path)] = now
            if len(records) >= self.source.batch_messages:
                yield _batch(records, progress)
                records = []
        yield _batch(records, progress)


def split_messages(path: Path) -> list[str]:
    """The messages in a file, each with CR segment ends; text before the first MSH is kept
    as a message of its own so that it is quarantined, not lost."""
    with open_maybe_gzipped(path) as fh:
        text = fh.read().decode("utf-8-sig", errors="backslashreplace")
    segments = [s for s in SEGMENT_END.split(text.translate(MLLP_FRAMING)) if s.strip()]
    messages: list[list[str]] = []
    for segment in segments:
        if segment.startswith("MSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return ["\r".join(m) for m in messages]


def _batch(records: list[tuple[str, int, str]], progress: dict[str, Any]) -> Batch:
    return Batch(records=records_from(records), watermark={"files": dict(progress)})


KIND = SourceKind(
    kind="hl7v2",
    modality="labs",
    summary="HL7 v2 ORU/OUL lab messages from files, or live over MLLP (`twinhub listen`)",
    config=Hl7v2Source,
    build=lambda source, context: Hl7v2Connector(source),
    records="hl7v2",
    describe=describe_files,
    listen=lambda source, context: MllpListener(source.name, source.host, source.port),
)
