"""The twin store: DuckLake (SQLite catalog + Parquet files) under one folder.

One writer at a time (a file lock), any number of read-only readers in other processes. Every
batch lands in one transaction together with its quarantine rows and an `ingest_batch` row that
holds the source's watermark and the batch's counts, so a crash leaves the store at the end of
some batch and the rerun resumes. `sync_state` and `ingest_run` are views over those rows:
appending is cheap in DuckLake, while every update or delete of a catalog-inlined table costs
a round of catalog reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import Batch, Watermark, Window, records_from
from connectors.errors import StoreError
from harmonize.records import usable_cores
from harmonize.sql_on_fhir.fhirpath import MACROS_SQL
from harmonize.wearables.metrics import DAILY_SCHEMA, daily_resources
from twin_store.extensions import load_extensions
from twin_store.models import SCHEMA_SQL as MODEL_SCHEMA_SQL
from twin_store.prepare import BY_IDENTIFIER, PreparedBatch, prepare
from twin_store.views import standard_views
from twin_store.wearables import SCHEMA_SQL as WEARABLE_SCHEMA_SQL
from twin_store.wearables import SampleSummary, SampleWriter

log = logging.getLogger(__name__)

CATALOG = "twin"
RunStatus = Literal["running", "succeeded", "failed", "interrupted"]
FlowKind = Literal["sync", "backfill", "refresh"]

COUNTS = (
    "lines_read", "inserted", "updated", "unchanged", "superseded", "quarantined", "out_of_window", "held",
    "deleted", "released", "warnings",
)  # fmt: skip
"""Per batch and run. Every line read is counted once in the first eight (`held`: waiting for
its patient); `deleted` counts resources the source reported deleted that were removed from the
store, `released` held resources whose patient arrived (read before, they land now and count
in inserted, updated, ... too: lines_read + released = the first eight), `warnings` spec
violations of records that landed (`ingest_warning`)."""
SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS twin.fhir_resource (
    resource_type VARCHAR, id VARCHAR, version_id INTEGER, meta_version_id VARCHAR,
    last_updated TIMESTAMPTZ, source VARCHAR, run_id VARCHAR, content_hash UBIGINT,
    ingested_at TIMESTAMPTZ, resource VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.fhir_deletion (
    resource_type VARCHAR, id VARCHAR, deleted_at TIMESTAMPTZ, source VARCHAR, run_id VARCHAR,
    origin VARCHAR, recorded_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS twin.genomic_variant (
    source VARCHAR, file VARCHAR, sample VARCHAR, patient_id VARCHAR, assembly VARCHAR, chrom VARCHAR,
    pos BIGINT, variant_id VARCHAR, ref VARCHAR, alt VARCHAR, genotype VARCHAR, zygosity VARCHAR,
    phase_set BIGINT, quality DOUBLE, filter VARCHAR, gene VARCHAR, hgvs_c VARCHAR, hgvs_p VARCHAR,
    clinvar_significance VARCHAR, clinvar_allele_id VARCHAR, run_id VARCHAR, ingested_at TIMESTAMPTZ,
    patient_identifier VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.held_resource (
    link_system VARCHAR, link_value VARCHAR, source VARCHAR, run_id VARCHAR, held_at TIMESTAMPTZ,
    file VARCHAR, line_no BIGINT, resource_type VARCHAR, id VARCHAR, meta_version_id VARCHAR,
    last_updated TIMESTAMPTZ, window_time TIMESTAMPTZ, content_hash UBIGINT, resource VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.quarantine (
    run_id VARCHAR, source VARCHAR, file VARCHAR, line_no BIGINT, reason VARCHAR,
    raw VARCHAR, raw_hash VARCHAR, quarantined_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS twin.ingest_warning (
    run_id VARCHAR, source VARCHAR, file VARCHAR, line_no BIGINT, reason VARCHAR, raw VARCHAR,
    warned_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS twin.run_record (
    run_id VARCHAR, source VARCHAR, flow VARCHAR, started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ, status VARCHAR, snapshot_id BIGINT, error VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.ingest_batch (
    run_id VARCHAR, source VARCHAR, batch_no INTEGER, committed_at TIMESTAMPTZ, watermark VARCHAR,
    {", ".join(f"{c} BIGINT" for c in COUNTS)}
);
CREATE VIEW IF NOT EXISTS twin.sync_state AS
    SELECT source, arg_max(watermark, (committed_at, batch_no)) AS watermark,
           arg_max(run_id, (committed_at, batch_no)) AS run_id, max(committed_at) AS updated_at
    FROM ingest_batch WHERE watermark IS NOT NULL GROUP BY source;
CREATE VIEW IF NOT EXISTS twin.ingest_run AS
    SELECT r.run_id, r.source, r.flow, r.started_at, r.finished_at, r.status,
           {", ".join(f"coalesce(b.{c}, 0)::BIGINT AS {c}" for c in COUNTS)},
           r.snapshot_id, r.error
    FROM run_record r LEFT JOIN (
        SELECT run_id, {", ".join(f"sum({c}) AS {c}" for c in COUNTS)} FROM ingest_batch GROUP BY run_id
    ) b USING (run_id);
"""


