"""Variant calls: `genomic_variant`, one row per sample and carried alternate allele, upserted on
(source, sample, assembly, chrom, pos, ref, alt). Registered name: `variants` (the batch's rows)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from twin_store.runs import RunReport

CALLED_SAMPLES = (
    "SELECT source, sample, bool_or(patient_id IS NULL AND patient_identifier IS NOT NULL) "
    "FROM twin.genomic_variant GROUP BY ALL"
)
"""The samples each source has calls of, and whether some call waits for its patient."""


class VariantWriter:
    """Lands variant rows on the writer's connection, in the caller's transaction."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        called = con.execute(CALLED_SAMPLES).fetchall()
        self.any_waiting = any(waiting for _, _, waiting in called)
        """Whether some stored call waits for its patient (read once, as the writer opens)."""
        # (source, sample) of the stored calls. After a batch rolls back it may still name samples
        # the batch added, which only costs a look for calls to replace; it never misses one.
        self._called = {(source, sample) for source, sample, _ in called}

    def land(self, run: RunReport, variants: pa.Table) -> tuple[int, int]:
        """Upsert the rows; returns how many were new and how many replaced a row from an earlier
        read."""
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
            # A sample mapped to a patient by plain id names the source's own twin (the rule of
            # keys, see `resources`): the key is what the calls' DiagnosticReport names too.
            con.execute(
                "INSERT INTO twin.genomic_variant BY NAME "
                "SELECT $source AS source, * REPLACE (CASE WHEN contains(patient_id, '/') "
                "THEN patient_id ELSE $source || '/' || patient_id END AS patient_id), "
                "$run_id AS run_id, now() AS ingested_at FROM variants",
                {"source": run.source, "run_id": run.run_id},
            )
        finally:
            con.unregister("variants")
        self._called |= samples
        run.changed["genomic_variant"] += len(variants)
        run.patient_ids.update(
            p if "/" in p else f"{run.source}/{p}"
            for p in pc.unique(variants["patient_id"]).to_pylist()
            if p is not None
        )
        return len(variants) - replaced, replaced
