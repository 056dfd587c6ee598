"""The twin store: DuckLake (SQLite catalog + Parquet files) under one folder.

One writer at a time, any number of read-only readers in other processes. A writer holds the
store lock only while it writes (opening the store, each batch's transaction: `locks`), and each
run holds its source's run lock; between batches another writer may land, and the writer then
reads again what it remembers of the store. Every batch lands in one transaction together with
its quarantine rows and an `ingest_batch` row that holds the source's watermark and the batch's
counts, so a crash leaves the store at the end of some batch and the rerun resumes. Each
transaction is one DuckLake snapshot whose commit message names the run and batch that made it;
a run that lands nothing makes none (its record lives beside the DuckLake, `runs`).

`TwinStore` is the writer: it opens the store (creating or migrating its tables, `schema`) and
lands each batch by table family, each in its own module: the FHIR resources and their view rows
(`resources`), links to the twin's Patient (`linkage`), variant calls (`genomics`), wearable
samples and their daily rollups (`wearables`), and the run's bookkeeping (`runs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import Self

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import Batch, Watermark, Window, records_from
from harmonize.records import usable_cores
from harmonize.wearables.daily_fhir import DailyFhir, daily_fhir
from harmonize.wearables.metrics import DAILY_SCHEMA
from twin_store import runs, schema
from twin_store.connection import CATALOG, Transaction, connect, one
from twin_store.genomics import VariantWriter
from twin_store.linkage import PatientKeys, PatientLinker
from twin_store.locks import FileLock, Holder, run_lock, store_lock
from twin_store.prepare import PreparedBatch, prepare
from twin_store.resources import ResourceWriter
from twin_store.runs import FlowKind, RunReport, RunStatus
from twin_store.wearables import SampleSummary, SampleWriter

log = logging.getLogger(__name__)


class TwinStore:
    """The writer's handle on the store. Use as a context manager. It takes the store lock only
    while it writes (`writing`), and a run's source lock from `begin_run` to `finish_run`."""

    def __init__(self, root: Path, *, lock_timeout: float = 300.0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock_timeout = lock_timeout
        self._lock = store_lock(root, lock_timeout)
        self._doing = Holder(what="twinhub")
        self._run_locks: dict[str, tuple[str, FileLock]] = {}
        """source -> (run id, its run lock), from `begin_run` to `finish_run`."""
        self._depth = 0
        with self._lock.holding(self._doing):
            self.con = connect(root, read_only=False)
            # Work from the in-memory catalog and name store tables `twin.x`: binding a name that
            # is not in the default catalog would otherwise cost a DuckLake catalog read each time.
            self.con.execute("USE memory")
            schema.create(self.con)
            schema.migrate(self.con, root)
            schema.ensure_view_tables(self.con)
            with runs.run_log(root):  # readers find the run records from the first open on
                pass
            self._remember()
        # The FHIR of the days each batch rolls up, made in a process while later batches land.
        self._fhir_maker: ProcessPoolExecutor | None = None
        self._fhir_made: list[tuple[pa.Table, Future[DailyFhir]]] = []
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
        self._lock.release()
        for _, lock in self._run_locks.values():
            lock.release()
        self._run_locks.clear()

    # -- the store lock -----------------------------------------------------------------------

    def _remember(self) -> None:
        """Read what the writer keeps of the store between batches (keys, whether anything is
        held or waits, wearable coverage), as of the store's latest snapshot."""
        self._resources = ResourceWriter(self.con)
        self._variants = VariantWriter(self.con)
        self._linker = PatientLinker(self.con, variants_wait=self._variants.any_waiting)
        self._samples = SampleWriter(con=self.con)
        self._patient_keys = PatientKeys(self.con)
        self._seen = self.snapshot_id()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store lock while what is inside writes (nested uses hold it once). When
        another writer committed since this one last wrote, what it remembers is read again:
        one look at the current snapshot id when nobody else wrote."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._lock.holding(self._doing):
            if self.snapshot_id() != self._seen:
                self._remember()
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                # Still holding the lock: a snapshot this writer just made is the latest one.
                with contextlib.suppress(duckdb.Error):
                    (ours,) = one(self.con, f"FROM ducklake_last_committed_snapshot('{CATALOG}')")
                    self._seen = max(self._seen, ours or 0)

    # -- runs and watermarks ------------------------------------------------------------------

    def begin_run(self, source: str, flow: FlowKind) -> RunReport:
        """Start a run, holding the source's run lock until `finish_run` (or `close`); runs
        left 'running' by a crash (their source's lock free) are marked 'interrupted' first."""
        run = RunReport(run_id=runs.new_run_id(), source=source, flow=flow)
        if left := self._run_locks.pop(source, None):  # a run of ours this one replaces (it failed)
            left[1].release()
        lock = run_lock(self.root, source, self._lock_timeout)
        lock.acquire(Holder(what=flow, source=source, run_id=run.run_id))
        self._run_locks[source] = (run.run_id, lock)
        self._doing = Holder(what=flow, source=source, run_id=run.run_id)
        run.started_snapshot_id = self.snapshot_id()
        ended = [
            run_id
            for run_id, other in runs.running(self.root)
            if other == source or run_lock(self.root, other, 0).free()
        ]
        runs.begin(self.root, run, ended)
        return run

    def watermark(self, source: str) -> Watermark | None:
        return runs.watermark(self.con, source)

    def finish_run(self, run: RunReport, status: RunStatus, error: str | None = None) -> RunReport:
        run.status, run.error = status, error
        run.snapshot_id = self.snapshot_id()
        run.patients, run.patients_changed = (
            sorted(run.patient_ids)[: runs.PATIENTS_LISTED],
            len(run.patient_ids),
        )
        runs.finish(self.root, run)
        if self._run_locks.get(run.source, ("", None))[0] == run.run_id:
            self._run_locks.pop(run.source)[1].release()
        return run

    def forget(self, source: str) -> RunReport:
        """Forget where `source` got (a `reset` run): its next sync reads everything again. What
        landed stays; read again unchanged, it counts as unchanged."""
        run = self.begin_run(source, "reset")
        with self.transaction(f"reset {source} run {run.run_id}", _about(run)):
            run.stats["watermarks forgotten"] = runs.forget_watermark(self.con, source)
        return self.finish_run(run, "succeeded")

    def quarantined(self, source: str) -> pa.Table:
        """The quarantined lines of `source`, as records to read again (`land(replayed=...)`)."""
        return self._resources.quarantined(source)

    def lines_landed(self, run: RunReport) -> int:
        """The lines of the run's committed batches, as the store has them (an interrupted run's
        last commit may have ended without the writer hearing of it)."""
        return runs.lines_landed(self.con, run.run_id)

    def snapshot_id(self) -> int:
        row = self.con.execute(f"SELECT id FROM ducklake_current_snapshot('{CATALOG}')").fetchone()
        assert row is not None
        return int(row[0])

    @contextlib.contextmanager
    def transaction(self, message: str, extra: Mapping[str, object] | None = None) -> Iterator[None]:
        """One DuckLake commit for the statements inside (the model runner's outputs), its
        snapshot carrying `message`, in the store lock."""
        with self.writing(), Transaction(self.con, message, extra):
            yield

    # -- landing ------------------------------------------------------------------------------

    def land(
        self,
        run: RunReport,
        batch: PreparedBatch,
        *,
        window: Window | None = None,
        replayed: pa.Table | None = None,
    ) -> None:
        """Upsert one batch, the view rows of what changed, quarantine, watermark and run
        counts atomically.

        Unchanged content (same hash) writes nothing. With a `window` (a backfill) only
        resources in it land, the view rows of all of them are recomputed even if unchanged,
        and the sync watermark is left alone. With `replayed` (the quarantined lines the batch
        reads again, as `quarantined` gives them) those lines leave quarantine, the ones still
        bad come back with their reason, and the watermark is left alone too.
        """
        if batch.samples is not None or batch.reported is not None:
            batch = self._patient_keys.keyed(run.source, batch)
        resources, problems = batch.checked.resources, batch.checked.problems
        counts: Counter[str] = Counter(lines_read=batch.lines_read)
        days = DAILY_SCHEMA.empty_table()
        number = run.batches + 1
        message = f"{run.flow} {run.source} run {run.run_id} batch {number}"
        with self.writing(), self._kept(), self.transaction(message, _about(run, batch=number)):
            variants = batch.variants if batch.variants is not None else pa.table({})
            by_identifier = "patient_identifier" in variants.column_names and bool(
                variants["patient_identifier"].null_count < len(variants)
            )
            if self._linker.needed(batch.links, by_identifier):
                resources = self._linker.link_resources(run, resources, batch.links, counts, window)
            if len(batch.deletions) and not window:
                counts["deleted"] = self._resources.delete(run, batch.deletions)
            counts.update(quarantined=len(problems), superseded=batch.superseded)
            if len(resources):
                self._resources.upsert(run, resources, window, counts)
            if replayed is not None:
                self._resources.release(run, replayed)
            if len(problems):
                self._resources.quarantine(run, problems)
            if len(variants):
                new, replaced = self._variants.land(run, variants)
                counts.update(inserted=new, updated=replaced)
            if batch.reported is not None and len(batch.reported):
                days = self._land_reported(run, batch.reported, counts, window)
            if batch.samples is not None and batch.sample_summary is not None and len(batch.samples):
                # After the reports: a day both touch is rolled up once more, with its report.
                rolled = self._land_samples(run, batch.samples, batch.sample_summary, counts, window)
                days = pa.concat_tables([days, rolled])
            if len(batch.warnings):
                counts["warnings"] = self._resources.warn(run, batch.warnings)
            if by_identifier or self._linker.variants_wait:
                run.changed["genomic_variant"] += self._linker.link_variants()
            run.batches += 1
            mark = None if window or replayed is not None else batch.watermark
            runs.record_batch(self.con, run, counts, mark)
        run.counts.update(counts)
        counted = pc.value_counts(resources["resource_type"])
        run.by_type.update(
            dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True))
        )
        if len(days):  # committed: their FHIR is made meanwhile, beside the writer
            activity = f"run {run.run_id} batch {run.batches}"
            if self._fhir_maker is None:
                # A process of its own: validating is pure Python, and in a thread it would hold
                # the GIL the writer needs between its statements. Spawned, not forked: the
                # writer runs DuckDB threads.
                self._fhir_maker = fhir_maker()
            self._fhir_made.append(
                (days, self._fhir_maker.submit(daily_fhir, days, datetime.now(UTC), activity))
            )

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        """After a failed batch, what the writer remembers of the store may hold what was rolled
        back: each family forgets it."""
        with self._resources.kept(), self._linker.kept():
            try:
                yield
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self._samples.forget_coverage()
                raise

    def _land_samples(
        self,
        run: RunReport,
        samples: pa.Table,
        summary: SampleSummary,
        counts: Counter[str],
        window: Window | None,
    ) -> pa.Table:
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
            fhir = [future.result() for _, future in self._fhir_made]
            self._fhir_made.clear()
            both = DailyFhir(
                resources=[r for f in fhir for r in f.resources],
                problems=pa.concat_tables([f.problems for f in fhir]),
                failed=pa.concat_tables([f.failed for f in fhir]),
            )
            made += self._land_daily_fhir(run, days, both)
        while self._samples.any_pending() and len(days := self._samples.pending_days(chunk)):
            made += self._land_daily_fhir(run, days, daily_fhir(days, datetime.now(UTC), f"run {run.run_id}"))
        return made

    def _land_daily_fhir(self, run: RunReport, days: pa.Table, fhir: DailyFhir) -> int:
        """Land the days' FHIR; the days whose FHIR failed its checks are quarantined, their
        flags cleared too (a rerun would only fail them again)."""
        message = f"{run.flow} {run.source} run {run.run_id}: daily FHIR"
        with self.writing(), self._kept(), self.transaction(message, _about(run)):
            derived = self.land_derived(run, fhir.resources, origin="wearable_daily")
            if len(fhir.problems):
                self._resources.quarantine(run, fhir.problems)
            self._samples.fhir_made(days, failed=fhir.failed)
        run.stats["daily FHIR resources written"] += derived["inserted"] + derived["updated"]
        if len(fhir.problems):
            run.stats["days whose daily FHIR failed its checks (quarantined)"] += len(fhir.problems)
            run.counts["quarantined"] += len(fhir.problems)
        return len(days)

    def land_derived(self, run: RunReport, resources: list[bytes], *, origin: str) -> Counter[str]:
        """Land resources twinhub made itself (daily rollups, model outputs) in the current
        transaction, through the same checks and upsert as any: counted apart from lines read.
        Of several copies of one resource the last wins. One that fails the checks (a bug, not
        bad input) is quarantined under `origin`, never stopping the rest or the store."""
        records = records_from([(origin, n, r.decode()) for n, r in enumerate(resources, start=1)])
        checked = prepare(Batch(records=records, watermark={})).checked
        derived: Counter[str] = Counter()
        if len(checked.problems):
            reasons = pc.binary_join_element_wise(
                "a resource twinhub made failed the checks (a bug: please report it): ",
                checked.problems["reason"],
                "",
            )
            self._resources.quarantine(run, checked.problems.set_column(2, "reason", reasons))
            derived["quarantined"] = len(checked.problems)
            log.warning(
                "%s: %d resources twinhub made failed the checks (quarantined)", origin, len(checked.problems)
            )
        self._resources.upsert(run, checked.resources, None, derived)
        return derived


def fhir_maker() -> ProcessPoolExecutor:
    """The process that makes daily FHIR beside the writer. Spawned, not forked: the writer runs
    DuckDB threads. It exits when the writer dies, even by SIGKILL (`_exit_with`)."""
    return ProcessPoolExecutor(
        max_workers=1, mp_context=get_context("spawn"), initializer=_exit_with, initargs=(os.getpid(),)
    )


def _exit_with(parent: int) -> None:
    """In the worker: a thread that ends the process once `parent` is gone (it is adopted by
    another), so a killed sync leaves no worker waiting for work that never comes."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _about(run: RunReport, **more: object) -> dict[str, object]:
    """What a run's snapshots carry as their commit's extra info (JSON)."""
    return {"run_id": run.run_id, "source": run.source, "flow": run.flow, **more}
