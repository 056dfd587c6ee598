"""The wearable tables: raw samples in `wearable_sample`, their daily rollups in `wearable_daily`.

Samples are keyed on (source, patient_id, metric, start_time): a sample pulled again replaces
the stored one if it changed and writes nothing if not, so overlapping pulls never double count.
After each batch the days it touched (the local day of a sample, by its UTC offset) are rolled
up again, in the batch's transaction, and flagged `fhir_pending`: the store makes their FHIR
Observations after the batches (`pending_days`, `fhir_made`), so a crash in between leaves
flags that the next run clears, never a day without its Observation.

Where the vendor reports its own figure for a day (Fitbit's daily total beside its hourly
steps), that lands in `wearable_reported` and is the day's `value`, with the samples' own in
`sum`: a device's daily total may count what its intraday data misses (the days the two differ
show where). Reports and samples may come in either order, and either one updates the day.

The writer keeps a copy of each series' time span (`SampleWriter.coverage`): a batch whose
samples all fall outside the stored spans (new data after old, the usual case) is appended
without looking up a single stored sample.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connectors.base import Window
from harmonize.wearables.metrics import DAILY_SCHEMA, daily_id, metrics, totals
from twin_store.connection import one

SPAN_KEYS = ("patient_id", "metric", "first_start", "last_start")
SAME = " AND ".join(
    f"i.{c} IS NOT DISTINCT FROM s.{c}"
    for c in ("device", "end_time", "utc_offset_minutes", "value", "unit", "loinc_code")
)
NIGHT_METRICS = ", ".join(f"'{m.name}'" for m in metrics().values() if m.day_of == "night") or "NULL"
LOCAL_DAY = f"""DATE '1970-01-01' + CAST((epoch_us(CASE WHEN s.metric IN ({NIGHT_METRICS})
        THEN coalesce(s.end_time, s.start_time) + INTERVAL 6 HOUR ELSE s.start_time END)
        + 60000000::BIGINT * coalesce(s.utc_offset_minutes, 0) + 3155760000000000) // 86400000000 - 36525
        AS INTEGER)"""
"""The local calendar day a sample counts to: its start's, or for sleep the morning its night
ends (a stretch ending after 18:00 belongs to the next day's night). Epoch arithmetic in whole
days, not a time-zone cast: the offset is the sample's own (the shift by 36,525 days makes the
integer division floor for days back to 1870)."""


@functools.cache
def _metric_info() -> pa.Table:
    rows = [(m.name, m.daily) for m in metrics().values()]
    names, rollup = zip(*rows, strict=True)
    return pa.table({"metric": names, "rollup": rollup})


DEVICE_DAYS = f"""
    SELECT s.patient_id, s.metric, {LOCAL_DAY} AS day, s.device, any_value(s.loinc_code) AS loinc_code,
           any_value(s.unit) AS unit, count(*) AS n, min(s.value) AS min, max(s.value) AS max,
           sum(s.value) AS sum, arg_max(s.value, s.start_time) AS last, max(s.start_time) AS last_start,
           min(s.start_time) AS first_start, max(coalesce(s.end_time, s.start_time)) AS last_end,
           arg_min(s.utc_offset_minutes, s.start_time) AS utc_offset_minutes
    FROM {{samples}} s {{where}}
    GROUP BY ALL"""
"""Per device first: where two devices count the same thing on a day (a phone and a watch both
counting steps), a sum takes one device's, the one with most samples, never both."""
DAILY = """
    SELECT $source AS source, patient_id, metric, day, any_value(loinc_code) AS loinc_code,
           any_value(unit) AS unit,
           CASE any_value(rollup)
               WHEN 'sum' THEN arg_max(sum, (n, sum)) WHEN 'mean' THEN sum(sum) / sum(n)
               WHEN 'min' THEN min(min) WHEN 'max' THEN max(max) ELSE arg_max(last, last_start) END AS value,
           CASE WHEN any_value(rollup) = 'sum' THEN arg_max(n, (n, sum)) ELSE sum(n) END AS samples,
           CASE WHEN any_value(rollup) = 'sum' THEN arg_max(min, (n, sum)) ELSE min(min) END AS min,
           CASE WHEN any_value(rollup) = 'sum' THEN arg_max(max, (n, sum)) ELSE max(max) END AS max,
           CASE WHEN any_value(rollup) = 'sum' THEN arg_max(sum / n, (n, sum))
                ELSE sum(sum) / sum(n) END AS mean,
           CASE WHEN any_value(rollup) = 'sum' THEN arg_max(sum, (n, sum)) ELSE sum(sum) END AS sum,
           min(first_start) AS first_start, max(last_end) AS last_end,
           arg_min(utc_offset_minutes, first_start) AS utc_offset_minutes, arg_max(device, (n, sum)) AS device
    FROM ({device_days}) JOIN metric_info USING (metric) GROUP BY ALL"""


