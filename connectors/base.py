"""The seam every connector plugs into: pull raw records, in batches, since a watermark."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import pyarrow as pa

Watermark = dict[str, Any]
"""How far a source has landed. JSON-serializable; only the connector that wrote it reads it."""

RECORD_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line_no", pa.int64(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("bad_utf8", pa.bool_(), nullable=False),
    ]
)
"""Raw records as pulled: where each came from (file, 1-based line) and its text."""

DELETION_SCHEMA = pa.schema(
    [
        pa.field("resource_type", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("deleted_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
    ]
)
"""Resources the source reports deleted, when, and where it said so (a history URL, a file)."""


SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("device", pa.string()),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("start_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("end_time", pa.timestamp("us", tz="UTC")),
        pa.field("utc_offset_minutes", pa.int32()),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("unit", pa.string()),
        pa.field("origin", pa.string()),
    ]
)
"""Wearable samples as a connector reads them, one row each, columnar (millions per pull): the
twin's Patient id, the device that measured, a metric named as in `harmonize/wearables/wearable_metrics.toml`
(heart_rate, steps, ...), when (the local clock's UTC offset kept for daily rollups), the value
in the unit the vendor sent, and where it came from (a file, an API path; never a secret)."""


PROBLEM_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("line_no", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
    ]
)
"""Records that cannot land, with the reason: they go to quarantine, never away."""


def records_from(rows: list[tuple[str, int, str]]) -> pa.Table:
    """(file, line or message number, text) rows as records."""
    files, numbers, texts = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table(
        [
            pa.array(files, pa.string()),
            pa.array(numbers, pa.int64()),
            pa.array(texts, pa.string()),
            pa.repeat(False, len(rows)),
        ],
        schema=RECORD_SCHEMA,
    )


def problems_from(rows: list[tuple[str, int, str, str]]) -> pa.Table:
    """(file, line or message number, reason, text) rows as problems."""
    return pa.Table.from_pylist(
        [dict(zip(PROBLEM_SCHEMA.names, r, strict=True)) for r in rows], PROBLEM_SCHEMA
    )


@dataclass(frozen=True, kw_only=True)
class Window:
    """A backfill window on meta.lastUpdated (or the clinical date where that is absent).

    `step` splits it for sources that query by time (FHIR search walks one step at a time)."""

    since: datetime
    until: datetime
    step: timedelta | None = None


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Raw records plus the watermark that holds once they (and all before them) have landed."""

    records: pa.Table
    watermark: Watermark
    deletions: pa.Table = field(default_factory=DELETION_SCHEMA.empty_table)
    problems: pa.Table = field(default_factory=PROBLEM_SCHEMA.empty_table)
    """Records already found bad before the structural checks (e.g. a lab row that cannot map)."""
    variants: pa.Table | None = None
    """Rows for the columnar `genomic_variant` table (VCF sources; see `connectors.genomics.vcf`)."""
    samples: pa.Table | None = None
    """Wearable samples (SAMPLE_SCHEMA) for the columnar `wearable_sample` table."""
    reported: pa.Table | None = None
    """The vendor's own figure for a day whose samples land at a finer grain (SAMPLE_SCHEMA, one
    day-long row each: Fitabase's dailyActivity beside its hourly steps). Kept beside the samples
    in `wearable_reported`, and the day's value where there is one: a device's daily total may
    count what its intraday data misses."""
    stats: Counter[str] = field(default_factory=Counter)
    """What mapping the records noted, for the run's summary (e.g. lab codes left unmapped)."""
    warnings: pa.Table = field(default_factory=PROBLEM_SCHEMA.empty_table)
    """Spec violations in records that still land (a VCF record's bad INFO value): kept beside
    the data, in `ingest_warning`, never instead of it."""

    def __len__(self) -> int:
        variants = self.variants.num_rows if self.variants is not None else 0
        samples = sum(t.num_rows for t in (self.samples, self.reported) if t is not None)
        return int(self.records.num_rows + self.problems.num_rows + variants + samples)


class Connector(Protocol):
    """A source of raw records. Flows know nothing else about a connector."""

    name: str
    stats: Counter[str]
    """What the connector did, for the run's summary: files, pages, retries, exports."""

    def check(self) -> None:
        """Fail fast with a `SourceError` naming the fix when the source cannot be read."""
        ...

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        """Yield batches of records not yet landed after `since` (None: everything).

        With a `window` (a backfill) a source that can ask for a time range does; the store
        keeps only what falls in the window either way."""
        ...
