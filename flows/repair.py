"""Repairs an operator makes by hand: read a source's quarantined lines again once the cause is
fixed (`twinhub quarantine replay`), and forget where a source got so that its next sync reads
everything again (`twinhub reset`). Quick and interactive, so not Prefect flows; each is a run
in the store's bookkeeping all the same (flow `replay` or `reset`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import RECORD_SCHEMA, Batch
from connectors.errors import StoreError, TwinhubError
from connectors.kinds import RecordFormat, kind_names, source_kind
from flows.config import Settings, mapping_files
from harmonize.formats import Harmonize, harmonizer
from twin_store import RunReport, TwinStore, prepare

REPLAYABLE: tuple[RecordFormat, ...] = ("fhir", "lab-rows", "hl7v2")
"""Record formats whose quarantined lines are whole records that can be read alone: a FHIR
resource, a lab row, an HL7 v2 message. A VCF record needs its file's header around it, and a
wearable sample the file or API answer it came in: fix those and sync again."""
MADE = '{"resourceType":'
"""How a resource a mapping made starts (compact JSON): a lab row or a message that mapped,
but whose resource failed the checks, was quarantined as that resource and is checked again as
it is."""
REPLAY_BATCH = 10_000


@dataclass(frozen=True, kw_only=True)
class Replayed:
    """What a replay did: its run (None when nothing was quarantined), how many quarantined
    lines it read again, and how many of them stay quarantined."""

    run: RunReport | None
    lines: int
    stay: int


def replay(settings: Settings, name: str) -> Replayed:
    """Read the quarantined lines of source `name` again, through its harmonizer (with the
    mapping files as they are now) and the checks: what passes lands (or waits for its patient)
    and leaves quarantine, what does not stays with its reason as it is now."""
    source = settings.source(name)
    records = source_kind(source.kind).records
    if records not in REPLAYABLE:
        raise TwinhubError(
            f"source {name!r} is of kind {source.kind!r}, whose quarantined {records} records cannot be "
            f"read again alone; fix the source and sync again (replay works for kinds: {replayable_kinds()})"
        )
    harmonize = harmonizer(records, source, mapping_files(source))
    with _store(settings) as store:
        lines = store.quarantined(source.name)
        if not len(lines):
            return Replayed(run=None, lines=0, stay=0)
        run, started = store.begin_run(source.name, "replay"), time.perf_counter()
        try:
            for start in range(0, len(lines), REPLAY_BATCH):
                chunk = lines.slice(start, REPLAY_BATCH)
                store.land(run, prepare(_batch(harmonize, records, chunk)), replayed=chunk)
        except BaseException as e:
            store.finish_run(run, "failed", error=f"{type(e).__name__}: {e}")
            raise
        run.seconds = time.perf_counter() - started
        store.finish_run(run, "succeeded")
        read, left = _positions(lines), _positions(store.quarantined(source.name))
    return Replayed(run=run, lines=len(read), stay=len(read & left))


def reset(settings: Settings, name: str) -> RunReport:
    """Forget where source `name` got, and its downloads of an export in progress (`landing/`),
    so its next sync reads everything again. Landed rows, quarantine and what waits for its
    patient stay: read again, unchanged data counts as unchanged."""
    source = settings.source(name)
    with _store(settings) as store:
        run = store.forget(source.name)
    landing = settings.store.path / "landing" / source.name
    if landing.is_dir():
        shutil.rmtree(landing)
        run.stats["download folders removed"] += 1
    return run


def replayable_kinds() -> str:
    """The installed kinds whose quarantined lines can be replayed, by name."""
    found = []
    for kind in kind_names():
        try:
            if source_kind(kind).records in REPLAYABLE:
                found.append(kind)
        except TwinhubError:  # a broken plugin is named by the commands that use it
            continue
    return ", ".join(found)


def _store(settings: Settings) -> TwinStore:
    if not (settings.store.path / "catalog.sqlite").exists():
        raise StoreError(f"no twin store at {str(settings.store.path)!r}; run `twinhub sync SOURCE` first")
    return TwinStore(settings.store.path)


def _batch(harmonize: Harmonize, records: RecordFormat, lines: pa.Table) -> Batch:
    """The quarantined lines as a batch to land: as they are for FHIR sources; else through the
    harmonizer, except what a mapping made (and lines that were not valid UTF-8: the checks
    quarantine them again), which only the checks see again."""
    raw = lines.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    if records == "fhir":
        return Batch(records=raw, watermark={})
    as_is = pc.or_(pc.starts_with(raw["raw"], MADE), raw["bad_utf8"])
    (mapped,) = harmonize(iter([Batch(records=raw.filter(pc.invert(as_is)), watermark={})]))
    return replace(mapped, records=pa.concat_tables([mapped.records, raw.filter(as_is)]))


def _positions(lines: pa.Table) -> set[tuple[str, int]]:
    return set(zip(lines["file"].to_pylist(), lines["line_no"].to_pylist(), strict=True))