PATIENTS_LISTED = 1000
"""A run's event names at most this many changed patients (and counts them all)."""
STORE_TABLES = (
    "fhir_resource", "fhir_deletion", "genomic_variant", "held_resource", "quarantine", "ingest_warning",
    "run_record", "ingest_batch", "wearable_sample", "wearable_daily", "wearable_reported", "model_output",
    "model_run", "model_training",
)  # fmt: skip
"""The tables the schema creates (the views' tables come on top): fewer means one is new."""
STORED_KEYS = "temp.stored_keys"
"""The writer's copy of the keys of `fhir_resource` (type, id, version, hash, lastUpdated), which
every batch is judged against: a temporary table, so it changes in the batch's own transaction
(a temporary table may be written beside the store) and a rolled-back batch rolls it back. The
writer lock keeps other writers out while it lives. Judging against the store itself would read
the key columns of every data file, per batch."""


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
VARIANTS_WAIT = (
    "SELECT count(*) > 0 FROM twin.genomic_variant "
    "WHERE patient_id IS NULL AND patient_identifier IS NOT NULL"
)
"""Whether some variant call's sample names a patient identifier no Patient has yet."""
CALLED_SAMPLES = (
    "SELECT source, sample, bool_or(patient_id IS NULL AND patient_identifier IS NOT NULL) "
    "FROM twin.genomic_variant GROUP BY ALL"
)
"""The samples each source has calls of (as VARIANTS_WAIT, whether some call waits), read once
when the writer opens: a sample's first calls have no stored call to replace."""


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


