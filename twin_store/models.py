"""Twin model refreshes in the store: what changed since a model last ran, its inputs pinned to
one snapshot, and its outputs (rows and FHIR) with their lineage.

What changed comes from DuckLake's change feed (`table_changes`) of the tables the model reads,
between the snapshot it last computed from and now: a patient-scope model computes only the
patients whose rows changed, a population model everything once anything changed, and a new
model version every patient. The feed, not the event that woke the refresh, decides, so a
missed or repeated event changes nothing. A model's own outputs (its FHIR lands in the views)
never count as a change. The inputs are read `AT (VERSION => snapshot)`: an output's
`input_snapshot_id` leads back, by time travel, to the exact rows that produced it.

Tables: `model_output` (one row per model, version, patient and input snapshot), `model_run`
(one per refresh, with counts and timing), `model_training` (fitted parameters of models that
learn, with their training snapshot and metrics).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from connectors.errors import TwinhubError
from harmonize.models.twin_model import OUTPUT_COLUMNS, TwinModel, output_id, output_resources
from twin_store.runs import RunReport
from twin_store.store import TwinStore

log = logging.getLogger(__name__)

Scope = Literal["full", "changed", "unchanged", "requested"]


@dataclass(kw_only=True)
class ModelRunReport:
    """What one refresh of one model did."""

    model: str
    version: str
    model_run_id: str
    trigger: str
    """What asked for it: the event of a sync, an in-process sync, the CLI."""
    input_snapshot_id: int
    since_snapshot_id: int | None
    scope: Scope
    counts: Counter[str] = field(default_factory=Counter)
    """patients computed, and how many came out ok, refused and in error."""
    seconds: float = 0.0
    trained: bool = False


def refresh(
    store: TwinStore,
    model: TwinModel,
    *,
    trigger: str,
    retrain_after: int | None = None,
    patients: list[str] | None = None,
    at: int | None = None,
) -> ModelRunReport:
    """Bring one model's outputs up to the store's current snapshot, or to snapshot `at` (the
    one a sync's event names), see the module doc; with `patients`, compute those whatever
    changed (an output that exists for that snapshot is not written twice)."""
    started, begun = time.perf_counter(), datetime.now(UTC)
    con = store.con
    now = store.snapshot_id() if at is None else min(at, store.snapshot_id())
    training = _latest_training(con, model) if model.trainable else None
    version = model.version if training is None else f"{model.version}+t{training[0]}"
    last = con.execute(
        """SELECT version, input_snapshot_id FROM twin.model_run
        WHERE model = ? AND status = 'succeeded' AND scope <> 'requested'
        ORDER BY finished_at DESC LIMIT 1""",
        [model.name],
    ).fetchone()
    report = ModelRunReport(
        model=model.name,
        version=version,
        model_run_id=f"{begun:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
        trigger=trigger,
        input_snapshot_id=now,
        since_snapshot_id=last[1] if last else None,
        scope="full",
    )
    nothing = pl.DataFrame(schema=OUTPUT_COLUMNS)
    _pin(con, model, now)
    try:
        scope: list[str] | None = None  # None: everyone
        if patients is not None:
            report.scope, scope = "requested", patients
        elif last is not None and last[0] == version:
            # An event may come late, after a later snapshot was computed: nothing is older news.
            changed = _changed_patients(con, model, last[1], now) if last[1] < now else set()
            if changed is not None and not changed:
                report.scope = "unchanged"
                return _record(store, model, report, begun, started, nothing)
            if changed is not None and model.scope == "patient":
                report.scope, scope = "changed", sorted(changed)
        everyone = _everyone(con, model)
        if patients is not None:
            _check_known(model, patients, everyone)
        params = None
        if model.trainable:
            params, training = _trained(store, model, training, everyone, now, retrain_after)
            if f"{model.version}+t{training[0]}" != version:  # just (re)trained: everyone again
                report.version, report.trained, report.scope = f"{model.version}+t{training[0]}", True, "full"
                scope = None
        chosen = everyone if scope is None else scope
        con.register("scope_patients", pa.table({"patient_id": pa.array(chosen, pa.string())}))
        try:
            rows = con.execute(model.query).pl()
        finally:
            con.unregister("scope_patients")
        return _record(store, model, report, begun, started, _compute(model, rows, params))
    finally:
        _unpin(con, model)


def _pin(con: duckdb.DuckDBPyConnection, model: TwinModel, snapshot: int) -> None:
    """The tables the model reads, as of `snapshot`, under their own names."""
    for table in {*model.reads, "patient"}:
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {table} AS FROM twin.{table} AT (VERSION => {int(snapshot)})"
        )


def _everyone(con: duckdb.DuckDBPyConnection, model: TwinModel) -> list[str]:
    """Every patient the model's (pinned) tables are about: the Patient resources', and those
    named in its tables with a patient column (a wearable's twin may have no Patient resource)."""
    selects = ["SELECT id AS patient_id FROM patient"]
    for table in sorted(set(model.reads) - {"patient"}):
        if "patient_id" in con.execute(f"FROM {table} LIMIT 0").pl().columns:
            selects.append(f"SELECT patient_id FROM {table}")
    query = f"SELECT DISTINCT patient_id FROM ({' UNION ALL '.join(selects)}) WHERE patient_id IS NOT NULL"
    return [p for (p,) in con.execute(f"{query} ORDER BY 1").fetchall()]


def _check_known(model: TwinModel, patients: list[str], everyone: list[str]) -> None:
    """Refuse patients the store does not know: computing them would write outputs (refusals)
    for patients who do not exist. The message counts them; the ids stay out of it."""
    known = set(everyone)
    unknown = [n for n, p in enumerate(patients, start=1) if p not in known]
    if unknown:
        which = ", ".join(f"#{n}" for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        who = (
            "the patient asked for is"
            if len(patients) == 1
            else f"{len(unknown)} of the {len(patients)} patients asked for ({which}) "
            + ("is" if len(unknown) == 1 else "are")
        )
        listing = 'twinhub sql "SELECT id FROM patient"'
        raise TwinhubError(f"model {model.name}: {who} not in the store; list them with: {listing}")


def _unpin(con: duckdb.DuckDBPyConnection, model: TwinModel) -> None:
    for table in {*model.reads, "patient"}:
        con.execute(f"DROP VIEW IF EXISTS temp.{table}")


def _changed_patients(
    con: duckdb.DuckDBPyConnection, model: TwinModel, since: int, now: int
) -> set[str] | None:
    """The patients whose rows in the model's tables changed after `since` up to `now`; None
    when the change feed cannot say (a table rebuilt or new): everyone."""
    try:
        return patients_changed(con, model.reads, since, now)
    except duckdb.Error as e:
        log.info("model %s: no change feed (%s); computing everyone", model.name, e)
        return None


def patients_changed(con: duckdb.DuckDBPyConnection, tables: Iterable[str], since: int, now: int) -> set[str]:
    """The patients whose rows in `tables` changed after snapshot `since` up to `now`, from
    DuckLake's change feed. Tables without a patient column are skipped; a model's own outputs
    (its FHIR lands in the views) never count."""
    changed: set[str] = set()
    if now <= since:
        return changed
    for table in tables:
        named = con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = 'twin' AND table_name = ?",
            [table],
        )
        columns = {c for (c,) in named.fetchall()}
        patient = "patient_id" if "patient_id" in columns else "id" if table == "patient" else None
        if patient is None:
            continue
        # A view's id is the key `<source>/<id>`; a model lands its FHIR as source `model:<name>`.
        own = "AND NOT starts_with(id, 'model:')" if "id" in columns else ""
        rows = con.execute(
            f"""SELECT DISTINCT {patient} FROM twin.table_changes('{table}', {since + 1}, {now})
            WHERE {patient} IS NOT NULL {own}"""
        ).fetchall()
        changed.update(p for (p,) in rows)
    return changed


def _compute(model: TwinModel, rows: pl.DataFrame, params: dict[str, Any] | None) -> pl.DataFrame:
    """The model on every patient's rows at once; if that raises, patient by patient, so one
    patient's error is recorded as theirs and the others still get their outputs."""
    try:
        return _checked(model.compute(rows, params))
    except Exception:
        log.warning("model %s failed on the batch; computing patient by patient", model.name)
    outputs = []
    for patient, group in rows.group_by("patient_id", maintain_order=True):
        try:
            outputs.append(_checked(model.compute(group, params)))
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            row = {
                "patient_id": patient[0],
                "status": "error",
                "value": None,
                "outputs": None,
                "reason": reason,
                "inputs": None,
            }
            outputs.append(pl.DataFrame([row], schema=OUTPUT_COLUMNS))
    return pl.concat(outputs) if outputs else pl.DataFrame(schema=OUTPUT_COLUMNS)


def _checked(outputs: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in OUTPUT_COLUMNS if c not in outputs.columns]
    if missing:
        raise ValueError(
            f"a model's compute must return the columns {', '.join(OUTPUT_COLUMNS)}; missing {missing}"
        )
    return outputs.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_COLUMNS)  # type: ignore[arg-type]


def _latest_training(
    con: duckdb.DuckDBPyConnection, model: TwinModel
) -> tuple[int, int, dict[str, Any]] | None:
    row = con.execute(
        """SELECT training, patients, params FROM twin.model_training WHERE model = ? AND version = ?
        ORDER BY training DESC LIMIT 1""",
        [model.name, model.version],
    ).fetchone()
    return (int(row[0]), int(row[1]), orjson.loads(row[2])) if row else None


def _trained(
    store: TwinStore,
    model: TwinModel,
    training: tuple[int, int, dict[str, Any]] | None,
    everyone: list[str],
    now: int,
    retrain_after: int | None,
) -> tuple[dict[str, Any], tuple[int, int, dict[str, Any]]]:
    """The fitted parameters to compute with: the last training's, or a new fit on every patient
    when there is none or enough patients arrived since (`retrain_after`, else the model's)."""
    threshold = retrain_after if retrain_after is not None else model.retrain_after
    if training is not None and len(everyone) - training[1] < threshold:
        return training[2], training
    assert model.train is not None
    con = store.con
    con.register("scope_patients", pa.table({"patient_id": pa.array(everyone, pa.string())}))
    try:
        rows = con.execute(model.query).pl()
    finally:
        con.unregister("scope_patients")
    fitted = model.train(rows)
    number = 1 if training is None else training[0] + 1
    with store.transaction(f"train model {model.name} {model.version}: training {number}"):
        con.execute(
            "INSERT INTO twin.model_training VALUES (?, ?, ?, now(), ?, ?, ?, ?)",
            [
                model.name,
                model.version,
                number,
                now,
                len(everyone),
                orjson.dumps(fitted.metrics).decode(),
                orjson.dumps(fitted.params).decode(),
            ],
        )
    log.info(
        "model %s: trained (training %s) on %s patients: %s",
        model.name,
        number,
        len(everyone),
        fitted.metrics,
    )
    return fitted.params, (number, len(everyone), fitted.params)


def _record(
    store: TwinStore,
    model: TwinModel,
    report: ModelRunReport,
    begun: datetime,
    started: float,
    outputs: pl.DataFrame,
) -> ModelRunReport:
    """Land the outputs, their FHIR and the run's row in one transaction."""
    con = store.con
    counts = outputs.group_by("status").len().rows()
    report.counts.update({status: n for status, n in counts})
    report.counts["patients"] = len(outputs)
    snapshot_time = con.execute(
        f"SELECT snapshot_time FROM twin.snapshots() WHERE snapshot_id = {int(report.input_snapshot_id)}"
    ).fetchone()
    as_of = snapshot_time[0] if snapshot_time else begun
    # A refusal is written over an earlier figure (so it never stands as current), else not at all.
    ours = con.execute(
        "SELECT id FROM twin.fhir_resource WHERE resource_type = ? AND source = ?",
        [model.fhir.resource, f"model:{model.name}"],
    )
    stored = {i for (i,) in ours.fetchall()}
    refused_new = pl.col("status") == "refused"
    ids_of = pl.col("patient_id").map_elements(lambda p: output_id(model.name, p), return_dtype=pl.String)
    written = outputs.filter(~(refused_new & ~ids_of.is_in(list(stored))))
    resources = output_resources(model, report.version, written, as_of)
    ids = [
        output_id(model.name, p) if s != "error" else None
        for p, s in outputs.select("patient_id", "status").rows()
    ]
    table = outputs.with_columns(pl.Series("resource_id", ids, pl.String)).to_arrow()
    about = {"model_run_id": report.model_run_id, "model": model.name, "trigger": report.trigger}
    with store.transaction(f"refresh model {model.name} run {report.model_run_id}", about):
        if len(table):
            con.register("outputs", table)
            try:
                con.execute(
                    """INSERT INTO twin.model_output
                    SELECT $model, $version, o.patient_id, now(), $snapshot, o.status, o.value, o.outputs,
                           o.reason, o.inputs, o.resource_id, $run
                    FROM outputs o WHERE NOT EXISTS (
                        SELECT 1 FROM twin.model_output m
                        WHERE (m.model, m.version, m.patient_id, m.input_snapshot_id)
                            = ($model, $version, o.patient_id, $snapshot))""",
                    {
                        "model": model.name,
                        "version": report.version,
                        "snapshot": report.input_snapshot_id,
                        "run": report.model_run_id,
                    },
                )
            finally:
                con.unregister("outputs")
        if resources:
            store.land_derived(_as_run(report), resources, origin=f"model {model.name}")
        report.seconds = time.perf_counter() - started
        con.execute(
            "INSERT INTO twin.model_run VALUES "
            "(?, ?, ?, ?, ?, now(), ?, ?, ?, ?, ?, ?, ?, ?, 'succeeded', NULL)",
            [
                report.model_run_id,
                model.name,
                report.version,
                report.trigger,
                begun,
                report.since_snapshot_id,
                report.input_snapshot_id,
                report.scope,
                report.counts["patients"],
                report.counts["ok"],
                report.counts["refused"],
                report.counts["error"],
                report.seconds,
            ],
        )
    return report


def _as_run(report: ModelRunReport) -> RunReport:
    return RunReport(run_id=report.model_run_id, source=f"model:{report.model}", flow="refresh")
