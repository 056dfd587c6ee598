"""What can be computed about a batch before the writer takes it, purely, so it can run in a
worker thread while the writer lands the batch before."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import duckdb
import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import DELETION_SCHEMA, PROBLEM_SCHEMA, RECORD_SCHEMA, Batch, Watermark
from harmonize.fhir_checks import Checked, check_resources
from harmonize.wearables.metrics import normalize_samples
from twin_store.wearables import SampleSummary, summarize

LINK_SCHEMA = pa.schema([("pos", pa.int64()), ("system", pa.string()), ("value", pa.string())])
"""Resources (by position in the batch) whose subject names its patient by identifier only."""
BY_IDENTIFIER = '"subject":{"identifier":'
"""How the lab and genomic mappings write a subject known by identifier (compact JSON, first key)."""


@dataclass(frozen=True, kw_only=True)
class PreparedBatch:
    """A checked batch, ready for the writer."""

    checked: Checked
    deletions: pa.Table = field(default_factory=DELETION_SCHEMA.empty_table)
    variants: pa.Table | None = None
    samples: pa.Table | None = None
    """Wearable samples normalized (harmonize.wearables.metrics.NORMALIZED_SCHEMA), one per key."""
    sample_summary: SampleSummary | None = None
    reported: pa.Table | None = None
    """The vendor's figures for days, normalized as the samples are, one per day."""
    links: pa.Table = field(default_factory=LINK_SCHEMA.empty_table)
    warnings: pa.Table = field(default_factory=PROBLEM_SCHEMA.empty_table)
    lines_read: int
    superseded: int
    watermark: Watermark


@functools.cache
def _none(clinical_dates: bool) -> Checked:
    """The checks of no records (a batch of variant calls or samples only), the same each time:
    made once, as running the checks' queries on nothing costs ~25 ms a batch."""
    return check_resources(RECORD_SCHEMA.empty_table(), clinical_dates=clinical_dates)


def prepare(batch: Batch, *, backfill: bool = False) -> PreparedBatch:
    """Structural checks (a backfill also needs clinical dates to window on), and of
    several copies of one resource in the batch only the newest is kept."""
    checked = (
        check_resources(batch.records, clinical_dates=backfill) if len(batch.records) else _none(backfill)
    )
    latest = _latest_copies(checked.resources)
    problems = [checked.problems.cast(PROBLEM_SCHEMA), batch.problems.cast(PROBLEM_SCHEMA)]
    samples, summary, superseded = None, None, len(checked.resources) - len(latest)
    if batch.samples is not None:
        normalized, bad = normalize_samples(batch.samples)
        samples = _latest_samples(normalized)
        summary = summarize(samples)
        problems.append(bad)
        superseded += len(normalized) - len(samples)
    reported = None
    if batch.reported is not None and len(batch.reported):
        normalized, bad = normalize_samples(batch.reported)
        reported = _latest_samples(normalized)
        problems.append(bad)
        superseded += len(normalized) - len(reported)
    return PreparedBatch(
        checked=Checked(resources=latest, problems=pa.concat_tables(problems)),
        lines_read=len(batch),
        superseded=superseded,
        deletions=batch.deletions,
        variants=batch.variants,
        samples=samples,
        sample_summary=summary,
        reported=reported,
        links=_links(latest),
        warnings=batch.warnings,
        watermark=batch.watermark,
    )


def _links(resources: pa.Table) -> pa.Table:
    """The patient identifier of each resource that must be linked to the twin's Patient."""
    if not _may_contain(resources["resource"], BY_IDENTIFIER.encode()):
        return LINK_SCHEMA.empty_table()  # the usual case: one fast scan instead of one per row
    named = pc.match_substring(resources["resource"], BY_IDENTIFIER)
    positions = pc.indices_nonzero(named)
    rows = []
    for pos, text in zip(
        positions.to_pylist(), resources["resource"].take(positions).to_pylist(), strict=True
    ):
        # Only the top-level subject, named by identifier alone, written once in the text (the
        # store rewrites that text in place; a contained resource's subject is left as it is).
        subject = orjson.loads(text).get("subject")
        by_identifier = isinstance(subject, dict) and set(subject) == {"identifier"}
        if by_identifier and isinstance(subject["identifier"], dict) and text.count(BY_IDENTIFIER) == 1:
            rows.append({"pos": pos, **{k: subject["identifier"].get(k) for k in ("system", "value")}})
    return pa.Table.from_pylist(rows, LINK_SCHEMA)


def _may_contain(text: pa.ChunkedArray, needle: bytes, step: int = 1 << 20) -> bool:
    """Whether some value may contain `needle`: a memchr-speed scan of the data buffers, a
    megabyte at a time (a sliced chunk's buffer may hold bytes beyond the slice: then a false yes)."""
    for chunk in text.chunks:
        data = chunk.buffers()[2]
        view = memoryview(data) if data is not None else memoryview(b"")
        for start in range(0, len(view), step):
            if bytes(view[start : start + step + len(needle) - 1]).find(needle) >= 0:
                return True
    return False


def _latest_copies(resources: pa.Table) -> pa.Table:
    """Newest copy per (resource_type, id): latest meta.lastUpdated, then the last line."""
    if pc.count_distinct(resources["id"]).as_py() == len(resources):
        return resources  # the usual case, no sort needed
    with duckdb.connect(config={"threads": 1}) as con:
        con.register("resources", resources.append_column("pos", pa.array(range(len(resources)))))
        keep = con.sql(
            """SELECT pos FROM resources
            QUALIFY row_number() OVER (PARTITION BY resource_type, id
                ORDER BY last_updated DESC NULLS LAST, file DESC, line_no DESC) = 1
            ORDER BY pos"""
        ).to_arrow_table()
    return resources.take(keep["pos"])


def _latest_samples(samples: pa.Table) -> pa.Table:
    """One sample per (patient, metric, start): the last one read wins."""
    one_series = all(pc.count_distinct(samples[c]).as_py() == 1 for c in ("patient_id", "metric"))
    if one_series and bool((np.diff(samples["start_time"].to_numpy().astype("int64")) > 0).all()):
        return samples  # the usual batch, one series in time order: nothing to drop, no copy
    frame = pl.from_arrow(samples)
    assert isinstance(frame, pl.DataFrame)
    key = ["patient_id", "metric", "start_time"]
    if frame.select(pl.struct(key).n_unique()).item() == len(frame):
        return samples
    return frame.unique(subset=key, keep="last", maintain_order=True).to_arrow().cast(samples.schema)
