"""What the CLI shows of the store: runs, watermarks, counts, what waits, model outputs. Read-only
queries with bound parameters, each returning a lazy relation (or rows) on a `connect()`
connection, so the CLI holds no SQL."""

from __future__ import annotations

from datetime import date

import duckdb

from twin_store.runs import COUNTS
from twin_store.views import standard_views

EXAMPLE_QUERY = """SELECT code_display, value_unit, count(*) AS n, round(avg(value_numeric), 1) AS mean
FROM lab_result GROUP BY ALL ORDER BY n DESC LIMIT 5"""
"""The query the demo runs and shows, as a first taste of `twinhub sql`."""
TABLES = (
    "fhir_resource",
    *sorted(view.name for view in standard_views()),
    "genomic_variant",
    "wearable_sample",
    "wearable_daily",
    "wearable_reported",
    "model_output",
    "fhir_deletion",
    "quarantine",
)
"""The tables `status` counts the rows of."""

Relation = duckdb.DuckDBPyRelation
Con = duckdb.DuckDBPyConnection


def last_runs(con: Con, per_source: int = 3) -> Relation:
    """The last runs of each source with their counts and error, newest first."""
    return con.sql(
        f"""SELECT source, run_id, flow, status, started_at, finished_at,
                   round(epoch(finished_at - started_at), 1) AS secs, {", ".join(COUNTS)}, snapshot_id, error
            FROM ingest_run QUALIFY row_number() OVER (PARTITION BY source ORDER BY started_at DESC) <= $n
            ORDER BY source, started_at DESC""",
        params={"n": per_source},
    )


def failed_sources(con: Con) -> list[str]:
    """The sources whose last sync or backfill failed (what `status` exits non-zero for)."""
    rows = con.execute(
        """SELECT source FROM ingest_run WHERE flow IN ('sync', 'backfill')
           QUALIFY row_number() OVER (PARTITION BY source ORDER BY started_at DESC) = 1
               AND status = 'failed'
           ORDER BY source"""
    ).fetchall()
    return [source for (source,) in rows]


def watermarks(con: Con) -> list[tuple[str, object, str]]:
    """(source, when it last moved, the watermark's JSON) per source that has landed something."""
    return con.execute("SELECT source, updated_at, watermark FROM sync_state ORDER BY source").fetchall()


