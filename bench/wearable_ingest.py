"""Wearables into the store: one year of minute-level heart rate for 10 people (5,256,000
samples, generated) landed as `sync` lands them (normalize, upsert into wearable_sample, roll up
wearable_daily, the daily Observations, Devices and Provenance as validated FHIR), beside a bare
DuckDB insert of the same rows into a DuckLake table in the same run. Run by hand; prints the
medians and the ratio. Target: >= 500,000 samples/s."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from connectors.base import RECORD_SCHEMA, SAMPLE_SCHEMA, Batch
from flows.sync import land_batches
from twin_store import TwinStore, connect

PEOPLE = 10
MINUTES = 365 * 24 * 60
BATCH = 500_000
START = np.datetime64(datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None), "us")


def batches(people: int = PEOPLE) -> list[pa.Table]:
    """Each person's year in time order, cut into batches as a pull would bring them."""
    rng = np.random.default_rng(7)
    tables = []
    for person in range(people):
        minutes = np.arange(MINUTES, dtype="int64")
        starts = START + minutes * np.int64(60_000_000)
        daily_cycle = 8 * np.sin(2 * np.pi * (minutes % 1440) / 1440)
        values = np.round(65 + daily_cycle + rng.normal(0, 4, MINUTES))
        for at in range(0, MINUTES, BATCH):
            n = min(BATCH, MINUTES - at)
            tables.append(
                pa.table(
                    {
                        "patient_id": pa.array([f"p{person}"] * n, pa.string()),
                        "device": pa.array(["Charge 6"] * n, pa.string()),
                        "metric": pa.array(["heart_rate"] * n, pa.string()),
                        "start_time": pa.array(starts[at : at + n], pa.timestamp("us", tz="UTC")),
                        "end_time": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                        "utc_offset_minutes": pa.array(np.full(n, 60, dtype="int32")),
                        "value": pa.array(values[at : at + n]),
                        "unit": pa.array(["bpm"] * n, pa.string()),
                        "origin": pa.array(["/1/user/-/activities/heart/date"] * n, pa.string()),
                    },
                    schema=SAMPLE_SCHEMA,
                )
            )
    return tables


def twinhub(tables: list[pa.Table]) -> tuple[float, int, int]:
    root = Path(tempfile.mkdtemp(prefix="bench-wearables-"))
    try:
        with TwinStore(root) as store:
            started = time.perf_counter()
            run = store.begin_run("fitbit", "sync")
            land_batches(store, run, _as_batches(tables))
            store.finish_run(run, "succeeded")
            seconds = time.perf_counter() - started
        con = connect(root)
        (days,) = con.sql("SELECT count(*) FROM wearable_daily").fetchone() or (0,)
        (samples,) = con.sql("SELECT count(*) FROM wearable_sample").fetchone() or (0,)
        return seconds, samples, days
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_batches(tables: list[pa.Table]) -> Iterator[Batch]:
    for n, table in enumerate(tables):
        yield Batch(records=RECORD_SCHEMA.empty_table(), watermark={"batch": n}, samples=table)


def bare(tables: list[pa.Table]) -> float:
    """The same rows appended to a DuckLake table by plain INSERTs, one transaction a batch."""
    root = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    try:
        with TwinStore(root) as store:  # the same DuckLake set-up (catalog, extensions, threads)
            con = store.con
            con.execute("CREATE TABLE twin.bare AS FROM twin.wearable_sample LIMIT 0")
            started = time.perf_counter()
            for table in tables:
                con.register("t", table)
                con.execute(
                    """INSERT INTO twin.bare SELECT 'fitbit', patient_id, device, metric, '8867-4',
                       start_time, end_time, utc_offset_minutes, value, '/min', origin, 'run', now() FROM t"""
                )
                con.unregister("t")
            return time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--people", type=int, default=PEOPLE)
    args = parser.parse_args()
    tables = batches(args.people)
    total = sum(len(t) for t in tables)
    ours, theirs = [], []
    for _ in range(args.repeat):  # interleaved, so both see the same machine
        ours.append(twinhub(tables))
        theirs.append(bare(tables))
    t, b = statistics.median(s for s, _, _ in ours), statistics.median(theirs)
    _, samples, days = ours[0]
    print(f"samples   {total:,} ({args.people} people x 1 year of minutes), {len(tables)} batches")
    print(f"twinhub   median {t:.2f} s = {total / t:,.0f} samples/s ({samples:,} stored, {days:,} days)")
    print(f"bare      median {b:.2f} s = {total / b:,.0f} samples/s (INSERT into a DuckLake table)")
    print(
        f"ratio twinhub/bare speed: {b / t:.2f}; runs: {[round(s, 2) for s, _, _ in ours]} / "
        f"{[round(s, 2) for s in theirs]}"
    )


if __name__ == "__main__":
    main()
