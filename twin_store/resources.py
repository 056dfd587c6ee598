"""The FHIR resources: `fhir_resource` (one row per current resource), the standard views' tables
(the rows of what changed, recomputed), `fhir_deletion`, and what does not land: `quarantine`
(bad lines, with the reason) and `ingest_warning` (spec violations of records that landed).

The writer judges every batch against its own copy of `fhir_resource`'s keys (type, id,
version, hash, lastUpdated), the temporary table `temp.stored_keys`: it changes in the batch's
transaction (a temporary table may be written beside the store) and rolls back with it, and the
writer lock keeps other writers out while it lives. Judging against the store itself would read
the key columns of every data file, per batch.

Names on the writer's connection, each registered and dropped by the method that uses it:
`batch` (the resources to upsert, with their position `pos`), `changed` (those that changed),
`derived` and `rows_<view>` / `passes_<view>` (view rows being computed), `gone` and `removed`
(deletions), `batch_problems`, `replayed` (quarantined lines read again) and `batch_warnings`.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import Window
from twin_store.connection import one
from twin_store.runs import RunReport
from twin_store.views import standard_views, views_read

STORED_KEYS = "temp.stored_keys"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ResourceWriter:
    """Lands checked resources on the writer's connection, in the caller's transaction."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        (self._has_tombstones,) = one(con, "SELECT count(*) > 0 FROM twin.fhir_deletion")
        self._keys_loaded = False

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Drop the key copy when a batch fails: the temporary table changes in the batch's
        transaction and rolls back with it, but a failed commit may have kept one side."""
        try:
            yield
        except BaseException:
            self._keys_loaded = False
            with contextlib.suppress(duckdb.Error):
                self.con.execute(f"DROP TABLE IF EXISTS {STORED_KEYS}")
            raise

    def upsert(
        self, run: RunReport, resources: pa.Table, window: Window | None, counts: Counter[str]
    ) -> None:
        """New content gets the next version, unchanged content writes nothing, and the view rows
        of what changed are recomputed. With a `window` (a backfill) only resources in it land,
        and the view rows of all of them are recomputed even if unchanged."""
        con = self.con
        con.register("batch", resources.append_column("pos", pa.array(range(len(resources)), pa.int64())))
        try:
            self._upsert(run, resources, window, counts)
        finally:
            for name in ("batch", "changed", "derived"):
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)

    def _upsert(
        self, run: RunReport, resources: pa.Table, window: Window | None, counts: Counter[str]
    ) -> None:
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

    def _materialize(self, run: RunReport, derived: pa.Table, *, replace_all: bool) -> None:
        """Compute the view rows of the `derived` resources, and only theirs, and write them.
        Old rows are deleted only where they may exist: for updated resources, or for all of
        them with `replace_all`."""
        con = self.con
        con.register("derived", derived)
        views_read(con, "SELECT resource_type, resource FROM derived")
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
            (written,) = one(con, f"INSERT INTO twin.{view.name} {rows}")
            run.changed[view.name] += written
        for name in (view.name for view in views if not view.subset_of):
            con.execute(f"DROP TABLE IF EXISTS rows_{name}")
            con.execute(f"DROP TABLE IF EXISTS passes_{name}")

    def delete(self, run: RunReport, deletions: pa.Table) -> int:
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
                (n,) = one(con, f"SELECT count(*) FROM ({ids})")
                if n:
                    (gone,) = one(con, f"DELETE FROM twin.{view.name} WHERE id IN ({ids})")
                    run.changed[view.name] += gone
            return len(removed)
        finally:
            for name in ("gone", "removed"):
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)

    def quarantine(self, run: RunReport, problems: pa.Table) -> None:
        """Quarantine problem lines; a line already quarantined with the same text is kept once."""
        self.con.register("batch_problems", _printable_reasons(problems))
        try:
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
        finally:
            self.con.unregister("batch_problems")

    def quarantined(self, source: str) -> pa.Table:
        """The quarantined lines of `source` as records to read again (RECORD_SCHEMA, plus each
        line's `raw_hash` and `reason`), in file and line order. A line that was not valid UTF-8
        stays marked so: its text holds replacement characters, not what the source sent."""
        return self.con.execute(
            """SELECT coalesce(file, '') AS file, coalesce(line_no, 0) AS line_no, coalesce(raw, '') AS raw,
                      reason = 'line is not valid UTF-8' AS bad_utf8, raw_hash, reason
            FROM twin.quarantine WHERE source = ? ORDER BY file, line_no, quarantined_at""",
            [source],
        ).to_arrow_table()

    def release(self, run: RunReport, replayed: pa.Table) -> None:
        """Take the `replayed` lines (file, line_no, raw_hash) out of quarantine; those still bad
        come back with their reason as the batch quarantines its problems."""
        self.con.register("replayed", replayed.select(["file", "line_no", "raw_hash"]))
        try:
            self.con.execute(
                """DELETE FROM twin.quarantine q USING replayed r
                WHERE q.source = $source AND coalesce(q.file, '') = r.file
                  AND coalesce(q.line_no, 0) = r.line_no
                  AND q.raw_hash IS NOT DISTINCT FROM r.raw_hash""",
                {"source": run.source},
            )
        finally:
            self.con.unregister("replayed")

    def warn(self, run: RunReport, warnings: pa.Table) -> int:
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
        return int(row[0]) if row else 0


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
