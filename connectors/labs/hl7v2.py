"""HL7 v2 messages in files: one or many per file, CR, LF or CRLF segment ends, an optional BOM
and MLLP framing. Each message becomes one record (its segments joined by CR), numbered by its
place in the file; `harmonize.labs.hl7v2` maps them to FHIR.

Files are read as a stream, message by message (`connectors.labs.hl7v2_reader`), so a file of
any size takes little memory, and damage in a file costs only what is damaged: a message cut
short, text between messages that is no HL7, bytes that are not the message's character set or a
segment over the size limit is a problem row naming the file, message and line; every other
message of the file (and every other file) lands.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from connectors._files import FileConnector, describe_files, fingerprint
from connectors.base import Batch, Watermark, Window, problems_from, records_from
from connectors.kinds import MappingFile, SourceConfig, SourceKind
from connectors.labs.hl7v2_reader import read_messages
from connectors.labs.mllp import MllpListener

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
        """The messages of every file not landed whole yet (a changed file is read again). A
        file counts as read once its last message is in a batch; a crash before that reads it
        again, and the store lands what it already has once."""
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = dict(known)
        records: list[tuple[str, int, str]] = []
        problems: list[tuple[str, int, str, str]] = []
        for path in self.files():
            now = fingerprint(path)
            if known.get(str(path)) == now:
                continue
            self.stats["files"] += 1
            for message in read_messages(path):
                if message.problem is None:
                    records.append((str(path), message.number, message.text))
                    self.stats["messages"] += 1  # the run counts the resources they map to
                else:
                    problems.append((str(path), message.number, message.problem, message.text))
                if len(records) + len(problems) >= self.source.batch_messages:
                    yield _batch(records, problems, progress)
                    records, problems = [], []
            progress[str(path)] = now
        yield _batch(records, problems, progress)


def split_messages(path: Path) -> list[str]:
    """The text of every message in a file (and of what is damaged), in order."""
    return [message.text for message in read_messages(path)]


def _batch(
    records: list[tuple[str, int, str]], problems: list[tuple[str, int, str, str]], progress: dict[str, Any]
) -> Batch:
    return Batch(
        records=records_from(records), problems=problems_from(problems), watermark={"files": dict(progress)}
    )


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