def table_counts(con: Con) -> Relation:
    """Rows per table; a store an earlier twinhub wrote lacks newer tables until its next write."""
    present = {name for (name,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    tables = [t for t in TABLES if t in present]
    return con.sql(
        " UNION ALL ".join(f"SELECT '{t}' AS table_name, count(*) AS rows FROM {t}" for t in tables)
    )


def waiting(con: Con) -> Relation:
    """Records that name a patient identifier no Patient has yet, per source and identifier system."""
    return con.sql(
        """SELECT source, 'FHIR resources' AS what, link_system AS identifier_system,
                  count(*) AS waiting, count(DISTINCT link_value) AS patients, min(held_at) AS since
           FROM held_resource GROUP BY ALL
           UNION ALL
           SELECT source, 'variant calls', split_part(patient_identifier, '|', 1), count(*),
                  count(DISTINCT patient_identifier), min(ingested_at)
           FROM genomic_variant WHERE patient_id IS NULL AND patient_identifier IS NOT NULL
           GROUP BY ALL ORDER BY 1, 2, 3"""
    )


def quarantine_reasons(con: Con, per_source: int = 5) -> Relation:
    """Per source, its most frequent quarantine reasons with their lines, and its totals: every
    line (`source_lines`) and how many distinct reasons (`reasons`)."""
    return con.sql(
        """WITH reasons AS (SELECT source, reason, count(*) AS lines FROM quarantine GROUP BY ALL)
           SELECT source, reason, lines, sum(lines) OVER (PARTITION BY source) AS source_lines,
                  count(*) OVER (PARTITION BY source) AS reasons
           FROM reasons
           QUALIFY row_number() OVER (PARTITION BY source ORDER BY lines DESC, reason) <= $n
           ORDER BY source, lines DESC, reason""",
        params={"n": per_source},
    )


def quarantined_lines(con: Con, source: str | None, reason: str | None, limit: int) -> tuple[int, Relation]:
    """How many quarantined lines match, and the first `limit` of them (source, file, line,
    reason, when), in source, file and line order. `reason` matches a part, any case."""
    match = """($source IS NULL OR source = $source)
               AND ($reason IS NULL OR contains(lower(reason), lower($reason)))"""
    params = {"source": source, "reason": reason}
    (total,) = con.execute(f"SELECT count(*) FROM quarantine WHERE {match}", params).fetchone() or (0,)
    return int(total), con.sql(
        f"""SELECT source, file, line_no, reason, quarantined_at FROM quarantine WHERE {match}
            ORDER BY source, file, line_no, quarantined_at LIMIT $limit""",
        params={**params, "limit": limit},
    )


def days_awaiting_fhir(con: Con) -> int:
    """Wearable days rolled up whose FHIR Observation the next sync makes."""
    (pending,) = con.sql("SELECT count(*) FROM wearable_daily WHERE fhir_pending").fetchone() or (0,)
    return int(pending)


def model_runs(con: Con, per_model: int = 3) -> Relation:
    """The last refreshes of each model, newest first."""
    return con.sql(
        """SELECT model, version, trigger, finished_at, input_snapshot_id, scope, patients, ok, refused,
                  errors, round(seconds, 1) AS secs
           FROM model_run QUALIFY row_number() OVER (PARTITION BY model ORDER BY finished_at DESC) <= $n
           ORDER BY model, finished_at DESC""",
        params={"n": per_model},
    )


def refreshes_of(con: Con, trigger: str) -> Relation:
    """The model refreshes one trigger ran (a sync's: `sync <run id>`), by model."""
    return con.sql(
        """SELECT model, version, scope, patients, ok, refused, errors, round(seconds, 1) AS secs
           FROM model_run WHERE trigger = $trigger ORDER BY model, finished_at""",
        params={"trigger": trigger},
    )


def has_outputs(con: Con, model: str) -> bool:
    """Whether the store holds outputs of `model` (installed or not any more)."""
    row = con.execute("SELECT count(*) > 0 FROM model_output WHERE model = ?", [model]).fetchone()
    return bool(row and row[0])


def last_model_runs(con: Con) -> dict[str, tuple[object, ...]]:
    """Per model, its last refresh: version, when, snapshot, scope, ok, refused, errors."""
    rows = con.sql(
        """SELECT model, version, finished_at, input_snapshot_id, scope, ok, refused, errors FROM model_run
           QUALIFY row_number() OVER (PARTITION BY model ORDER BY finished_at DESC) = 1"""
    ).fetchall()
    return {row[0]: row[1:] for row in rows}


def latest_outputs(con: Con, model: str, patients: list[str]) -> Relation:
    """Each patient's latest output of `model`."""
    return con.sql(
        """SELECT patient_id, version, status, round(value, 4) AS value, reason, input_snapshot_id
           FROM model_output WHERE model = $model AND list_contains($patients, patient_id)
           QUALIFY row_number() OVER (PARTITION BY patient_id ORDER BY input_snapshot_id DESC) = 1""",
        params={"model": model, "patients": patients},
    )


def output_history(con: Con, model: str, patient: str | None, limit: int) -> Relation:
    """Outputs of `model`, newest first, with their lineage: the input snapshot and the rows used."""
    return con.sql(
        """SELECT o.patient_id, o.version, o.status, round(o.value, 4) AS value, o.computed_at,
                  o.input_snapshot_id, s.snapshot_time AS inputs_as_of,
                  coalesce(o.reason, o.outputs) AS detail,
                  len(o.inputs) AS input_rows, o.inputs[1:3] AS first_inputs
           FROM model_output o LEFT JOIN twin.snapshots() s ON s.snapshot_id = o.input_snapshot_id
           WHERE o.model = $model AND ($patient IS NULL OR o.patient_id = $patient)
           ORDER BY o.computed_at DESC, o.patient_id LIMIT $limit""",
        params={"model": model, "patient": patient, "limit": limit},
    )


def model_summary(con: Con) -> Relation:
    """Per model, where each patient stands now (their latest output: a patient refused once and
    computed later counts as computed, once): patients computed, refused and in error, the
    median value, the latest snapshot."""
    return con.sql(
        """WITH latest AS (
               FROM model_output QUALIFY row_number() OVER (
                   PARTITION BY model, patient_id ORDER BY input_snapshot_id DESC, computed_at DESC) = 1)
           SELECT model, string_agg(DISTINCT version, ', ' ORDER BY version) AS version,
                  count(*) FILTER (status = 'ok') AS computed,
                  count(*) FILTER (status = 'refused') AS refused,
                  count(*) FILTER (status = 'error') AS errors,
                  round(median(value) FILTER (status = 'ok'), 4) AS median_value,
                  max(input_snapshot_id) AS snapshot
           FROM latest GROUP BY model ORDER BY model"""
    )


def living_adults(con: Con, born_before: date, limit: int) -> list[str]:
    """Patients alive and born before `born_before`, in id order (the demo gives them a Fitbit)."""
    rows = con.execute(
        """SELECT id FROM patient WHERE deceased_at IS NULL AND NOT coalesce(deceased, false)
           AND birth_date < ? ORDER BY id LIMIT ?""",
        [born_before.isoformat(), limit],  # FHIR dates are text: 1985, 1985-02, 1985-02-14
    ).fetchall()
    return [p for (p,) in rows]


def last_observation_day(con: Con) -> date | None:
    (last,) = con.sql("SELECT max(CAST(effective AS DATE)) FROM observation").fetchone() or (None,)
    return last if isinstance(last, date) else None
