"""Wearable samples in the real store: upserts, daily rollups, their FHIR, crash and rerun."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from fhir.resources.R4B import get_fhir_model_class

from connectors.base import RECORD_SCHEMA, SAMPLE_SCHEMA, Batch, Watermark
from flows.sync import land_batches
from twin_store import RunReport, TwinStore, Window, connect
from twin_store.wearables import SampleWriter

T0 = datetime(2024, 3, 1, 22, 0, tzinfo=UTC)  # midnight on 2 March at UTC+2


def sample(
    metric: str, minute: int, value: float, unit: str, *, minutes: int | None = None, device: str = "Charge 6"
) -> dict[str, object]:
    start = T0 + timedelta(minutes=minute)
    end = start + timedelta(minutes=minutes) if minutes is not None else None
    return {
        "patient_id": "p1",
        "device": device,
        "metric": metric,
        "start_time": start,
        "end_time": end,
        "utc_offset_minutes": 120,
        "value": value,
        "unit": unit,
        "origin": "test",
    }


def batch(rows: list[dict[str, object]], mark: int = 0) -> Batch:
    return Batch(
        records=RECORD_SCHEMA.empty_table(),
        watermark={"mark": mark},
        samples=pa.Table.from_pylist(rows, SAMPLE_SCHEMA),
    )


def land(root: Path, batches: list[Batch] | Iterator[Batch], window: Window | None = None) -> RunReport:
    with TwinStore(root) as store:
        run = store.begin_run("fit", "backfill" if window else "sync")
        land_batches(store, run, iter(batches), window=window)
        return store.finish_run(run, "succeeded")


def a_day() -> list[dict[str, object]]:
    """A day of p1 (UTC+2): heart rate each minute of the first 3 hours, steps, two weighings, a
    night's sleep ending that morning (it began the evening before, local time)."""
    rows = [sample("heart_rate", m, 60 + m % 7, "bpm") for m in range(180)]
    rows += [sample("steps", m, 10, "steps", minutes=1) for m in range(0, 180, 2)]
    rows += [sample("body_weight", 60, 150, "lb"), sample("body_weight", 600, 68, "kg")]
    rows += [
        sample("sleep_deep", -120, 90, "min", minutes=90),
        sample("sleep_light", -30, 5, "h", minutes=300),
    ]
    rows += [sample("sleep_awake", 270, 20, "min", minutes=20)]
    return rows


def daily(root: Path) -> dict[str, tuple[object, ...]]:
    rows = (
        connect(root)
        .sql("SELECT metric, day, value, samples, min, max, unit, utc_offset_minutes FROM wearable_daily")
        .fetchall()
    )
    return {row[0]: row[1:] for row in rows}


def test_each_metric_rolls_up_its_local_day_by_its_own_rule(tmp_path: Path) -> None:
    report = land(tmp_path, [batch(a_day())])
    assert (report.counts["inserted"], report.counts["quarantined"]) == (275, 0)
    day = datetime(2024, 3, 2).date()
    got = daily(tmp_path)
    heart = got["heart_rate"]
    assert heart[0] == day and heart[2:] == (180, 60.0, 66.0, "/min", 120)
    assert heart[1] == pytest.approx(sum(60 + m % 7 for m in range(180)) / 180)
    assert got["steps"][1:3] == (900.0, 90), "steps are summed"
    assert got["body_weight"][1] == pytest.approx(68.0), "weight: the day's last weighing, in kg"
    assert got["body_weight"][3:5] == pytest.approx((68.0, 68.04), abs=0.01), "150 lb is 68.04 kg"
    # The night began on 1 March local time (22:00) but counts to the morning it ends (2 March)
    assert got["sleep_deep"][:2] == (day, 90.0) and got["sleep_light"][:2] == (day, 300.0)
    assert got["sleep_duration"][:3] == (day, 390.0, 2), "deep + light; awake is not sleep"


