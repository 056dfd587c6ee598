"""Source kinds: what the `kind` of a `[[sources]]` table names, each a plugin found by name.

A kind is a `SourceKind` registered under the entry-point group `twinhub.sources`, as twin models
are under `twinhub.models`: twinhub's own kinds in its pyproject.toml, anyone else's in theirs.
Flows and the CLI know a source only through its kind: its config model, the connector it builds,
the record format it emits (which picks the harmonizer), what `status` says about its watermark,
and optionally how a patient connects an account. Kinds load one at a time, when a config names
them: `twinhub --help` loads none.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from connectors.base import Batch, Connector, Watermark
from connectors.errors import ConfigError, TwinhubError

ENTRY_POINTS = "twinhub.sources"
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
"""What a source may be called: its name starts the keys of its records (`<name>/<id>`) and the
base of references to them from other sources, so it holds no `/`, `.`, space or `:`."""
PATIENT_ID = re.compile(rf"({SOURCE_NAME.pattern}/)?[A-Za-z0-9\-\.]{{1,64}}")
"""What a wearable sample may name as its patient: a FHIR id (R4 datatypes), or the key
`<source>/<id>` of another source's Patient (the Patient of its daily FHIR)."""
Modality = Literal["ehr", "labs", "genomics", "wearables"]
RecordFormat = Literal["fhir", "lab-rows", "hl7v2", "vcf", "samples"]
"""What a connector's batches hold, which decides how they are harmonized: FHIR resources as
they are; lab rows (JSON objects of mapped columns) or HL7 v2 messages, mapped to FHIR; variant
calls, with Genomics Reporting FHIR for the reportable ones; wearable samples, normalized."""


class SourceConfig(BaseModel):
    """What every source's config holds; each kind's config model extends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Names the source everywhere, and its records' keys in the store (`<name>/<id>`)."""
    kind: str
    schedule: str | None = None
    """A cron expression: `twinhub serve` syncs the source on it."""

    @field_validator("name")
    @classmethod
    def _usable_in_keys(cls, name: str) -> str:
        if not SOURCE_NAME.fullmatch(name):
            raise ValueError(
                f"source name {name!r} must be 1-64 of A-Z a-z 0-9 _ - (starting with a letter or "
                "digit): it is part of every key the source's records get"
            )
        return name

    def mapping_files(self) -> dict[str, MappingFile]:
        """Files the source's harmonizer reads (a ConceptMap, a BED file), by their config key."""
        return {}


@dataclass(frozen=True)
class MappingFile:
    """A file a source's harmonizer reads, and what it must be (for the error when it cannot)."""

    path: Path
    about: str


C = TypeVar("C", bound=SourceConfig)


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a connector may need beyond its config."""

    store: Path
    """The store folder: where a kind keeps downloads (`landing/<source>`) and secrets."""
    on_progress: Callable[[str], None] | None = None
    """Where a connector reports news on long work (an export's progress), for the CLI."""


@dataclass(frozen=True, kw_only=True)
class Connected:
    """What connecting an account did: one line to tell, and any warnings."""

    summary: str
    warnings: tuple[str, ...] = ()


class AccountLink(Protocol):
    """How a patient connects their account at a vendor (OAuth): `twinhub wearables connect`."""

    vendor: str
    """The vendor's name as the patient knows it ("Fitbit")."""

    def start(self, patient: str) -> str:
        """Begin connecting `patient`; the address they open. The attempt is kept for `finish`."""
        ...

    def finish(self, patient: str, answer: str) -> Connected:
        """Complete the attempt with the address the vendor sent the browser back to (or its code)."""
        ...


class Listener(Protocol):
    """A live source: takes records as senders push them (`twinhub listen`)."""

    def listen(self, land: Land, *, ready: Callable[[int], None] | None = None) -> None:
        """Hand each batch received to `land`, until SIGINT or SIGTERM; `ready` gets the port."""
        ...


Land = Callable[[Batch], Mapping[int, str]]
"""Lands one batch; returns the reasons of the records that failed, by their number."""


@dataclass(frozen=True, kw_only=True)
class SourceKind(Generic[C]):
    """One kind of source, as registered under the `twinhub.sources` entry points."""

    kind: str
    modality: Modality
    summary: str
    """One line for the table of kinds in the docs."""
    config: type[C]
    build: Callable[[C, Context], Connector]
    records: RecordFormat
    describe: Callable[[Watermark], str]
    """How far the source got, in words, for `twinhub status`."""
    account: Callable[[C, Context], AccountLink] | None = None
    listen: Callable[[C, Context], Listener] | None = None


def kind_names() -> list[str]:
    """Every installed kind, by name, without loading any."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINTS)})


@functools.cache
def source_kind(name: str) -> SourceKind[Any]:
    """The kind registered as `name`, loaded now."""
    found = entry_points(group=ENTRY_POINTS, name=name)
    if not found:
        raise ConfigError("kind", f"unknown kind {name!r}; use one of: {', '.join(kind_names())}")
    entry = next(iter(found))
    try:
        kind = entry.load()
    except Exception as e:
        raise TwinhubError(
            f"source kind {name!r} ({entry.value}) cannot be loaded ({type(e).__name__}: {e}); "
            "reinstall the package that provides it"
        ) from None
    if not isinstance(kind, SourceKind) or kind.kind != name:
        raise TwinhubError(
            f"source kind {name!r} ({entry.value}) is not a SourceKind named {name!r}; fix its entry point"
        )
    return kind
