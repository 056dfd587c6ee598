"""Every table of the store, created on first open, and what brings a store an earlier twinhub
wrote up to date (on its next write; readers never change it). The run records live beside the
DuckLake (`runs`).

The standard views are tables too (`twin_store.views`): a table's comment holds its view's title
and a hash of its definition, and a table whose definition changed is rebuilt from the raw
resources.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from twin_store import runs
from twin_store.connection import CATALOG, Transaction, literal, one
from twin_store.runs import COUNTS
from twin_store.views import standard_views, views_read

log = logging.getLogger(__name__)

RESOURCES_SQL = """
CREATE TABLE IF NOT EXISTS twin.fhir_resource (
    resource_type VARCHAR, id VARCHAR, version_id INTEGER, meta_version_id VARCHAR,
    last_updated TIMESTAMPTZ, source VARCHAR, run_id VARCHAR, content_hash UBIGINT,
    ingested_at TIMESTAMPTZ, resource VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.fhir_deletion (
    resource_type VARCHAR, id VARCHAR, deleted_at TIMESTAMPTZ, source VARCHAR, run_id VARCHAR,
    origin VARCHAR, recorded_at TIMESTAMPTZ
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
"""
GENOMICS_SQL = """
CREATE TABLE IF NOT EXISTS twin.genomic_variant (
    source VARCHAR, file VARCHAR, sample VARCHAR, patient_id VARCHAR, assembly VARCHAR, chrom VARCHAR,
    pos BIGINT, variant_id VARCHAR, ref VARCHAR, alt VARCHAR, genotype VARCHAR, zygosity VARCHAR,
    phase_set BIGINT, quality DOUBLE, filter VARCHAR, gene VARCHAR, hgvs_c VARCHAR, hgvs_p VARCHAR,
    clinvar_significance VARCHAR, clinvar_allele_id VARCHAR, run_id VARCHAR, ingested_at TIMESTAMPTZ,
    patient_identifier VARCHAR
);
"""
WEARABLES_SQL = """
CREATE TABLE IF NOT EXISTS twin.wearable_sample (
    source VARCHAR, patient_id VARCHAR, device VARCHAR, metric VARCHAR, loinc_code VARCHAR,
    start_time TIMESTAMPTZ, end_time TIMESTAMPTZ, utc_offset_minutes INTEGER, value DOUBLE,
    unit VARCHAR, origin VARCHAR, run_id VARCHAR, ingested_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS twin.wearable_daily (
    source VARCHAR, patient_id VARCHAR, metric VARCHAR, day DATE, loinc_code VARCHAR, unit VARCHAR,
    value DOUBLE, samples BIGINT, min DOUBLE, max DOUBLE, mean DOUBLE, sum DOUBLE,
    first_start TIMESTAMPTZ, last_end TIMESTAMPTZ, utc_offset_minutes INTEGER, device VARCHAR,
    observation_id VARCHAR, run_id VARCHAR, computed_at TIMESTAMPTZ, fhir_pending BOOLEAN,
    reported DOUBLE
);
CREATE TABLE IF NOT EXISTS twin.wearable_reported (
    source VARCHAR, patient_id VARCHAR, metric VARCHAR, day DATE, loinc_code VARCHAR, unit VARCHAR,
    value DOUBLE, start_time TIMESTAMPTZ, end_time TIMESTAMPTZ, utc_offset_minutes INTEGER,
    device VARCHAR, origin VARCHAR, run_id VARCHAR, ingested_at TIMESTAMPTZ
);
"""
MODELS_SQL = """
CREATE TABLE IF NOT EXISTS twin.model_output (
    model VARCHAR, version VARCHAR, patient_id VARCHAR, computed_at TIMESTAMPTZ, input_snapshot_id BIGINT,
    status VARCHAR, value DOUBLE, outputs VARCHAR, reason VARCHAR, inputs VARCHAR[], resource_id VARCHAR,
    model_run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.model_run (
    model_run_id VARCHAR, model VARCHAR, version VARCHAR, trigger VARCHAR, started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ, since_snapshot_id BIGINT, input_snapshot_id BIGINT, scope VARCHAR,
    patients BIGINT, ok BIGINT, refused BIGINT, errors BIGINT, seconds DOUBLE, status VARCHAR, error VARCHAR
);
CREATE TABLE IF NOT EXISTS twin.model_training (
    model VARCHAR, version VARCHAR, training INTEGER, trained_at TIMESTAMPTZ, training_snapshot_id BIGINT,
    patients BIGINT, metrics VARCHAR, params VARCHAR
);
"""
RUNS_SQL = f"""
CREATE TABLE IF NOT EXISTS twin.ingest_batch (
    run_id VARCHAR, source VARCHAR, batch_no INTEGER, committed_at TIMESTAMPTZ, watermark VARCHAR,
    {", ".join(f"{c} BIGINT" for c in COUNTS)}
);
CREATE VIEW IF NOT EXISTS twin.sync_state AS
    SELECT source, arg_max(watermark, (committed_at, batch_no)) AS watermark,
           arg_max(run_id, (committed_at, batch_no)) AS run_id, max(committed_at) AS updated_at
    FROM ingest_batch WHERE watermark IS NOT NULL GROUP BY source;
"""
SCHEMA_SQL = RESOURCES_SQL + GENOMICS_SQL + WEARABLES_SQL + MODELS_SQL + RUNS_SQL
STORE_TABLES = (
    "fhir_resource",
    "fhir_deletion",
    "genomic_variant",
    "held_resource",
    "quarantine",
    "ingest_warning",
    "ingest_batch",
    "wearable_sample",
    "wearable_daily",
    "wearable_reported",
    "model_output",
    "model_run",
    "model_training",
)
"""The tables the schema creates (the views' tables come on top): fewer means one is new."""


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create what is missing: a new store (or a new table) in one commit, not one per statement."""
    (tables,) = one(con, f"SELECT count(*) FROM duckdb_tables() WHERE database_name = '{CATALOG}'")
    if tables < len(STORE_TABLES):
        with Transaction(con, "create the store's tables"):
            con.execute(SCHEMA_SQL)
            # Raw JSON: lz4 writes twice as fast as the default snappy, and smaller.
            con.execute(f"CALL {CATALOG}.set_option('parquet_compression', 'lz4_raw')")


def migrate(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """Bring a store written by an earlier twinhub up to this schema."""
    columns = {
        (table, column)
        for table, column in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?", [CATALOG]
        ).fetchall()
    }
    if ("genomic_variant", "patient_identifier") not in columns:
        with Transaction(con, "migrate: genomic_variant.patient_identifier"):
            con.execute("ALTER TABLE twin.genomic_variant ADD COLUMN patient_identifier VARCHAR")
    if ("wearable_daily", "reported") not in columns:
        with Transaction(con, "migrate: wearable_daily.reported"):
            con.execute("ALTER TABLE twin.wearable_daily ADD COLUMN reported DOUBLE")
    if missing := [count for count in COUNTS if ("ingest_batch", count) not in columns]:
        with Transaction(con, "migrate: ingest_batch counts"):
            for count in missing:
                con.execute(f"ALTER TABLE twin.ingest_batch ADD COLUMN {count} BIGINT DEFAULT 0")
    if ("run_record", "run_id") in columns:
        # Run records move out of the DuckLake (`runs`): recording a run made a snapshot.
        runs.keep(root, con.execute(f"SELECT {RUN_RECORD_COLUMNS} FROM twin.run_record").fetchall())
        with Transaction(con, "migrate: run records move to runs.sqlite"):
            con.execute("DROP VIEW IF EXISTS twin.ingest_run")
            con.execute("DROP TABLE twin.run_record")


RUN_RECORD_COLUMNS = "run_id, source, flow, started_at, finished_at, status, snapshot_id, error"


def ensure_view_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create missing view tables; rebuild one whose definition changed (its comment differs)
    from the raw resources."""
    views_read(con, "SELECT NULL::VARCHAR AS resource_type, NULL::VARCHAR AS resource WHERE false")
    comments = dict(
        con.execute(
            "SELECT table_name, comment FROM duckdb_tables() WHERE database_name = ?", [CATALOG]
        ).fetchall()
    )
    stale = [view for view in standard_views() if comments.get(view.name, "") != view.comment]
    if not stale:
        return
    (has_resources,) = one(con, "SELECT count(*) > 0 FROM twin.fhir_resource")
    with Transaction(con, f"views: {', '.join(view.name for view in stale)} (re)built"):
        for view in stale:
            if view.name in comments:
                log.info("view %s changed definition; rebuilding its table", view.name)
                con.execute(f"DROP TABLE twin.{view.name}")
            con.execute(f"CREATE TABLE twin.{view.name} AS FROM ({view.sql}) LIMIT 0")
            con.execute(f"COMMENT ON TABLE twin.{view.name} IS {literal(view.comment)}")
            for column, comment in view.column_comments.items():
                con.execute(f'COMMENT ON COLUMN twin.{view.name}."{column}" IS {literal(comment)}')
            if has_resources:
                views_read(
                    con,
                    "SELECT resource_type, resource FROM twin.fhir_resource "
                    f"WHERE resource_type = '{view.resource_type}'",
                )
                con.execute(f"INSERT INTO twin.{view.name} {view.sql}")