def test_daily_rollups_land_as_valid_fhir_in_the_views(tmp_path: Path) -> None:
    land(tmp_path, [batch(a_day())])
    con = connect(tmp_path)
    # By key, as the views name them (`<source>/<id>`: the source is `fit`).
    stored = con.sql("SELECT resource_type, source || '/' || id, resource FROM fhir_resource").fetchall()
    kinds = sorted(kind for kind, _, _ in stored)
    assert kinds.count("Observation") == 6, "heart rate, steps, weight, deep and light sleep, duration"
    assert kinds.count("Observation") + kinds.count("Device") + kinds.count("Provenance") == len(kinds) == 8
    for kind, _, text in stored:
        get_fhir_model_class(kind).model_validate_json(text)  # R4B, as landed
    by_id = {(kind, ident): orjson.loads(text) for kind, ident, text in stored}
    vital = con.sql(
        "SELECT id, code, value_numeric, value_unit, patient_id FROM vital_sign ORDER BY code"
    ).fetchall()
    assert [(code, unit) for _, code, _, unit, _ in vital] == [("29463-7", "kg"), ("8867-4", "/min")]
    heart = by_id[("Observation", next(i for i, code, *_ in vital if code == "8867-4"))]
    assert heart["effectivePeriod"] == {
        "start": "2024-03-02T00:00:00+02:00",
        "end": "2024-03-03T00:00:00+02:00",
    }
    assert heart["category"][0]["coding"][0]["code"] == "vital-signs"
    device = by_id[("Device", "fit/" + heart["device"]["reference"].removeprefix("Device/"))]
    assert device["deviceName"][0]["name"] == "Charge 6"
    (provenance,) = (r for (kind, _), r in by_id.items() if kind == "Provenance")
    assert {t["reference"] for t in provenance["target"]} == {
        f"Observation/{ident.removeprefix('fit/')}" for kind, ident in by_id if kind == "Observation"
    }
    assert provenance["agent"][0]["who"] == heart["device"]
    steps = con.sql(
        "SELECT value_numeric, value_unit, category FROM observation WHERE code = '41950-7'"
    ).fetchall()
    assert steps == [(900.0, "/d", "activity")]


def test_an_overlapping_pull_adds_nothing_and_a_changed_sample_updates_its_day(tmp_path: Path) -> None:
    rows = a_day()
    land(tmp_path, [batch(rows[:150])])
    again = land(tmp_path, [batch(rows[100:])])  # 50 samples pulled twice
    assert (again.counts["inserted"], again.counts["unchanged"]) == (125, 50)
    rows[0] = sample("heart_rate", 0, 99, "bpm")
    changed = land(tmp_path, [batch(rows)])
    assert (changed.counts["updated"], changed.counts["unchanged"]) == (1, 274)
    assert changed.changed["wearable_daily"] == 1, "only the heart-rate day is rolled up again"
    con = connect(tmp_path)
    assert con.sql("SELECT count(*) FROM wearable_sample").fetchone() == (275,)
    assert con.sql(
        "SELECT count(*) FROM (SELECT DISTINCT source, patient_id, metric, start_time FROM wearable_sample)"
    ).fetchone() == (275,)
    assert daily(tmp_path)["heart_rate"][3:5] == (60.0, 99.0)
    versions = dict(
        con.sql(
            "SELECT code, version_id FROM observation o "
            "JOIN fhir_resource r ON o.id = r.source || '/' || r.id"
        ).fetchall()
    )
    assert versions["8867-4"] == 3, "the first half, both halves, the change"
    assert versions["41950-7"] == 1, "steps came with the second pull and never changed"


def test_samples_that_cannot_land_are_quarantined_and_the_counts_add_up(tmp_path: Path) -> None:
    rows = [
        sample("heart_rate", 0, 60, "bpm"),
        sample("heart_rate", 0, 61, "bpm"),  # the same key twice
        sample("pulse", 1, 60, "bpm"),
        sample("steps", 2, 5, "furlongs"),
        sample("steps", 3, float("nan"), "steps"),
    ]
    report = land(tmp_path, [batch(rows)])
    c = report.counts
    assert (c["inserted"], c["superseded"], c["quarantined"]) == (1, 1, 3)
    assert (
        c["lines_read"] == c["inserted"] + c["updated"] + c["unchanged"] + c["superseded"] + c["quarantined"]
    )
    reasons = " | ".join(r for (r,) in connect(tmp_path).sql("SELECT reason FROM quarantine").fetchall())
    assert "unknown metric pulse" in reasons and "does not take unit furlongs" in reasons
    assert "NaN is not a number" in reasons
    assert daily(tmp_path)["heart_rate"][1] == 61.0, "of two copies of one sample the last read wins"


