"""Runs and watermarks.

`ingest_batch` (in the DuckLake, append-only: one row per committed batch with its counts and the
source's watermark after it) commits with the batch it describes; `sync_state` is a view over it.
The run records (one row per run: when it started and ended, how, and the snapshot it ended at)
live beside the catalog in `runs.sqlite`, outside the DuckLake: a run that lands nothing then
makes no snapshot, and the store's history holds only changes. `connect` shows them as the views
`run_record` and `ingest_run` (a run's record with the counts of its committed batches).
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
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
    started_snapshot_id: int | None = None
    """The store's snapshot when the run began: `snapshot_id` is the same if it landed nothing."""
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


RUNS_FILE = "runs.sqlite"
RUN_RECORD_SQL = """CREATE TABLE IF NOT EXISTS run_record (
    run_id TEXT PRIMARY KEY, source TEXT, flow TEXT, started_at TEXT, finished_at TEXT, status TEXT,
    snapshot_id INTEGER, error TEXT
)"""


@contextlib.contextmanager
def run_log(root: Path) -> Iterator[sqlite3.Connection]:
    """The run records' database, in one transaction (created on first use; WAL, like the
    catalog, so readers never block the writer)."""
    db = sqlite3.connect(root / RUNS_FILE, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.execute(RUN_RECORD_SQL)
            yield db
    finally:
        db.close()


def begin(root: Path, run: RunReport) -> None:
    """Record the run as running; runs left 'running' by a crash are marked 'interrupted' first."""
    with run_log(root) as db:
        db.execute(
            "UPDATE run_record SET status = 'interrupted', finished_at = ? WHERE status = 'running'",
            [_now()],
        )
        db.execute(
            "INSERT INTO run_record (run_id, source, flow, started_at, status) "
            "VALUES (?, ?, ?, ?, 'running')",
            [run.run_id, run.source, run.flow, _now()],
        )


def failed_to_start(root: Path, source: str, flow: FlowKind, error: str) -> None:
    """Record a run that failed before it began (its source could not be read), so `status` and
    monitoring see the failure, not the last run that worked. Only in a store that exists."""
    if not (root / RUNS_FILE).exists():
        return
    now = _now()
    with run_log(root) as db:
        db.execute(
            "INSERT INTO run_record (run_id, source, flow, started_at, finished_at, status, error) "
            "VALUES (?, ?, ?, ?, ?, 'failed', ?)",
            [new_run_id(), source, flow, now, now, error],
        )


def finish(root: Path, run: RunReport) -> None:
    with run_log(root) as db:
        db.execute(
            "UPDATE run_record SET status = ?, finished_at = ?, snapshot_id = ?, error = ? WHERE run_id = ?",
            [run.status, _now(), run.snapshot_id, run.error, run.run_id],
        )


def keep(root: Path, rows: list[tuple[object, ...]]) -> None:
    """Run records an earlier twinhub kept in the DuckLake, moved here (a row already here stays)."""
    with run_log(root) as db:
        db.executemany(
            "INSERT OR IGNORE INTO run_record VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [tuple(str(v) if isinstance(v, datetime) else v for v in row) for row in rows],
        )


def _now() -> str:
    return str(datetime.now(UTC))


def watermark(con: duckdb.DuckDBPyConnection, source: str) -> Watermark | None:
    """Where the source's last committed batch left it."""
    row = con.execute("SELECT watermark FROM twin.sync_state WHERE source = ?", [source]).fetchone()
    return orjson.loads(row[0]) if row else None


def lines_landed(con: duckdb.DuckDBPyConnection, run_id: str) -> int:
    row = con.execute(
        "SELECT coalesce(sum(lines_read), 0) FROM twin.ingest_batch WHERE run_id = ?", [run_id]
    ).fetchone()
    return int(row[0]) if row else 0


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