SPANS = """SELECT patient_id, metric, min(start_time) AS first_start, max(start_time) AS last_start
    FROM {samples} GROUP BY ALL"""
_engines = threading.local()


@dataclass(frozen=True, kw_only=True)
class SampleSummary:
    """What a batch of samples adds up to, worked out before the writer takes it (in the
    checking thread): each series' span, and each device's day (DEVICE_DAYS)."""

    spans: pa.Table
    device_days: pa.Table


def summarize(samples: pa.Table) -> SampleSummary:
    """The batch's spans and device-days, on this thread's in-memory DuckDB."""
    con: duckdb.DuckDBPyConnection | None = getattr(_engines, "con", None)
    if con is None:
        con = _engines.con = duckdb.connect(config={"threads": 1})
    con.register("samples", samples)
    try:
        spans = con.execute(SPANS.format(samples="samples")).to_arrow_table()
        device_days = con.execute(DEVICE_DAYS.format(samples="samples", where="")).to_arrow_table()
    finally:
        con.unregister("samples")
    return SampleSummary(spans=spans, device_days=device_days)


@dataclass(kw_only=True)
class SampleWriter:
    """Lands samples and rolls up the days they touch, on the writer's connection and within
    the batch's transaction (the caller's)."""

    con: duckdb.DuckDBPyConnection
    coverage: dict[tuple[str, str, str], tuple[datetime, datetime]] | None = None
    """(source, patient, metric) -> the first and last start stored: the writer's copy."""
    batch_spans: pa.Table = field(default_factory=lambda: pa.table({}))
    reporting: set[str] | None = None
    """The sources with a vendor-reported day stored: only their rollups look for one."""

    def forget_coverage(self) -> None:
        """After a failed batch: the copies may hold what was rolled back."""
        self.coverage = self.reporting = None

    def report(
        self, source: str, run_id: str, reported: pa.Table, counts: Counter[str], window: Window | None
    ) -> tuple[int, pa.Table]:
        """Upsert the vendor's figures for days (normalized day-long samples) and make each the
        value of its day, whether or not samples of the day are stored yet; returns how many
        daily rows changed, and those flagged for FHIR (DAILY_SCHEMA)."""
        if window:
            reported = _in_window(reported, window, counts)
        con, params = self.con, {"source": source}
        con.register("incoming", reported)
        try:  # only the reports that change something
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE reported AS
                SELECT n.*, r.value IS NOT NULL AS stored
                FROM (SELECT s.patient_id, s.metric, {LOCAL_DAY} AS day, s.loinc_code, s.unit, s.value,
                             s.start_time, s.end_time, s.utc_offset_minutes, s.device, s.origin
                      FROM incoming s) n
                LEFT JOIN (FROM twin.wearable_reported WHERE source = $source) r
                    USING (patient_id, metric, day)
                WHERE r.value IS DISTINCT FROM n.value OR r.unit IS DISTINCT FROM n.unit""",
                params,
            )
        finally:
            con.unregister("incoming")
        (new, updated) = one(
            con, "SELECT count(*) FILTER (NOT stored), count(*) FILTER (stored) FROM reported"
        )
        counts.update(inserted=new, updated=updated, unchanged=len(reported) - new - updated)
        if not new + updated:
            con.execute("DROP TABLE reported")
            return 0, DAILY_SCHEMA.empty_table()
        self._reporting().add(source)
        con.execute(
            """DELETE FROM twin.wearable_reported r USING reported n
            WHERE r.source = $source AND (r.patient_id, r.metric, r.day) = (n.patient_id, n.metric, n.day)""",
            params,
        )
        con.execute(
            """INSERT INTO twin.wearable_reported
            SELECT $source, * EXCLUDE (stored), $run_id, now() FROM reported""",
            params | {"run_id": run_id},
        )
        # The day's row: the stored one with the reported value, or the report alone.
        con.execute(
            """CREATE OR REPLACE TEMP TABLE daily AS
            SELECT $source AS source, n.patient_id, n.metric, n.day, n.loinc_code, n.unit, n.value,
                   coalesce(w.samples, 0) AS samples, w.min, w.max, w.mean, w.sum,
                   coalesce(w.first_start, n.start_time) AS first_start,
                   coalesce(w.last_end, n.end_time) AS last_end,
                   coalesce(w.utc_offset_minutes, n.utc_offset_minutes) AS utc_offset_minutes,
                   coalesce(w.device, n.device) AS device, n.value AS reported
            FROM reported n LEFT JOIN twin.wearable_daily w ON w.source = $source
                AND (w.patient_id, w.metric, w.day) = (n.patient_id, n.metric, n.day)""",
            params,
        )
        days = self._replace("daily", source, run_id, replace=True)
        # Temporary tables live in the transaction: on failure they roll back with it.
        con.execute("DROP TABLE reported")
        con.execute("DROP TABLE daily")
        return days

    def _reporting(self) -> set[str]:
        if self.reporting is None:
            rows = self.con.execute("SELECT DISTINCT source FROM twin.wearable_reported").fetchall()
            self.reporting = {source for (source,) in rows}
        return self.reporting

    def land(
        self,
        source: str,
        run_id: str,
        samples: pa.Table,
        summary: SampleSummary,
        counts: Counter[str],
        window: Window | None,
    ) -> tuple[int, pa.Table]:
        """Upsert the samples and roll up their days; returns how many daily rows changed,
        and those flagged for FHIR (DAILY_SCHEMA)."""
        if window:
            samples = _in_window(samples, window, counts)
            summary = summarize(samples)
        if not len(samples):
            return 0, DAILY_SCHEMA.empty_table()
        con = self.con
        self.batch_spans = summary.spans
        tables = {
            "incoming": samples,
            "batch_device_days": summary.device_days,
            "metric_info": _metric_info(),
        }
        for name, table in tables.items():
            con.register(name, table)
        try:
            return self._land(source, run_id, len(samples), counts)
        finally:
            for name in tables:
                con.unregister(name)

    def _land(self, source: str, run_id: str, n: int, counts: Counter[str]) -> tuple[int, pa.Table]:
        con = self.con
        params = {"source": source}
        spans = self._spans(source)
        con.register("spans", spans)
        insert = """INSERT INTO twin.wearable_sample
            SELECT $source, patient_id, device, metric, loinc_code, start_time, end_time,
                   utc_offset_minutes, value, unit, origin, $run_id, now()
            FROM {rows}"""
        if not pc.any(spans["meets_stored"]).as_py():  # new data after old: append, look nothing up
            con.execute(insert.format(rows="incoming"), params | {"run_id": run_id})
            counts["inserted"] += n
            device_days = "batch_device_days"
        else:
            self._judge(source)
            (new, updated, unchanged) = one(
                con,
                """SELECT count(*) FILTER (NOT stored), count(*) FILTER (stored AND NOT same),
                          count(*) FILTER (same) FROM judged""",
            )
            counts.update(inserted=new, updated=updated, unchanged=unchanged)
            if updated:
                con.execute(
                    """DELETE FROM twin.wearable_sample s USING judged j
                    WHERE s.source = $source AND j.stored AND NOT j.same AND s.patient_id = j.patient_id
                      AND s.metric = j.metric AND s.start_time = j.start_time""",
                    params,
                )
            con.execute(insert.format(rows="judged WHERE NOT same"), params | {"run_id": run_id})
            device_days = f"({DEVICE_DAYS.format(samples='(FROM judged WHERE NOT same)', where='')})"
        self._cover(source, spans)
        days = self._roll_up(source, run_id, device_days)
        con.unregister("spans")
        # Temporary tables live in the transaction: on failure they roll back with it.
        for table in ("judged", "batch_days", "touched", "daily"):
            con.execute(f"DROP TABLE IF EXISTS {table}")
        return days

    def _coverage(self) -> dict[tuple[str, str, str], tuple[datetime, datetime]]:
        """Each stored series' span, read from the store on first use."""
        if self.coverage is None:
            rows = self.con.execute(
                """SELECT source, patient_id, metric, min(start_time), max(start_time)
                FROM twin.wearable_sample GROUP BY ALL"""
            ).fetchall()
            self.coverage = {(s, p, m): (first, last) for s, p, m, first, last in rows}
        return self.coverage

    def _spans(self, source: str) -> pa.Table:
        """Each series' span in the batch beside the span stored before it, and whether they meet."""
        coverage = self._coverage()
        rows = []
        for patient, metric, first, last in zip(
            *(self.batch_spans[c].to_pylist() for c in SPAN_KEYS), strict=True
        ):
            stored_first, stored_last = coverage.get((source, patient, metric), (None, None))
            meets = stored_first is not None and first <= stored_last and last >= stored_first
            rows.append((patient, metric, first, last, stored_first, stored_last, meets))
        names = [*SPAN_KEYS, "stored_first", "stored_last", "meets_stored"]
        columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        types = [pa.string(), pa.string(), *[pa.timestamp("us", tz="UTC")] * 4, pa.bool_()]
        return pa.table([pa.array(c, t) for c, t in zip(columns, types, strict=True)], names=names)

    def _judge(self, source: str) -> None:
        """`judged`: each incoming sample, whether one with its key is stored, and whether that
        one is the same. Only the series whose spans overlap stored ones are looked up."""
        self.con.execute(
            f"""CREATE OR REPLACE TEMP TABLE judged AS
            WITH stored AS (
                SELECT s.* FROM twin.wearable_sample s
                JOIN spans p ON p.meets_stored AND (p.patient_id, p.metric) = (s.patient_id, s.metric)
                WHERE s.source = $source
                  AND s.start_time BETWEEN (SELECT min(first_start) FROM spans WHERE meets_stored)
                                       AND (SELECT max(last_start) FROM spans WHERE meets_stored)
                  AND s.start_time BETWEEN p.first_start AND p.last_start)
            SELECT i.*, s.patient_id IS NOT NULL AS stored, s.patient_id IS NOT NULL AND {SAME} AS same
            FROM incoming i LEFT JOIN stored s USING (patient_id, metric, start_time)""",
            {"source": source},
        )

    def _cover(self, source: str, spans: pa.Table) -> None:
        """The batch's spans join the stored ones (a stored sample replaced lies within both)."""
        coverage = self._coverage()
        for patient, metric, first, last in zip(*(spans[c].to_pylist() for c in SPAN_KEYS), strict=True):
            stored = coverage.get((source, patient, metric))
            coverage[(source, patient, metric)] = (
                (min(first, stored[0]), max(last, stored[1])) if stored else (first, last)
            )

    def _roll_up(self, source: str, run_id: str, device_days: str) -> tuple[int, pa.Table]:
        """Recompute the daily rows of every (patient, metric, local day) the batch wrote to,
        then the totals (sleep duration) of those days; returns how many rows, and those flagged
        for FHIR (DAILY_SCHEMA). A day far from
        anything stored before this batch is rolled up from the batch alone (its device-days,
        summed up as the batch was checked); the others (the day the last batch ended in, a re-pulled
        day) from the store."""
        con = self.con
        params = {"source": source}
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE batch_days AS
            SELECT d.*, NOT p.meets_stored AND (p.stored_first IS NULL
                       OR d.day < CAST(p.stored_first AS DATE) - 2
                       OR d.day > CAST(p.stored_last AS DATE) + 2) AS fresh
            FROM {device_days} d JOIN spans p USING (patient_id, metric)"""
        )
        con.execute(
            "CREATE OR REPLACE TEMP TABLE touched AS SELECT DISTINCT patient_id, metric, day FROM batch_days"
        )
        # A day's samples start within two days of its midnight (UTC offsets reach +-14 h, a
        # night's sleep ends the next day): the bound lets DuckLake skip other files.
        (low, high, patients) = con.execute(
            """SELECT min(day) - INTERVAL 2 DAY, max(day) + INTERVAL 2 DAY, list(DISTINCT patient_id)
            FROM batch_days WHERE NOT fresh"""
        ).fetchone() or (None, None, None)
        device_days = "SELECT * EXCLUDE (fresh) FROM batch_days WHERE fresh"
        if low is not None:
            # The patients as constants, with the time bound: DuckLake skips the files of others.
            named = ", ".join("'" + str(p).replace("'", "''") + "'" for p in patients)
            stored = DEVICE_DAYS.format(
                samples="twin.wearable_sample",
                where="SEMI JOIN (SELECT DISTINCT patient_id, metric, day FROM batch_days WHERE NOT fresh) t "
                f"ON (t.patient_id, t.metric, t.day) = (s.patient_id, s.metric, {LOCAL_DAY}) "
                "WHERE s.source = $source AND s.start_time BETWEEN $low AND $high "
                f"AND s.patient_id IN ({named})",
            )
            device_days += f" UNION ALL BY NAME {stored}"
        daily = DAILY.format(device_days=device_days)
        reported = source in self._reporting()
        if reported:  # the vendor's figure, where it gave one, is the day's value
            daily = f"""SELECT d.* REPLACE (coalesce(r.value, d.value) AS value), r.value AS reported
                FROM ({daily}) d LEFT JOIN twin.wearable_reported r ON r.source = $source
                    AND (r.patient_id, r.metric, r.day) = (d.patient_id, d.metric, d.day)"""
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE daily AS {daily}",
            params | ({} if low is None else {"low": low, "high": high}),
        )
        # A fresh day had no samples stored, so it has no daily row to replace, unless a
        # report made one.
        replace = low is not None or reported
        rows = [self._replace("daily", source, run_id, replace=replace)]
        touched = {metric for (metric,) in con.execute("SELECT DISTINCT metric FROM touched").fetchall()}
        for total in (t for t in totals().values() if touched & set(t.sum_of)):
            con.register("parts", pa.table({"metric": pa.array(total.sum_of, pa.string())}))
            con.execute(
                """CREATE OR REPLACE TEMP TABLE daily AS
                SELECT $source AS source, patient_id, $name AS metric, day, $loinc AS loinc_code,
                       $unit AS unit, sum(sum) AS value, sum(samples) AS samples, NULL::DOUBLE AS min,
                       NULL::DOUBLE AS max, NULL::DOUBLE AS mean, sum(sum) AS sum,
                       min(first_start) AS first_start, max(last_end) AS last_end,
                       arg_min(utc_offset_minutes, first_start) AS utc_offset_minutes,
                       arg_max(device, samples) AS device,
                       list({'metric': metric, 'value': sum} ORDER BY metric) AS parts
                FROM twin.wearable_daily w
                WHERE source = $source AND metric IN (FROM parts)
                  AND (patient_id, day) IN (
                      SELECT (patient_id, day) FROM touched WHERE metric IN (FROM parts))
                GROUP BY ALL""",
                params | {"name": total.name, "loinc": total.loinc, "unit": total.unit},
            )
            con.unregister("parts")
            # A total sums several series: a day fresh for one may hold another's rows already.
            rows.append(self._replace("daily", source, run_id, replace=True))
        return sum(n for n, _ in rows), pa.concat_tables([fhir for _, fhir in rows])

    def _replace(self, table: str, source: str, run_id: str, *, replace: bool) -> tuple[int, pa.Table]:
        """Write `table`'s daily rows (over the stored ones of the same days, where some may
        be stored), flagged for FHIR if they have a LOINC code; returns how many, and the
        flagged ones (DAILY_SCHEMA)."""
        con = self.con
        if replace:
            con.execute(
                f"""DELETE FROM twin.wearable_daily w USING {table} d
                WHERE w.source = $source AND w.patient_id = d.patient_id AND w.metric = d.metric
                  AND w.day = d.day""",
                {"source": source},
            )
        (written,) = one(
            con,
            f"""INSERT INTO twin.wearable_daily BY NAME
            SELECT COLUMNS(c -> c <> 'parts'), '{run_id}' AS run_id, now() AS computed_at,
                   loinc_code IS NOT NULL AS fhir_pending
            FROM {table}""",
        )
        columns = (
            "*"
            if "parts" in con.sql(f"FROM {table} LIMIT 0").columns
            else "*, NULL::STRUCT(metric VARCHAR, value DOUBLE)[] AS parts"
        )
        fhir = con.execute(f"SELECT {columns} FROM {table} WHERE loinc_code IS NOT NULL")
        return written, fhir.to_arrow_table().select(DAILY_SCHEMA.names).cast(DAILY_SCHEMA)

    def any_pending(self) -> bool:
        """Whether any daily row waits for its FHIR: a quick look that spares the runs of
        other sources `pending_days`, which costs some 50 ms even on an empty table."""
        return bool(
            self.con.execute("SELECT 1 FROM twin.wearable_daily WHERE fhir_pending LIMIT 1").fetchall()
        )

    def pending_days(self, limit: int) -> pa.Table:
        """Up to `limit` daily rows whose FHIR is not made yet (DAILY_SCHEMA, totals with the
        parts they sum)."""
        parts = ", ".join(f"'{m}'" for t in totals().values() for m in t.sum_of) or "NULL"
        return (
            self.con.execute(
                f"""SELECT p.source, p.patient_id, p.metric, p.day, p.utc_offset_minutes, p.value,
                       p.samples, p.min, p.max, p.device,
                       CASE WHEN p.metric IN ({", ".join(f"'{t}'" for t in totals()) or "NULL"}) THEN (
                           SELECT list({{'metric': w.metric, 'value': w.sum}} ORDER BY w.metric)
                           FROM twin.wearable_daily w
                           WHERE (w.source, w.patient_id, w.day) = (p.source, p.patient_id, p.day)
                             AND w.metric IN ({parts})) END AS parts
                FROM (FROM twin.wearable_daily WHERE fhir_pending
                      ORDER BY source, patient_id, day, metric LIMIT {int(limit)}) p"""
            )
            .to_arrow_table()
            .cast(DAILY_SCHEMA)
        )

    def fhir_made(self, days: pa.Table, failed: pa.Table | None = None) -> None:
        """Clear the flags of `days` and name the Observation each got by its key (their FHIR
        landed in this transaction, as the source's); the `failed` among them (quarantined) get none."""
        names = ("source", "patient_id", "metric", "day")
        keys = list(zip(*(days[c].to_pylist() for c in names), strict=True))
        bad = set(zip(*(failed[c].to_pylist() for c in names), strict=True)) if failed is not None else set()
        ids = pa.array([None if key in bad else daily_id(*key) for key in keys], pa.string())
        made = days.select(["source", "patient_id", "metric", "day"]).append_column("observation_id", ids)
        self.con.register("made", made)
        try:
            self.con.execute(
                """UPDATE twin.wearable_daily w
                SET fhir_pending = false, observation_id = m.source || '/' || m.observation_id
                FROM made m
                WHERE (w.source, w.patient_id, w.metric, w.day) = (m.source, m.patient_id, m.metric, m.day)"""
            )
        finally:
            self.con.unregister("made")


def _in_window(table: pa.Table, window: Window, counts: Counter[str]) -> pa.Table:
    """The rows that start within a backfill's window; the others are counted out."""
    at = table["start_time"]
    kept = table.filter(pc.and_(pc.greater_equal(at, window.since), pc.less(at, window.until)))
    counts["out_of_window"] += len(table) - len(kept)
    return kept