def test_a_batch_that_fails_leaves_the_store_at_the_batch_before_and_the_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while rolling up the second batch: the first batch stays landed, its days flagged
    for FHIR that was never made; the rerun resumes after it, adds no duplicate and makes every
    day's Observation."""
    rows = a_day()
    batches = [batch(rows[:100], 1), batch(rows[100:200], 2), batch(rows[200:], 3)]

    def pulled(since: Watermark | None) -> Iterator[Batch]:
        done = (since or {}).get("mark", 0)
        return (b for b in batches if b.watermark["mark"] > done)

    real = SampleWriter._roll_up
    calls = 0

    def crash_on_the_second(self: SampleWriter, *args: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("killed mid-batch")
        return real(self, *args)

    monkeypatch.setattr(SampleWriter, "_roll_up", crash_on_the_second)
    with pytest.raises(RuntimeError, match="killed mid-batch"), TwinStore(tmp_path) as store:
        run = store.begin_run("fit", "sync")
        land_batches(store, run, pulled(None))
    con = connect(tmp_path)
    assert con.sql("SELECT count(*) FROM wearable_sample").fetchall() == [(100,)]
    assert con.sql("SELECT watermark FROM sync_state").fetchall() == [('{"mark":1}',)]
    assert con.sql("SELECT count(*) FILTER (fhir_pending), count(*) FROM wearable_daily").fetchall() == [
        (1, 1)
    ]
    assert con.sql("SELECT count(*) FROM observation").fetchall() == [(0,)]
    monkeypatch.setattr(SampleWriter, "_roll_up", real)
    with TwinStore(tmp_path) as store:
        run = store.begin_run("fit", "sync")
        land_batches(store, run, pulled(store.watermark("fit")))
        store.finish_run(run, "succeeded")
    assert run.counts["inserted"] == len(rows) - 100
    assert daily(tmp_path) == daily_of_one_landing(tmp_path.parent / "once", rows)
    assert con.sql("SELECT count(*) FILTER (fhir_pending) FROM wearable_daily").fetchall() == [(0,)]
    assert fhir_of(tmp_path) == fhir_of(tmp_path.parent / "once")


def fhir_of(root: Path) -> list[tuple[str, str]]:
    """The daily Observations' ids and values, as analysts see them."""
    return connect(root).sql("SELECT id, value_numeric FROM observation ORDER BY id").fetchall()


def daily_of_one_landing(root: Path, rows: list[dict[str, object]]) -> dict[str, tuple[object, ...]]:
    land(root, [batch(rows)])
    return daily(root)


def test_a_backfill_keeps_only_the_samples_in_its_window(tmp_path: Path) -> None:
    window = Window(since=T0, until=T0 + timedelta(hours=1))
    report = land(tmp_path, [batch(a_day())], window=window)
    assert report.counts["inserted"] == 60 + 30, "the first hour's heart rate and steps"
    assert report.counts["out_of_window"] == 275 - 90


def reported(value: float, *, days: int = 0) -> Batch:
    """Fitbit's own step total for a local day (by default the day of `a_day`)."""
    row = sample("steps", 24 * 60 * days, value, "steps", minutes=24 * 60)
    return Batch(
        records=RECORD_SCHEMA.empty_table(),
        watermark={"mark": 9},
        reported=pa.Table.from_pylist([row], SAMPLE_SCHEMA),
    )


def steps_days(root: Path) -> list[tuple[object, ...]]:
    return sorted(
        connect(root)
        .sql("SELECT day, value, sum, samples, reported FROM wearable_daily WHERE metric = 'steps'")
        .fetchall()
    )


@pytest.mark.parametrize("order", ["report first", "samples first", "one batch"])
def test_a_reported_daily_total_is_the_days_value_in_whichever_order_it_comes(
    tmp_path: Path, order: str
) -> None:
    """The hourly or minute samples of a day miss steps its device counted (Fitabase exports
    show it on a fifth of days): the vendor's own total is the day's value, their sum stays beside."""
    day = datetime(2024, 3, 2).date()
    if order == "one batch":
        both = Batch(
            records=RECORD_SCHEMA.empty_table(),
            watermark={"mark": 1},
            samples=batch(a_day()).samples,
            reported=reported(1000).reported,
        )
        reports = [land(tmp_path, [both])]
    else:
        first, second = [reported(1000)], [batch(a_day())]
        reports = [
            land(tmp_path, first if order == "report first" else second),
            land(tmp_path, second if order == "report first" else first),
        ]
    assert steps_days(tmp_path) == [(day, 1000.0, 900.0, 90, 1000.0)]
    assert fhir_of_code(tmp_path, "41950-7") == [1000.0]
    for report in reports:
        c = report.counts
        assert c["lines_read"] == c["inserted"] + c["updated"] + c["unchanged"] + c["superseded"]
    stored = connect(tmp_path).sql("SELECT day, value, unit FROM wearable_reported").fetchall()
    assert stored == [(day, 1000.0, "{steps}")]


def test_a_report_pulled_again_changes_nothing_and_a_changed_one_updates_its_day(tmp_path: Path) -> None:
    land(tmp_path, [batch(a_day()), reported(1000)])
    again = land(tmp_path, [reported(1000)])
    assert (again.counts["unchanged"], again.changed["wearable_daily"]) == (1, 0)
    changed = land(tmp_path, [reported(1200)])
    assert (changed.counts["updated"], changed.changed["wearable_daily"]) == (1, 1)
    assert steps_days(tmp_path)[0][1:] == (1200.0, 900.0, 90, 1200.0)
    assert fhir_of_code(tmp_path, "41950-7") == [1200.0]
    assert connect(tmp_path).sql("SELECT count(*) FROM wearable_reported").fetchone() == (1,)
    # Samples of the day pulled again: the day is rolled up again and keeps its reported value
    rows = a_day()
    rows[200] = sample("steps", 40, 30, "steps", minutes=1)  # was 10
    land(tmp_path, [batch(rows)])
    assert steps_days(tmp_path)[0][1:] == (1200.0, 920.0, 90, 1200.0)


def test_a_reported_day_without_samples_has_its_row_and_fhir(tmp_path: Path) -> None:
    land(tmp_path, [batch(a_day()), reported(4321, days=1)])
    days = steps_days(tmp_path)
    assert days[1] == (datetime(2024, 3, 3).date(), 4321.0, None, 0, 4321.0)
    assert sorted(fhir_of_code(tmp_path, "41950-7")) == [900.0, 4321.0]


def fhir_of_code(root: Path, code: str) -> list[float]:
    rows = connect(root).sql(f"SELECT value_numeric FROM observation WHERE code = '{code}'").fetchall()
    return [value for (value,) in rows]


def test_a_day_whose_fhir_fails_the_checks_is_quarantined_and_never_stops_the_store(tmp_path: Path) -> None:
    """A store from before ids were checked holds a pending day of Patient "fitabase-a b": its
    FHIR fails the store's own check. Once every later run of every source failed on it."""
    land(tmp_path, [batch(a_day())])
    with TwinStore(tmp_path) as store, store.transaction("a day of a bad id, as an older twinhub left it"):
        store.con.execute(
            """INSERT INTO twin.wearable_daily
            SELECT * REPLACE ('fitabase-a b' AS patient_id, true AS fhir_pending, NULL AS observation_id)
            FROM twin.wearable_daily WHERE metric = 'heart_rate'"""
        )
    later = land(tmp_path, [batch([sample("steps", 200, 10, "steps", minutes=1)], mark=1)])
    assert later.status == "succeeded"
    assert later.stats["days whose daily FHIR failed its checks (quarantined)"] == 1
    con = connect(tmp_path)
    [(file, reason)] = con.sql("SELECT file, reason FROM quarantine").fetchall()
    assert file == "wearable_daily"
    assert reason.startswith(
        "the daily FHIR of heart_rate on 2024-03-02 for patient 'fitabase-a b' of source fit fails the "
        "checks "
    )
    flags = con.sql("SELECT patient_id, fhir_pending, observation_id IS NULL FROM wearable_daily").fetchall()
    assert ("fitabase-a b", False, True) in flags, "cleared: the next run does not fail it again"
    assert not any(pending for _, pending, _ in flags)
    steps = con.sql("SELECT value_numeric FROM observation WHERE code = '41950-7'").fetchall()
    assert steps == [(910.0,)], "the good day's FHIR landed beside it"
    again = land(tmp_path, [batch([sample("steps", 202, 10, "steps", minutes=1)], mark=2)])
    assert again.status == "succeeded"
    assert con.sql("SELECT count(*) FROM quarantine").fetchone() == (1,)