def connect(root: Path, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store attached as `twin` and selected (read-only default)."""
    catalog = root / "catalog.sqlite"
    if read_only and not catalog.exists():
        raise StoreError(f"no twin store at {str(root)!r}; run `twinhub sync SOURCE` first")
    root.mkdir(parents=True, exist_ok=True)
    if not read_only:
        # Write-ahead logging: a reader's open query (an analyst's notebook, `twinhub sql`)
        # then never blocks the writer's commit, nor the writer a reader. The mode stays with
        # the file; setting it again is a no-op.
        with contextlib.closing(sqlite3.connect(catalog)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    con = duckdb.connect()
    load_extensions(con)
    con.execute("SET TimeZone = 'UTC'")
    options = "READ_ONLY" if read_only else f"DATA_PATH '{root / 'data'}/'"
    con.execute(f"ATTACH 'ducklake:sqlite:{catalog}' AS {CATALOG} ({options})")
    con.execute(f"USE {CATALOG}")
    return con


class TwinStore:
    """The writer's handle on the store. Use as a context manager; it holds the writer lock."""

    def __init__(self, root: Path, *, lock_timeout: float = 300.0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_writer_lock(root / "writer.lock", lock_timeout)
        self.con = connect(root, read_only=False)
        # Work from the in-memory catalog and name store tables `twin.x`: binding a name that
        # is not in the default catalog would otherwise cost a DuckLake catalog read each time.
        self.con.execute("USE memory")
        self.con.execute(MACROS_SQL)
        (tables,) = _one(self.con, f"SELECT count(*) FROM duckdb_tables() WHERE database_name = '{CATALOG}'")
        if tables < len(STORE_TABLES):  # a new store (or a new table): one commit, not one per statement
            with self._transaction():
                self.con.execute(SCHEMA_SQL)
                self.con.execute(WEARABLE_SCHEMA_SQL)
                self.con.execute(MODEL_SCHEMA_SQL)
                # Raw JSON: lz4 writes twice as fast as the default snappy, and smaller.
                self.con.execute(f"CALL {CATALOG}.set_option('parquet_compression', 'lz4_raw')")
        self._migrate()
        self._ensure_view_tables()
        (self._has_tombstones,) = _one(self.con, "SELECT count(*) > 0 FROM twin.fhir_deletion")
        (self._has_held,) = _one(self.con, "SELECT count(*) > 0 FROM twin.held_resource")
        called = self.con.execute(CALLED_SAMPLES).fetchall()
        self._variants_wait = int(any(waiting for _, _, waiting in called))
        # (source, sample) of the stored variant calls. After a batch rolls back it may still name
        # samples the batch added, which only costs a look for calls to replace; it never misses one.
        self._called = {(source, sample) for source, sample, _ in called}
        self._keys_loaded = False
        self._samples = SampleWriter(con=self.con)
        # The FHIR of the days each batch rolls up, made in a process while later batches land.
        self._fhir_maker: ProcessPoolExecutor | None = None
        self._fhir_made: list[tuple[pa.Table, Future[list[bytes]]]] = []
        # Batches are checked on one core while the writer lands the one before (flows.sync):
        # leave that core to the checks; DuckDB's extra threads would only contend with them.
        self.con.execute(f"SET threads = {max(1, usable_cores() - 1)}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fhir_maker is not None:
            self._fhir_maker.shutdown(cancel_futures=True)
        self.con.close()
        self._lock.close()

    # -- runs and watermarks ------------------------------------------------------------------

    def begin_run(self, source: str, flow: FlowKind) -> RunReport:
        """Start a run; runs left 'running' by a crash are marked 'interrupted' first."""
        run = RunReport(
            run_id=f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
            source=source,
            flow=flow,
        )
        with self._transaction():
            self.con.execute(
                "UPDATE twin.run_record SET status = 'interrupted', finished_at = now() "
                "WHERE status = 'running'"
            )
            self.con.execute(
                "INSERT INTO twin.run_record (run_id, source, flow, started_at, status) "
                "VALUES (?, ?, ?, now(), 'running')",
                [run.run_id, source, flow],
            )
        return run

    def watermark(self, source: str) -> Watermark | None:
        row = self.con.execute("SELECT watermark FROM twin.sync_state WHERE source = ?", [source]).fetchone()
        return orjson.loads(row[0]) if row else None

    def finish_run(self, run: RunReport, status: RunStatus, error: str | None = None) -> RunReport:
        run.status, run.error = status, error
        run.snapshot_id = self.snapshot_id()
        run.patients, run.patients_changed = sorted(run.patient_ids)[:PATIENTS_LISTED], len(run.patient_ids)
        with self._transaction():
            self.con.execute(
                "UPDATE twin.run_record SET status = ?, finished_at = now(), snapshot_id = ?, error = ? "
                "WHERE run_id = ?",
                [status, run.snapshot_id, error, run.run_id],
            )
        return run

    def snapshot_id(self) -> int:
        row = self.con.execute(f"SELECT id FROM ducklake_current_snapshot('{CATALOG}')").fetchone()
        assert row is not None
        return int(row[0])

    # -- landing ------------------------------------------------------------------------------

    def land(self, run: RunReport, batch: PreparedBatch, *, window: Window | None = None) -> None:
        """Upsert one batch, the view rows of what changed, quarantine, watermark and run
        counts atomically.

        Unchanged content (same hash) writes nothing. With a `window` (a backfill) only
        resources in it land, the view rows of all of them are recomputed even if unchanged,
        and the sync watermark is left alone.
        """
        con = self.con
        resources, problems = batch.checked.resources, batch.checked.problems
        con.register("batch_problems", _printable_reasons(problems))
        counts: Counter[str] = Counter(lines_read=batch.lines_read)
        days = DAILY_SCHEMA.empty_table()
        try:
            with self._keys_kept(), self._transaction():
                variants = batch.variants if batch.variants is not None else pa.table({})
                by_identifier = "patient_identifier" in variants.column_names and bool(
                    variants["patient_identifier"].null_count < len(variants)
                )
                if len(batch.links) or self._has_held or self._variants_wait or by_identifier:
                    resources = self._link_patients(run, resources, batch.links, counts, window)
                con.register(
                    "batch", resources.append_column("pos", pa.array(range(len(resources)), pa.int64()))
                )
                if len(batch.deletions) and not window:
                    counts["deleted"] = self._delete(run, batch.deletions)
                counts.update(quarantined=len(problems), superseded=batch.superseded)
                if len(resources):
                    self._upsert_resources(run, resources, window, counts)
                if len(problems):
                    self._quarantine(run)
                if len(variants):
                    new, replaced = self._land_variants(run, variants)
                    counts.update(inserted=new, updated=replaced)
                if batch.reported is not None and len(batch.reported):
                    days = self._land_reported(run, batch.reported, counts, window)
                if batch.samples is not None and batch.sample_summary is not None and len(batch.samples):
                    # After the reports: a day both touch is rolled up once more, with its report.
                    rolled = self._land_samples(run, batch.samples, batch.sample_summary, counts, window)
                    days = pa.concat_tables([days, rolled])
                if len(batch.warnings):
                    counts["warnings"] = self._warn(run, batch.warnings)
                if by_identifier or self._variants_wait:
                    run.changed["genomic_variant"] += self._link_variants()
                run.batches += 1
                con.execute(
                    f"INSERT INTO twin.ingest_batch (run_id, source, batch_no, committed_at, watermark, "
                    f"{', '.join(COUNTS)}) VALUES (?, ?, ?, now(), ?{', ?' * len(COUNTS)})",
                    [
                        run.run_id,
                        run.source,
                        run.batches,
                        None if window else orjson.dumps(batch.watermark).decode(),
                        *(counts[c] for c in COUNTS),
                    ],
                )
        finally:
            for name in ("batch", "batch_problems", "changed", "derived", "links", "batch_patients"):
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)
        run.counts.update(counts)
        run.by_type.update(dict(zip(*_value_counts(resources["resource_type"]), strict=True)))
        if len(days):  # committed: their FHIR is made meanwhile, beside the writer
            activity = f"run {run.run_id} batch {run.batches}"
            if self._fhir_maker is None:
                # A process of its own: validating is pure Python, and in a thread it would hold
                # the GIL the writer needs between its statements. Spawned, not forked: the
                # writer runs DuckDB threads.
                self._fhir_maker = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
            self._fhir_made.append(
                (days, self._fhir_maker.submit(daily_resources, days, datetime.now(UTC), activity))
            )

    def _link_patients(
        self, run: RunReport, resources: pa.Table, links: pa.Table, counts: Counter[str],
        window: Window | None,
    ) -> pa.Table:  # fmt: skip
        """Give each resource that names its patient by identifier (lab, genomic) the reference
        of the twin's Patient with that identifier, known or arriving in this batch. Those whose
        patient has not arrived wait in `held_resource`, never dropped, and are released into
        the batch that brings it. Returns the resources to land."""
        con = self.con
        patients = resources.filter(pc.equal(resources["resource_type"], "Patient"))
        con.register("batch_patients", patients)
        con.register("links", links)
        index = next(view for view in standard_views() if view.name == "patient_identifier")
        con.execute("CREATE OR REPLACE TEMP VIEW resources AS FROM batch_patients")
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE arriving AS
            SELECT system, value, min(id) AS patient_id FROM ({index.sql}) GROUP BY ALL"""
        )
        resolved = con.execute(
            """WITH known AS (
                SELECT system, value, min(patient_id) AS patient_id FROM (
                    FROM arriving UNION ALL
                    SELECT system, value, id FROM twin.patient_identifier
                    WHERE (system, value) IN (SELECT (system, value) FROM links)
                      AND id NOT IN (SELECT id FROM batch_patients)) GROUP BY ALL)
            SELECT l.pos, k.patient_id, l.system, l.value FROM links l
            LEFT JOIN known k ON k.system IS NOT DISTINCT FROM l.system AND k.value = l.value
            ORDER BY l.pos"""
        ).to_arrow_table()
        waiting = resolved.filter(pc.is_null(resolved["patient_id"]))
        found = resolved.filter(pc.is_valid(resolved["patient_id"]))
        if self._has_held:  # a copy landing now (linked or held again) replaces an older held one
            landing_keys = resources.select(["resource_type", "id", "last_updated"])
            if window:  # copies outside a backfill's window do not land, so replace nothing
                at = resources["window_time"]
                landing_keys = landing_keys.filter(
                    pc.and_(pc.greater_equal(at, window.since), pc.less(at, window.until))
                )
            con.register("landing_keys", landing_keys)
            con.execute(
                """DELETE FROM twin.held_resource h USING landing_keys b
                WHERE h.resource_type = b.resource_type AND h.id = b.id
                  AND coalesce(b.last_updated >= h.last_updated, true)"""
            )
            con.unregister("landing_keys")
        if len(waiting):
            held = resources.take(waiting["pos"])
            con.register(
                "held",
                held.append_column("link_system", waiting["system"]).append_column(
                    "link_value", waiting["value"]
                ),
            )
            # A newer copy already waiting (it was kept above) stays; this older one is superseded.
            (kept,) = con.execute(
                """INSERT INTO twin.held_resource
                SELECT link_system, link_value, $source, $run_id, now(), * EXCLUDE (link_system, link_value)
                FROM held w WHERE NOT EXISTS (SELECT 1 FROM twin.held_resource h
                                              WHERE h.resource_type = w.resource_type AND h.id = w.id)""",
                {"source": run.source, "run_id": run.run_id},
            ).fetchone() or (0,)
            con.unregister("held")
            self._has_held = True
            counts.update(held=kept, superseded=len(waiting) - kept)
        linked = _with_subject(resources.take(found["pos"]), found["patient_id"])
        keep = pc.invert(pc.is_in(pa.array(range(len(resources)), pa.int64()), resolved["pos"]))
        landing = [resources.filter(keep), linked]
        if self._has_held and len(patients):
            released = con.execute(
                """SELECT h.* EXCLUDE (link_system, link_value, source, run_id, held_at), a.patient_id,
                          h.source AS read_by, h.run_id AS read_in
                FROM twin.held_resource h JOIN arriving a
                    ON a.system IS NOT DISTINCT FROM h.link_system AND a.value = h.link_value"""
            ).to_arrow_table()
            if len(released):
                con.register("released", released)
                con.execute(
                    """DELETE FROM twin.held_resource h USING released r
                    WHERE h.resource_type = r.resource_type AND h.id = r.id"""
                )
                con.unregister("released")
                counts["released"] += len(released)
                released = _with_subject(released.drop(["patient_id"]), released["patient_id"])
                # They keep the source and run that read them (see _upsert_resources).
                landing = [
                    t.append_column("read_by", pa.nulls(len(t), pa.string())).append_column(
                        "read_in", pa.nulls(len(t), pa.string())
                    )
                    for t in landing
                ] + [released]
        return pa.concat_tables([t.cast(landing[-1].schema) for t in landing])

    def _link_variants(self) -> int:
        """Variant calls of samples named by patient identifier get the twin's Patient id once
        it is known (here or in `arriving`, this batch's patients); returns how many did."""
        (linked,) = _one(
            self.con,
            """UPDATE twin.genomic_variant t SET patient_id = k.patient_id
            FROM (SELECT system || '|' || value AS identifier, min(patient_id) AS patient_id
                  FROM (FROM arriving UNION ALL SELECT system, value, id FROM twin.patient_identifier)
                  GROUP BY ALL) k
            WHERE t.patient_id IS NULL AND t.patient_identifier = k.identifier""",
        )
        (self._variants_wait,) = _one(self.con, VARIANTS_WAIT)
        return linked

    def _delete(self, run: RunReport, deletions: pa.Table) -> int:
        """Record what the source reports deleted and remove the stored copies (and their view
        rows) that are no newer than the deletion. Returns how many were removed."""
        con = self.con
        con.register("gone", deletions)
        try:
            con.execute(
                """INSERT INTO twin.fhir_deletion
                SELECT DISTINCT g.resource_type, g.id, g.deleted_at, $source, $run_id, g.origin, now()
                FROM gone g WHERE NOT EXISTS (
                    SELECT 1 FROM twin.fhir_deletion d
                    WHERE (d.resource_type, d.id, d.deleted_at) = (g.resource_type, g.id, g.deleted_at))""",
                {"source": run.source, "run_id": run.run_id},
            )
            self._has_tombstones = True
            removed = con.execute(
                """SELECT DISTINCT t.resource_type, t.id FROM twin.fhir_resource t
                JOIN gone g ON t.resource_type = g.resource_type AND t.id = g.id
                WHERE coalesce(t.last_updated <= g.deleted_at, true)"""
            ).to_arrow_table()
            if not len(removed):
                return 0
            con.register("removed", removed)
            con.execute(
                """DELETE FROM twin.fhir_resource t USING removed r
                WHERE t.resource_type = r.resource_type AND t.id = r.id"""
            )
            if self._keys_loaded:
                con.execute(
                    f"""DELETE FROM {STORED_KEYS} t USING removed r
                    WHERE t.resource_type = r.resource_type AND t.id = r.id"""
                )
            run.changed["fhir_resource"] += len(removed)
            for view in standard_views():
                ids = f"SELECT id FROM removed WHERE resource_type = '{view.resource_type}'"
                (n,) = _one(con, f"SELECT count(*) FROM ({ids})")
                if n:
                    (gone,) = _one(con, f"DELETE FROM twin.{view.name} WHERE id IN ({ids})")
                    run.changed[view.name] += gone
            return len(removed)
        finally:
            for name in ("gone", "removed"):
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)

    def _materialize(self, run: RunReport, derived: pa.Table, *, replace_all: bool) -> None:
        """Compute the view rows of the `derived` resources, and only theirs, and write them.
        Old rows are deleted only where they may exist: for updated resources, or for all of
        them with `replace_all`."""
        con = self.con
        con.register("derived", derived)
        con.execute("CREATE OR REPLACE TEMP VIEW resources AS SELECT resource_type, resource FROM derived")
        counted = [("id", "count")] + ([] if replace_all else [("prior_version", "count")])
        stats = derived.group_by("resource_type").aggregate(counted).to_pylist()
        per_type = {row["resource_type"]: row for row in stats}
        views = standard_views()
        subsets = {view.name: [v for v in views if v.subset_of == view.name] for view in views}
        for view in views:
            row = per_type.get(view.resource_type)
            if row is None:
                continue
            of_type = f"FROM derived WHERE resource_type = '{view.resource_type}'"
            if replace_all or row["prior_version_count"]:
                con.execute(f"DELETE FROM twin.{view.name} WHERE id IN (SELECT id {of_type})")
            rows = view.sql
            if view.subset_of:  # the superset's rows, computed just before, of those that pass
                passing = f'SELECT id FROM passes_{view.subset_of} WHERE "{view.name}"'
                rows = f"FROM rows_{view.subset_of} WHERE id IN ({passing})"
            if not view.subset_of:  # kept a moment: its patients are the run's news too
                con.execute(f"CREATE OR REPLACE TEMP TABLE rows_{view.name} AS {rows}")
                rows = f"FROM rows_{view.name}"
                patient = "patient_id" if view.name not in ("patient", "patient_identifier") else "id"
                named = con.execute(
                    f"SELECT DISTINCT {patient} FROM rows_{view.name} WHERE {patient} NOT NULL"
                )
                run.patient_ids.update(p for (p,) in named.fetchall())
            if subsets[view.name]:
                # Every subset's `where` in one pass: they often read the same elements (the
                # category codes), which DuckDB then extracts from the JSON once, not per subset.
                wheres = ", ".join(f'{v.where} AS "{v.name}"' for v in subsets[view.name])
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE passes_{view.name} AS SELECT id, {wheres} {of_type}"
                )
            (written,) = _one(con, f"INSERT INTO twin.{view.name} {rows}")
            run.changed[view.name] += written
        for name in (view.name for view in views if not view.subset_of):
            con.execute(f"DROP TABLE IF EXISTS rows_{name}")
            con.execute(f"DROP TABLE IF EXISTS passes_{name}")

    def _upsert_resources(
        self, run: RunReport, resources: pa.Table, window: Window | None, counts: Counter[str]
    ) -> None:
        """Land the checked resources registered as `batch`: new content gets the next version,
        unchanged content writes nothing, and the view rows of what changed are recomputed."""
        con = self.con
        in_window = "window_time >= $since AND window_time < $until" if window else "true"
        if window and "read_by" in resources.column_names:  # released: read before, they land now
            in_window = f"({in_window}) OR read_by IS NOT NULL"
        params = {"since": window.since, "until": window.until} if window else {}
        # A copy no newer than a deletion the source reported stays deleted.
        tombstones = (
            """LEFT JOIN (SELECT resource_type, id, max(deleted_at) AS deleted_at
                          FROM twin.fhir_deletion GROUP BY ALL) d
                   ON d.resource_type = i.resource_type AND d.id = i.id"""
            if self._has_tombstones
            else "LEFT JOIN (SELECT NULL::TIMESTAMPTZ AS deleted_at) d ON false"
        )
        # Only positions travel through DuckDB; Arrow's take() moves the JSON text.
        incoming = con.execute(
            f"""WITH incoming AS (
                SELECT pos, resource_type, id, last_updated, content_hash
                FROM batch WHERE {in_window}),
            judged AS (
                SELECT i.pos, t.version_id AS prior_version,
                       coalesce(d.deleted_at >= i.last_updated, false) AS was_deleted,
                       t.content_hash IS DISTINCT FROM i.content_hash
                       AND NOT coalesce(t.last_updated > i.last_updated, false) AS newer
                FROM incoming i LEFT JOIN {self._stored_keys()} t
                    ON t.resource_type = i.resource_type AND t.id = i.id
                {tombstones})
            SELECT pos, prior_version, was_deleted, newer AND NOT was_deleted AS is_change
            FROM judged ORDER BY pos""",
            params,
        ).to_arrow_table()
        changes = incoming.filter(incoming["is_change"])
        # Every row changed (a first landing): keep the batch's buffers, copy nothing.
        everything = len(changes) == len(resources)
        changed = (resources if everything else resources.take(changes["pos"])).append_column(
            "prior_version", changes["prior_version"]
        )
        n_upd = len(changed) - changed["prior_version"].null_count
        n_gone = pc.sum(incoming["was_deleted"]).as_py() or 0
        counts.update(
            inserted=len(changed) - n_upd,
            updated=n_upd,
            unchanged=len(incoming) - len(changed) - n_gone,
            superseded=n_gone,
            out_of_window=len(resources) - len(incoming),
        )
        con.register("changed", changed)
        if n_upd:
            for table in ("twin.fhir_resource", STORED_KEYS):
                con.execute(f"""
                    DELETE FROM {table} t USING changed c
                    WHERE c.prior_version IS NOT NULL
                      AND t.resource_type = c.resource_type AND t.id = c.id""")
        if len(changed):
            provenance = (
                "coalesce(read_by, $source), coalesce(read_in, $run_id)"
                if "read_by" in changed.column_names
                else "$source, $run_id"
            )
            con.execute(
                f"""INSERT INTO twin.fhir_resource
                SELECT resource_type, id, coalesce(prior_version + 1, 1), meta_version_id,
                       last_updated, {provenance}, content_hash, now(), resource
                FROM changed""",
                {"source": run.source, "run_id": run.run_id},
            )
            con.execute(
                f"""INSERT INTO {STORED_KEYS}
                SELECT resource_type, id, coalesce(prior_version + 1, 1), content_hash, last_updated
                FROM changed"""
            )
            run.changed["fhir_resource"] += len(changed)
        if window:
            self._materialize(run, resources.take(incoming["pos"]), replace_all=True)
        else:
            self._materialize(run, changed, replace_all=False)

    def _stored_keys(self) -> str:
        """The writer's copy of `fhir_resource`'s keys, read from the store on first use."""
        if not self._keys_loaded:
            self.con.execute(
                f"""CREATE OR REPLACE TEMP TABLE {STORED_KEYS} AS
                SELECT resource_type, id, version_id, content_hash, last_updated FROM twin.fhir_resource"""
            )
            self._keys_loaded = True
        return STORED_KEYS

    @contextlib.contextmanager
    def _keys_kept(self) -> Iterator[None]:
        """Drop the key copy when a batch fails: the temporary table changes in the batch's
        transaction and rolls back with it, but a failed commit may have kept one side."""
        try:
            yield
        except BaseException:
            self._has_held = self._variants_wait = True  # may be stale too; the next batch looks
            self._keys_loaded = False
            with contextlib.suppress(duckdb.Error):
                self._samples.forget_coverage()
            with contextlib.suppress(duckdb.Error):
                self.con.execute(f"DROP TABLE IF EXISTS {STORED_KEYS}")
            raise

    def _land_variants(self, run: RunReport, variants: pa.Table) -> tuple[int, int]:
        """Upsert variant rows on (source, sample, assembly, chrom, pos, ref, alt); returns how
        many were new and how many replaced a row from an earlier read."""
        con = self.con
        samples = {(run.source, sample) for sample in pc.unique(variants["sample"]).to_pylist()}
        con.register("variants", variants)
        try:
            key = "v.sample, v.assembly, v.chrom, v.pos, v.ref, v.alt"
            match = f"""t.source = $source AND (t.sample, t.assembly, t.chrom, t.pos, t.ref, t.alt)
                        IS NOT DISTINCT FROM ({key})"""
            existing = f"SELECT 1 FROM twin.genomic_variant t WHERE {match}"
            replaced = 0
            if samples & self._called:  # else these are the first calls of their samples
                (replaced,) = con.execute(
                    f"SELECT count(*) FROM variants v WHERE EXISTS ({existing})", {"source": run.source}
                ).fetchone() or (0,)
            if replaced:
                con.execute(
                    f"DELETE FROM twin.genomic_variant t USING variants v WHERE {match}",
                    {"source": run.source},
                )
            con.execute(
                "INSERT INTO twin.genomic_variant BY NAME "
                "SELECT $source AS source, *, $run_id AS run_id, now() AS ingested_at FROM variants",
                {"source": run.source, "run_id": run.run_id},
            )
        finally:
            con.unregister("variants")
        self._called |= samples
        run.changed["genomic_variant"] += len(variants)
        run.patient_ids.update(p for p in pc.unique(variants["patient_id"]).to_pylist() if p is not None)
        return len(variants) - replaced, replaced

    def _land_samples(
        self, run: RunReport, samples: pa.Table, summary: SampleSummary, counts: Counter[str],
        window: Window | None,
    ) -> pa.Table:  # fmt: skip
        """Upsert wearable samples and roll up the days they touch; returns the days whose
        FHIR is to be made (after the batches: `make_daily_fhir`)."""
        before = counts["inserted"] + counts["updated"]
        changed, days = self._samples.land(run.source, run.run_id, samples, summary, counts, window)
        if changed:
            run.patient_ids.update(summary.spans["patient_id"].to_pylist())
        run.changed["wearable_daily"] += changed
        run.changed["wearable_sample"] += counts["inserted"] + counts["updated"] - before
        return days

    def _land_reported(
        self, run: RunReport, reported: pa.Table, counts: Counter[str], window: Window | None
    ) -> pa.Table:
        """Land the vendor's figures for days; returns the days whose FHIR is to be made."""
        changed, days = self._samples.report(run.source, run.run_id, reported, counts, window)
        if changed:
            run.patient_ids.update(pc.unique(reported["patient_id"]).to_pylist())
        run.changed["wearable_daily"] += changed
        return days

    def make_daily_fhir(self, run: RunReport, *, chunk: int = 20_000) -> int:
        """Land the FHIR of every daily rollup flagged pending: the days this run's batches
        rolled up (made meanwhile in a process; a day rolled up twice lands its last version),
        then any a crash left. Observations, Devices and a Provenance per patient, validated;
        derived resources, counted apart from lines read. Returns how many days got theirs."""
        made = 0
        if self._fhir_made:
            days = pa.concat_tables([d for d, _ in self._fhir_made])
            resources = [r for _, future in self._fhir_made for r in future.result()]
            self._fhir_made.clear()
            made += self._land_daily_fhir(run, days, resources)
        while self._samples.any_pending() and len(days := self._samples.pending_days(chunk)):
            made += self._land_daily_fhir(
                run, days, daily_resources(days, datetime.now(UTC), f"run {run.run_id}")
            )
        return made

    def _land_daily_fhir(self, run: RunReport, days: pa.Table, resources: list[bytes]) -> int:
        with self._keys_kept(), self._transaction():
            derived = self.land_derived(run, resources, origin="wearable_daily")
            self._samples.fhir_made(days)
        run.stats["daily FHIR resources written"] += derived["inserted"] + derived["updated"]
        return len(days)

    def land_derived(self, run: RunReport, resources: list[bytes], *, origin: str) -> Counter[str]:
        """Land resources twinhub made itself (daily rollups, model outputs) in the current
        transaction, through the same checks and upsert as any: counted apart from lines read.
        Of several copies of one resource the last wins."""
        records = records_from([(origin, n, r.decode()) for n, r in enumerate(resources, start=1)])
        checked = prepare(Batch(records=records, watermark={})).checked
        if len(checked.problems):  # our own resources: a failed check is a bug, not bad input
            raise StoreError(
                f"{origin}: a resource twinhub made failed the checks: {checked.problems['reason'][0]}"
            )
        derived: Counter[str] = Counter()
        positions = pa.array(range(len(checked.resources)), pa.int64())
        self.con.register("batch", checked.resources.append_column("pos", positions))
        try:
            self._upsert_resources(run, checked.resources, None, derived)
        finally:
            for name in ("batch", "changed", "derived"):
                with contextlib.suppress(duckdb.Error):
                    self.con.unregister(name)
        return derived

    def transaction(self) -> _Transaction:
        """One DuckLake commit for the statements inside (the model runner's outputs)."""
        return self._transaction()

    def _warn(self, run: RunReport, warnings: pa.Table) -> int:
        """Keep spec violations of records that landed anyway; a warning already kept (same
        file, line and reason) is kept once. Returns how many are new."""
        self.con.register("batch_warnings", _printable_reasons(warnings))
        try:
            row = self.con.execute(
                """INSERT INTO twin.ingest_warning
                SELECT $run_id, $source, w.file, w.line_no, w.reason, w.raw, now()
                FROM (SELECT DISTINCT * FROM batch_warnings) w
                ANTI JOIN (SELECT file, line_no, reason FROM twin.ingest_warning WHERE source = $source)
                USING (file, line_no, reason)""",
                {"run_id": run.run_id, "source": run.source},
            ).fetchone()
        finally:
            self.con.unregister("batch_warnings")
        new = int(row[0]) if row else 0
        return new

    def _quarantine(self, run: RunReport) -> None:
        """Quarantine problem lines; a line already quarantined with the same text is kept once."""
        self.con.execute(
            """INSERT INTO twin.quarantine
            SELECT $run_id, $source, p.file, p.line_no, p.reason, p.raw, md5(p.raw), now()
            FROM batch_problems p
            WHERE NOT EXISTS (
                SELECT 1 FROM twin.quarantine q
                WHERE q.source = $source AND q.file = p.file AND q.line_no = p.line_no
                  AND q.raw_hash = md5(p.raw))""",
            {"run_id": run.run_id, "source": run.source},
        )

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring a store written by an earlier twinhub up to this schema."""
        columns = {
            (table, column)
            for table, column in self.con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?", [CATALOG]
            ).fetchall()
        }
        if ("genomic_variant", "patient_identifier") not in columns:
            with self._transaction():
                self.con.execute("ALTER TABLE twin.genomic_variant ADD COLUMN patient_identifier VARCHAR")
        if ("wearable_daily", "reported") not in columns:
            with self._transaction():
                self.con.execute("ALTER TABLE twin.wearable_daily ADD COLUMN reported DOUBLE")
        if all(("ingest_run", count) in columns for count in COUNTS):
            return
        with self._transaction():
            for count in COUNTS:
                if ("ingest_batch", count) not in columns:
                    self.con.execute(f"ALTER TABLE twin.ingest_batch ADD COLUMN {count} BIGINT DEFAULT 0")
            self.con.execute("DROP VIEW twin.ingest_run")
            self.con.execute(SCHEMA_SQL)

    def _ensure_view_tables(self) -> None:
        """Create missing view tables; rebuild one whose definition changed (its comment
        differs) from the raw resources."""
        con = self.con
        con.execute(
            "CREATE OR REPLACE TEMP VIEW resources AS "
            "SELECT NULL::VARCHAR AS resource_type, NULL::VARCHAR AS resource WHERE false"
        )
        comments = dict(
            con.execute(
                "SELECT table_name, comment FROM duckdb_tables() WHERE database_name = ?", [CATALOG]
            ).fetchall()
        )
        stale = [view for view in standard_views() if comments.get(view.name, "") != view.comment]
        if not stale:
            return
        (has_resources,) = _one(con, "SELECT count(*) > 0 FROM twin.fhir_resource")
        with self._transaction():
            for view in stale:
                if view.name in comments:
                    log.info("view %s changed definition; rebuilding its table", view.name)
                    con.execute(f"DROP TABLE twin.{view.name}")
                con.execute(f"CREATE TABLE twin.{view.name} AS FROM ({view.sql}) LIMIT 0")
                con.execute(f"COMMENT ON TABLE twin.{view.name} IS {_literal(view.comment)}")
                for column, comment in view.column_comments.items():
                    con.execute(f'COMMENT ON COLUMN twin.{view.name}."{column}" IS {_literal(comment)}')
                if has_resources:
                    con.execute(
                        f"""CREATE OR REPLACE TEMP VIEW resources AS SELECT resource_type, resource
                        FROM twin.fhir_resource WHERE resource_type = '{view.resource_type}'"""
                    )
                    con.execute(f"INSERT INTO twin.{view.name} {view.sql}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self.con)


class _Transaction:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN")

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.con.execute("ROLLBACK" if et else "COMMIT")


def _with_subject(resources: pa.Table, patient_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """The resources with `subject.reference` set to their Patient, the identifier kept."""
    texts = [
        text.replace(BY_IDENTIFIER, f'"subject":{{"reference":"Patient/{patient}","identifier":', 1)
        for text, patient in zip(resources["resource"].to_pylist(), patient_ids.to_pylist(), strict=True)
    ]
    column = resources.schema.get_field_index("resource")
    return resources.set_column(column, "resource", pa.array(texts, pa.string()))


def _printable_reasons(problems: pa.Table) -> pa.Table:
    """Control characters in reasons (which quote the bad text) written as escapes: DuckLake
    passes join values to its SQLite catalog as SQL text, which a NUL byte cuts short."""
    reasons = problems["reason"]
    if not pc.any(pc.match_substring_regex(reasons, CONTROL.pattern)).as_py():
        return problems
    escaped = [
        None if r is None else CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", r) for r in reasons.to_pylist()
    ]
    return problems.set_column(
        problems.schema.get_field_index("reason"), "reason", pa.array(escaped, pa.string())
    )


def _value_counts(values: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(values)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[int, ...]:
    row = con.execute(sql).fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


def _acquire_writer_lock(path: Path, timeout: float) -> IO[str]:
    """Serialize writers: DuckLake writers to one table conflict at commit."""
    fh = path.open("a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                raise StoreError(
                    f"another twinhub process is writing to {str(path.parent)!r}; wait for it "
                    "to finish (readers like `twinhub sql` are never blocked)"
                ) from None
            time.sleep(0.2)
