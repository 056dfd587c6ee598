"""Wearable sources end to end: each connector's pull landed in the real store as `sync` lands
it (samples, daily rollups, their FHIR), re-pulls adding nothing, unsafe files landing nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.base import Batch
from connectors.wearables.apple_health import AppleHealthConnector, AppleHealthSource
from connectors.wearables.fitbit.api import FitbitConnector
from flows.sync import land_batches
from tests.support.data import SHARED
from tests.support.fitbit import AUG_23, NOW, connect, counts, make_source, pull, token_store
from tests.support.fitbit_server import FitbitServer
from twin_store import RunReport, TwinStore
from twin_store import connect as read_store

APPLE_SAMPLE = SHARED / "wearables" / "apple-health" / "tdda-applehealthdata" / "export6s3sample.xml"


def land(root: Path, source: str, batches: Iterator[Batch] | list[Batch]) -> RunReport:
    with TwinStore(root) as store:
        run = store.begin_run(source, "sync")
        land_batches(store, run, iter(batches))
        return store.finish_run(run, "succeeded")


def stored_counts(root: Path) -> dict[str, int]:
    return dict(read_store(root).sql("SELECT metric, count(*) FROM wearable_sample GROUP BY ALL").fetchall())


@pytest.mark.shared
def test_recorded_fitbit_responses_land_with_their_counts_and_a_repull_adds_nothing(
    tmp_path: Path, recorded_server: FitbitServer
) -> None:
    """Issue 6, points 1 and 5, through the store: what the recorded responses yield lands,
    every sample once; pulling the same days again changes nothing."""
    source = make_source(recorded_server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    tokens = token_store(source)
    connect(recorded_server, make_source(recorded_server, tmp_path), tokens)
    pulled, _ = pull(source, tokens, now=AUG_23)
    first = land(tmp_path / "store", "fitbit", pulled)
    assert stored_counts(tmp_path / "store") == counts(pulled)
    reported = sum(b.reported.num_rows for b in pulled if b.reported is not None)
    assert reported == 1, "the steps day's own total"
    assert first.counts["inserted"] == sum(counts(pulled).values()) + reported
    assert first.counts["quarantined"] == 0
    again = FitbitConnector(source, tokens, clock=AUG_23.timestamp, sleep=lambda s: None).pull(None)
    second = land(tmp_path / "store", "fitbit", again)
    assert second.counts["inserted"] == 0 and second.counts["unchanged"] == first.counts["inserted"]
    assert stored_counts(tmp_path / "store") == counts(pulled)
    con = read_store(tmp_path / "store")
    (days, observations) = con.sql(
        """SELECT count(*), count(*) FILTER (observation_id IN (SELECT id FROM observation))
        FROM wearable_daily WHERE loinc_code IS NOT NULL"""
    ).fetchone() or (0, 0)
    assert days > 0 and observations == days, "every coded day has its Observation"
    heart = con.sql("SELECT count(*) FROM vital_sign WHERE code = '8867-4'").fetchone()
    assert heart is not None and heart[0] >= 1
    steps = con.sql("SELECT value, sum, samples FROM wearable_daily WHERE metric = 'steps'").fetchall()
    assert steps == [(3212.0, 59.0, 3)], "Fitbit's total for the day, beside its 3 recorded minutes"


@pytest.mark.shared
def test_the_shared_apple_health_export_lands_as_samples_days_and_activity_observations(
    tmp_path: Path,
) -> None:
    if not APPLE_SAMPLE.exists():
        pytest.skip(f"shared Apple Health sample not found at {APPLE_SAMPLE} (../shared/data is absent)")
    source = AppleHealthSource(name="apple", kind="apple-health", path=APPLE_SAMPLE, patient="p1")
    report = land(tmp_path / "store", "apple", AppleHealthConnector(source).pull(None))
    assert stored_counts(tmp_path / "store") == {"steps": 10, "distance": 5}
    assert report.counts["quarantined"] == 0
    con = read_store(tmp_path / "store")
    day_total = con.sql("SELECT sum(value) FROM wearable_daily WHERE metric = 'steps'").fetchone()
    stored = con.sql("SELECT sum(value) FROM wearable_sample WHERE metric = 'steps'").fetchone()
    assert day_total == stored, "one device, so the day's steps are its samples' sum"
    steps = con.sql(
        "SELECT count(*) FROM observation WHERE code = '41950-7' AND category = 'activity'"
    ).fetchone()
    assert steps is not None and steps[0] >= 1


def test_an_apple_export_declaring_entities_lands_nothing_but_its_quarantine_row(tmp_path: Path) -> None:
    laughs = tmp_path / "export.xml"
    laughs.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE HealthData [<!ENTITY a "ha"><!ENTITY b "&a;&a;&a;&a;">]>\n'
        '<HealthData locale="en_US"><Record type="HKQuantityTypeIdentifierStepCount" unit="count" '
        'value="&b;" startDate="2020-01-01 08:00:00 +0000" endDate="2020-01-01 08:01:00 +0000"/>'
        "</HealthData>\n"
    )
    source = AppleHealthSource(name="apple", kind="apple-health", path=laughs, patient="p1")
    report = land(tmp_path / "store", "apple", AppleHealthConnector(source).pull(None))
    assert report.counts["inserted"] == 0 and report.counts["quarantined"] == 1
    con = read_store(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM wearable_sample").fetchall() == [(0,)]
    (reason,) = con.sql("SELECT reason FROM quarantine").fetchone() or ("",)
    assert "entit" in reason.lower()


def test_a_fitbit_pull_at_now_lands_every_kind_of_data_once(
    tmp_path: Path, fitbit_server: FitbitServer
) -> None:
    """The stand-in's own fixtures (no shared data needed): sleep stages, resting rate, SpO2,
    weight land, and the sleep of each night rolls up into its total."""
    source = make_source(fitbit_server, tmp_path, since="2016-12-10", intraday=False)
    tokens = token_store(source)
    connect(fitbit_server, source, tokens)
    pulled, _ = pull(source, tokens, now=NOW)
    land(tmp_path / "store", "fitbit", pulled)
    assert stored_counts(tmp_path / "store") == counts(pulled)
    con = read_store(tmp_path / "store")
    totals = con.sql("SELECT count(*) FROM wearable_daily WHERE metric = 'sleep_duration'").fetchone()
    nights = con.sql(
        "SELECT count(DISTINCT day) FROM wearable_daily WHERE metric IN ('sleep_asleep', 'sleep_light', "
        "'sleep_deep', 'sleep_rem')"
    ).fetchone()
    assert totals == nights
