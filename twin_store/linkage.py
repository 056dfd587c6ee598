"""Linking records to the twin's Patient: lab results, HL7 v2 results and variant calls that name
their patient by an identifier (an MRN) get the reference of the Patient with that identifier, of
whichever source, whether it is stored or arrives in the same batch. The reference names that
source (`https://twinhub.invalid/sources/<source>/Patient/<id>`, see `SOURCE_BASE`), so its key
(`getReferenceKey`) is the Patient's, `<source>/<id>`. Records whose patient has not arrived
wait in `held_resource` (never dropped) and land with the batch that brings it; variant calls
keep their `patient_identifier` and get their `patient_id` (the key) the same way.

Names on the writer's connection: `arriving` (this batch's patients' identifiers, a temporary
table that lives from `link_resources` to `link_variants` within one batch), and, registered
and dropped by the method that uses them, `batch_patients`, `links`, `landing_keys`, `held`,
`released`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import Window
from connectors.errors import ConfigError
from harmonize.records import key_reference
from twin_store.connection import literal, one
from twin_store.prepare import BY_IDENTIFIER, PreparedBatch
from twin_store.runs import RunReport
from twin_store.views import standard_views, views_read

VARIANTS_WAIT = """SELECT count(*) > 0 FROM twin.genomic_variant
    WHERE patient_id IS NULL AND patient_identifier IS NOT NULL"""
"""Whether some variant call's sample names a patient identifier no Patient has yet."""


class PatientLinker:
    """Links on the writer's connection, in the caller's transaction. It remembers whether any
    record waits (held resources, variant calls), so a batch with nothing to link looks at none."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, variants_wait: bool) -> None:
        self.con = con
        self.has_held = bool(one(con, "SELECT count(*) > 0 FROM twin.held_resource")[0])
        self.variants_wait = variants_wait

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """After a failed batch what is remembered may be stale: the next batch looks."""
        try:
            yield
        except BaseException:
            self.has_held = self.variants_wait = True
            raise

    def needed(self, links: pa.Table, variants_by_identifier: bool) -> bool:
        """Whether this batch has anything to link or release."""
        return bool(len(links)) or self.has_held or self.variants_wait or variants_by_identifier

    def link_resources(
        self,
        run: RunReport,
        resources: pa.Table,
        links: pa.Table,
        counts: Counter[str],
        window: Window | None,
    ) -> pa.Table:
        """Give each resource that names its patient by identifier (lab, genomic) the reference
        of the twin's Patient with that identifier, known or arriving in this batch. Those whose
        patient has not arrived wait in `held_resource` and are released into the batch that
        brings it. Returns the resources to land."""
        con = self.con
        patients = resources.filter(pc.equal(resources["resource_type"], "Patient"))
        con.register("batch_patients", patients)
        con.register("links", links)
        try:
            return self._link(run, resources, patients, links, counts, window)
        finally:
            for name in ("batch_patients", "links"):
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)

    def _link(
        self,
        run: RunReport,
        resources: pa.Table,
        patients: pa.Table,
        links: pa.Table,
        counts: Counter[str],
        window: Window | None,
    ) -> pa.Table:
        con = self.con
        index = next(view for view in standard_views() if view.name == "patient_identifier")
        views_read(con, f"SELECT *, {literal(run.source)} AS source FROM batch_patients")
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
                      AND id NOT IN (SELECT $source || '/' || id FROM batch_patients)) GROUP BY ALL)
            SELECT l.pos, k.patient_id, l.system, l.value FROM links l
            LEFT JOIN known k ON k.system IS NOT DISTINCT FROM l.system AND k.value = l.value
            ORDER BY l.pos""",
            {"source": run.source},
        ).to_arrow_table()
        waiting = resolved.filter(pc.is_null(resolved["patient_id"]))
        found = resolved.filter(pc.is_valid(resolved["patient_id"]))
        if self.has_held:  # a copy landing now (linked or held again) replaces an older held one
            self._replace_held(run, resources, window)
        if len(waiting):
            self._hold(run, resources.take(waiting["pos"]), waiting, counts)
        linked = with_subject(resources.take(found["pos"]), found["patient_id"])
        keep = pc.invert(pc.is_in(pa.array(range(len(resources)), pa.int64()), resolved["pos"]))
        landing = [resources.filter(keep), linked]
        if self.has_held and len(patients):
            released = self._release(counts)
            if len(released):
                # They keep the source and run that read them (see ResourceWriter.upsert).
                landing = [
                    t.append_column("read_by", pa.nulls(len(t), pa.string())).append_column(
                        "read_in", pa.nulls(len(t), pa.string())
                    )
                    for t in landing
                ] + [released]
        return pa.concat_tables([t.cast(landing[-1].schema) for t in landing])

    def _replace_held(self, run: RunReport, resources: pa.Table, window: Window | None) -> None:
        landing_keys = resources.select(["resource_type", "id", "last_updated"])
        if window:  # copies outside a backfill's window do not land, so replace nothing
            at = resources["window_time"]
            landing_keys = landing_keys.filter(
                pc.and_(pc.greater_equal(at, window.since), pc.less(at, window.until))
            )
        self.con.register("landing_keys", landing_keys)
        self.con.execute(
            """DELETE FROM twin.held_resource h USING landing_keys b
            WHERE h.source = $source AND h.resource_type = b.resource_type AND h.id = b.id
              AND coalesce(b.last_updated >= h.last_updated, true)""",
            {"source": run.source},
        )
        self.con.unregister("landing_keys")

    def _hold(self, run: RunReport, held: pa.Table, waiting: pa.Table, counts: Counter[str]) -> None:
        self.con.register(
            "held",
            held.append_column("link_system", waiting["system"]).append_column(
                "link_value", waiting["value"]
            ),
        )
        # A newer copy already waiting (it was kept above) stays; this older one is superseded.
        (kept,) = self.con.execute(
            """INSERT INTO twin.held_resource
            SELECT link_system, link_value, $source, $run_id, now(), * EXCLUDE (link_system, link_value)
            FROM held w WHERE NOT EXISTS (
                SELECT 1 FROM twin.held_resource h
                WHERE h.source = $source AND h.resource_type = w.resource_type AND h.id = w.id)""",
            {"source": run.source, "run_id": run.run_id},
        ).fetchone() or (0,)
        self.con.unregister("held")
        self.has_held = True
        counts.update(held=kept, superseded=len(waiting) - kept)

    def _release(self, counts: Counter[str]) -> pa.Table:
        """The held resources whose patient arrives in this batch, linked, and no longer held."""
        released = self.con.execute(
            """SELECT h.* EXCLUDE (link_system, link_value, source, run_id, held_at), a.patient_id,
                      h.source AS read_by, h.run_id AS read_in
            FROM twin.held_resource h JOIN arriving a
                ON a.system IS NOT DISTINCT FROM h.link_system AND a.value = h.link_value"""
        ).to_arrow_table()
        if not len(released):
            return released
        self.con.register("released", released)
        self.con.execute(
            """DELETE FROM twin.held_resource h USING released r
            WHERE h.source = r.read_by AND h.resource_type = r.resource_type AND h.id = r.id"""
        )
        self.con.unregister("released")
        counts["released"] += len(released)
        return with_subject(released.drop(["patient_id"]), released["patient_id"])

    def link_variants(self) -> int:
        """Variant calls of samples named by patient identifier get the twin's Patient key once
        it is known (stored, or `arriving` in this batch); returns how many did."""
        (linked,) = one(
            self.con,
            """UPDATE twin.genomic_variant t SET patient_id = k.patient_id
            FROM (SELECT system || '|' || value AS identifier, min(patient_id) AS patient_id
                  FROM (FROM arriving UNION ALL SELECT system, value, id FROM twin.patient_identifier)
                  GROUP BY ALL) k
            WHERE t.patient_id IS NULL AND t.patient_identifier = k.identifier""",
        )
        self.variants_wait = bool(one(self.con, VARIANTS_WAIT)[0])
        return linked


