"""What can be computed about a batch before the writer takes it, in two pure steps, so each
can run in its own worker thread while the writer lands the batch before."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pyarrow as pa

from connectors.base import Batch, Watermark
from harmonize.fhir_checks import Checked, check_resources
from twin_store.flat import derive_flat_rows


@dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """A checked batch and, once derived, the flat rows of every resource in it."""

    checked: Checked
    flat_rows: dict[str, pa.Table] = field(default_factory=dict)
    lines_read: int
    watermark: Watermark


def check_batch(batch: Batch, *, backfill: bool = False) -> PreparedBatch:
    """Step 1: structural checks (a backfill also needs clinical dates to window on)."""
    checked = check_resources(batch.records, clinical_dates=backfill)
    return PreparedBatch(checked=checked, lines_read=len(batch), watermark=batch.watermark)


def derive_batch(batch: PreparedBatch) -> PreparedBatch:
    """Step 2: the flat rows of every resource that passed."""
    return replace(batch, flat_rows=derive_flat_rows(batch.checked.resources))


def prepare(batch: Batch, *, backfill: bool = False) -> PreparedBatch:
    return derive_batch(check_batch(batch, backfill=backfill))
