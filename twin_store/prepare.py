"""What can be computed about a batch before the writer takes it. Pure, so it runs in a worker
thread while the previous batch lands."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from connectors.base import Batch, Watermark
from harmonize.fhir_checks import Checked, check_resources
from twin_store.flat import derive_flat_rows


@dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """A checked batch with the flat rows of every resource in it, ready to land."""

    checked: Checked
    flat_rows: dict[str, pa.Table]
    lines_read: int
    watermark: Watermark


def prepare(batch: Batch, *, backfill: bool = False) -> PreparedBatch:
    """Check the batch and derive its flat rows; a backfill also needs clinical dates to window on."""
    checked = check_resources(batch.records, clinical_dates=backfill)
    return PreparedBatch(
        checked=checked,
        flat_rows=derive_flat_rows(checked.resources),
        lines_read=len(batch),
        watermark=batch.watermark,
    )