class PatientKeys:
    """The key of the twin's Patient that a wearable source names in its config: a key
    (`ehr/p1`) as it is; a plain id, the key of the one source that has a Patient of that id, or
    with none, the wearable source's own twin (`<source>/<id>`). A plain id that several sources
    have is a config error. Resolved once per writer and id."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._known: dict[tuple[str, str], str] = {}

    def of(self, source: str, ids: list[str]) -> dict[str, str]:
        plain = [i for i in ids if "/" not in i and (source, i) not in self._known]
        if plain:
            found = dict(
                self.con.execute(
                    """SELECT id, list(DISTINCT source ORDER BY source) FROM twin.fhir_resource
                    WHERE resource_type = 'Patient' AND id IN (SELECT unnest($ids)) GROUP BY id""",
                    {"ids": plain},
                ).fetchall()
            )
            for id_ in plain:
                sources = found.get(id_) or [source]
                if len(sources) > 1:  # the id stays out of the message (it may identify someone)
                    raise ConfigError(
                        f"sources.{source}",
                        f"a patient named by a plain id is a Patient of several sources "
                        f"({', '.join(sources)}); name it by its key, <source>/<id>",
                    )
                self._known[source, id_] = f"{sources[0]}/{id_}"
        return {i: i if "/" in i else self._known[source, i] for i in ids}

    def keyed(self, source: str, batch: PreparedBatch) -> PreparedBatch:
        """The batch's samples, vendor figures and their summary with patient keys."""
        tables = [t for t in (batch.samples, batch.reported) if t is not None]
        ids = sorted({p for t in tables for p in pc.unique(t["patient_id"]).to_pylist()})
        keys = self.of(source, ids)
        if all(k == v for k, v in keys.items()):
            return batch
        plain, keyed = pa.array(list(keys), pa.string()), pa.array(list(keys.values()), pa.string())

        def rekeyed(table: pa.Table) -> pa.Table:
            at = table.schema.get_field_index("patient_id")
            column = pc.take(keyed, pc.index_in(table["patient_id"], plain))
            return table.set_column(at, table.schema.field(at), column)

        summary = batch.sample_summary
        if summary is not None:
            summary = replace(summary, spans=rekeyed(summary.spans), device_days=rekeyed(summary.device_days))
        return replace(
            batch,
            samples=None if batch.samples is None else rekeyed(batch.samples),
            reported=None if batch.reported is None else rekeyed(batch.reported),
            sample_summary=summary,
        )


def with_subject(resources: pa.Table, patient_keys: pa.ChunkedArray | pa.Array) -> pa.Table:
    """The resources with `subject.reference` set to their Patient (named by its key: the
    reference names its source), the identifier kept."""
    texts = [
        text.replace(BY_IDENTIFIER, f'"subject":{{"reference":"{key_reference(key)}","identifier":', 1)
        for text, key in zip(resources["resource"].to_pylist(), patient_keys.to_pylist(), strict=True)
    ]
    column = resources.schema.get_field_index("resource")
    return resources.set_column(column, "resource", pa.array(texts, pa.string()))
