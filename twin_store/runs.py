"""Runs and watermarks: `run_record` (one row per run, updated as it starts and ends) and
`ingest_batch` (append-only: one row per committed batch with its counts and the source's
watermark after it). `sync_state` and `ingest_run` are views over them: appending is cheap in
DuckLake, while every update or delete of a catalog-inlined table costs a round of catalog reads.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import duckdb
import orjson

from connectors.base import Watermark

RunStatus = Literal["running", "succeeded", "failed", "interrupted"]
FlowKind = Literal["sync", "backfill", "refresh", "replay", "reset"]
"""`replay`: quarantined lines read again (`twinhub quarantine replay`); `reset`: a source's
watermark forgotten (`twinhub reset`)."""
COUNTS = (
    "lines_read",
    "inserted",
    "updated",
    "unchanged",
    "superseded",
    "quarantined",
    "out_of_window",
    "held",
    "deleted",
    "released",
    "warnings",
)
"""Per batch and run. Every line read is counted once in the first eight (`held`: waiting for
its patient); `deleted` counts resources the source reported deleted that were removed from the
store, `released` held resources whose patient arrived (read before, they land now and count
in inserted, updated, ... too: lines_read + released = the first eight), `warnings` spec
violations of records that landed (`ingest_warning`)."""
PATIENTS_LISTED = 1000
"""A run's event names at most this many changed patients (and counts them all)."""


@dataclass(kw_only=True)
class RunReport:
    """What one run did: counts, rows changed per table, and the snapshot it ended at."""

    run_id: str
    source: str
    flow: FlowKind
    status: RunStatus = "running"
    counts: Counter[str] = field(default_factory=Counter)
    changed: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    """Resources received per type (that passed the checks)."""
    stats: Counter[str] = field(default_factory=Counter)
    """What the connector reports: pages, files, retries, exports."""
    snapshot_id: int | None = None
    patient_ids: set[str] = field(default_factory=set)
    """The patients whose rows the run changed, gathered as its batches land."""
    patients: list[str] = field(default_factory=list)
    """The patients whose rows the run changed (the first PATIENTS_LISTED; `patients_changed` counts all)."""
    patients_changed: int = 0
    batches: int = 0
    seconds: float = 0.0
    error: str | None = None


def new_run_id() -> str:
    """Sortable by start, unique across processes."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def begin(con: duckdb.DuckDBPyConnection, run: RunReport) -> None:
    """Record the run as running; runs left 'running' by a crash are marked 'interrupted' first
    (in the caller's transaction)."""
    con.execute(
        "UPDATE twin.run_record SET status = 'interrupted', finished_at = now() WHERE status = 'running'"
    )
    con.execute(
        "INSERT INTO twin.run_record (run_id, source, flow, started_at, status) "
        "VALUES (?, ?, ?, now(), 'running')",
        [run.run_id, run.source, run.flow],
    )


def finish(con: duckdb.DuckDBPyConnection, run: RunReport) -> None:
    con.execute(
        "UPDATE twin.run_record SET status = ?, finished_at = now(), snapshot_id = ?, error = ? "
        "WHERE run_id = ?",
        [run.status, run.snapshot_id, run.error, run.run_id],
    )


def watermark(con: duckdb.DuckDBPyConnection, source: str) -> Watermark | None:
    """Where the source's last committed batch left it."""
    row = con.execute("SELECT watermark FROM twin.sync_state WHERE source = ?", [source]).fetchone()
    return orjson.loads(row[0]) if row else None


def record_batch(
    con: duckdb.DuckDBPyConnection, run: RunReport, counts: Counter[str], mark: Watermark | None
) -> None:
    """The batch's counts and the watermark after it (None: a backfill's, which leaves the sync
    watermark alone), in the batch's own transaction."""
    con.execute(
        f"INSERT INTO twin.ingest_batch (run_id, source, batch_no, committed_at, watermark, "
        f"{', '.join(COUNTS)}) VALUES (?, ?, ?, now(), ?{', ?' * len(COUNTS)})",
        [
            run.run_id,
            run.source,
            run.batches,
            None if mark is None else orjson.dumps(mark).decode(),
            *(counts[c] for c in COUNTS),
        ],
    )


def forget_watermark(con: duckdb.DuckDBPyConnection, source: str) -> int:
    """Forget where `source` got, in the caller's transaction: its next sync reads everything.
    The batches' counts stay (the runs' history); returns how many batches carried a watermark."""
    row = con.execute(
        "UPDATE twin.ingest_batch SET watermark = NULL WHERE source = ? AND watermark IS NOT NULL", [source]
    ).fetchone()
    return int(row[0]) if row else 0
