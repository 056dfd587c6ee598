"""The Fitbit connector against a local stand-in for the Fitbit Web API (tests/support/fitbit_server.py):
what the recorded real responses yield, per-patient watermarks, token refresh and forced
expiry, the rate limit, and crashes mid-refresh."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pyarrow as pa
import pytest
from cryptography.fernet import Fernet

from connectors.base import SAMPLE_SCHEMA, Batch, Window
from connectors.errors import SourceError
from connectors.wearables.fitbit.api import FitbitConnector
from connectors.wearables.fitbit.config import SCOPE, FitbitSource
from connectors.wearables.fitbit.oauth import (
    FitbitOAuth,
    PatientAuthError,
    Tokens,
    TokenStore,
    authorization_request,
    code_from_redirect,
)
from connectors.wearables.fitbit.samples import SLEEP_LEVEL
from harmonize.wearables.metrics import normalize_samples
from tests.support.data import ROOT
from tests.support.fitbit import AUG_23, connect, counts, frame, make_source, pull, token_store
from tests.support.fitbit_server import CLIENT_ID, FitbitServer, User

HEART = "fitbit-activities-heart-1d-1m-intraday.json"
STEPS = "fitbit-activities-steps-1d-1m-intraday.json"


def keys(batches: list[Batch]) -> set[tuple[str, str, datetime]]:
    return set(frame(batches).select("patient_id", "metric", "start_time").iter_rows())


def problems(batches: list[Batch]) -> list[dict[str, Any]]:
    return [row for b in batches for row in b.problems.to_pylist()]


def intraday_points(server: FitbitServer, name: str) -> int:
    body = server.bodies[name]
    (key,) = [k for k in body if k.endswith("-intraday")]
    return len(body[key]["dataset"])


def expected_from_bodies(server: FitbitServer, first: date, last: date) -> Counter[str]:
    """Samples the served ranged bodies (sleep, weight, daily steps, nightly SpO2) should yield
    for [first, last], counted from the bodies themselves."""
    want: Counter[str] = Counter()
    steps = server.bodies["fitbit-activities-steps-timeseries.json"]["activities-steps"]
    want["steps"] = (last - first).days + 1  # Fitbit answers every day of a range, "0" for none
    assert all(first <= date.fromisoformat(e["dateTime"]) <= last for e in steps)
    for log_ in server.bodies["fitbit-sleep-date-range.json"]["sleep"]:
        want.update(SLEEP_LEVEL[s["level"]] for s in log_["levels"]["data"])
        want["time_in_bed"] += 1
    for entry in server.bodies["fitbit-body-log-weight.json"]["weight"]:
        want.update(
            m
            for k, m in (
                ("weight", "body_weight"),
                ("bmi", "body_mass_index"),
                ("fat", "body_fat_percentage"),
            )
            if k in entry
        )
    want["oxygen_saturation"] = 1  # one night made by the stand-in
    return want


@pytest.mark.shared
def test_recorded_responses_yield_the_samples_they_hold(
    recorded_server: FitbitServer, tmp_path: Path
) -> None:
    server = recorded_server
    source = make_source(server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    store = token_store(source)
    connect(server, make_source(server, tmp_path), store)  # every scope

    minutes, _ = pull(source, store, now=AUG_23)
    assert counts(minutes) == {
        "heart_rate": intraday_points(server, HEART),
        "steps": intraday_points(server, STEPS),
    }
    # The day's total beside its minutes is Fitbit's own figure: 3212 steps, the minutes 59.
    reported = pa.concat_tables([b.reported for b in minutes if b.reported is not None]).to_pylist()
    (total,) = server.bodies[STEPS]["activities-steps"]
    assert [(r["metric"], r["value"], r["end_time"] - r["start_time"]) for r in reported] == [
        ("steps", float(total["value"]), timedelta(days=1))
    ]
    heart = frame(minutes).filter(pl.col("metric") == "heart_rate").sort("start_time").row(0, named=True)
    first = server.bodies[HEART]["activities-heart-intraday"]["dataset"][0]
    local = datetime.fromisoformat(f"2015-08-21T{first['time']}")
    assert heart["start_time"] == (local + timedelta(hours=7)).replace(tzinfo=UTC)  # Los Angeles, PDT
    assert heart["end_time"] - heart["start_time"] == timedelta(minutes=1)
    assert (heart["utc_offset_minutes"], heart["value"], heart["unit"]) == (-420, first["value"], "bpm")
    assert heart["device"] == "Fitbit Charge HR"
    assert heart["origin"] == "/1/user/-/activities/heart/date/2015-08-21/1d/1min.json"
    # The 2015 API's daily heart value is a bare number of unstated meaning: counted, not landed.
    assert sum(b.stats["heart_rate_daily_values_skipped"] for b in minutes) == 1

    ranged = make_source(
        server, tmp_path, "steps", "sleep", "spo2", "weight", intraday=False, since="2015-05-01"
    )
    days, connector = pull(ranged, store)
    assert counts(days) == expected_from_bodies(server, date(2015, 5, 1), date(2016, 12, 15))
    assert connector.stats["steps_requests"] == 1  # 1095 days a request
    assert connector.stats["sleep_requests"] == 6  # 100
    got = frame(days)
    steps = server.bodies["fitbit-activities-steps-timeseries.json"]["activities-steps"]
    assert got.filter(pl.col("metric") == "steps")["value"].sum() == sum(float(e["value"]) for e in steps)
    weights = server.bodies["fitbit-body-log-weight.json"]["weight"]
    weight = got.filter(pl.col("metric") == "body_weight").sort("start_time")
    assert weight["value"].to_list() == [w["weight"] for w in weights]
    assert set(weight["device"]) == {"Fitbit Aria"}  # the account's scale

    nights, _ = pull(make_source(server, tmp_path, "spo2", since="2016-12-12"), store)
    assert counts(nights)["oxygen_saturation"] > 1  # per minute

    # Every metric and unit is in the catalogue: nothing is quarantined downstream either.
    everything = pa.concat_tables([b.samples for b in minutes + days + nights if b.samples is not None])
    good, bad = normalize_samples(everything)
    assert bad.num_rows == 0 and good.num_rows == everything.num_rows
    normalized = pl.from_arrow(good)
    assert isinstance(normalized, pl.DataFrame)
    asleep = normalized.filter(pl.col("metric") == "sleep_asleep")
    logs = server.bodies["fitbit-sleep-date-range.json"]["sleep"]
    assert asleep["value"].sum() == pytest.approx(sum(s["minutesAsleep"] for s in logs))
    awake = normalized.filter(pl.col("metric") == "sleep_awake")["value"].sum()
    assert awake == pytest.approx(sum(s["minutesAwake"] for s in logs))  # restless counts as awake
    assert set(asleep["utc_offset_minutes"]) == {-480}  # December: PST
    assert problems(minutes + days + nights) == []


def test_own_fixtures_stages_sleep_resting_rate_and_weight_sources(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    server = fitbit_server
    source = make_source(server, tmp_path, since="2015-05-01", intraday=False)
    store = token_store(source)
    connect(server, source, store)
    batches, _ = pull(source, store)
    want = expected_from_bodies(server, date(2015, 5, 1), date(2016, 12, 15))
    assert counts(batches) == want + Counter({"resting_heart_rate": 1})
    got = frame(batches)
    sleep = (
        got.filter(pl.col("metric").str.starts_with("sleep_")).group_by("metric").agg(pl.col("value").sum())
    )
    assert dict(sleep.iter_rows()) == {
        "sleep_light": 2400,
        "sleep_deep": 1200,
        "sleep_rem": 900,
        "sleep_awake": 420,
    }
    devices = dict(got.filter(pl.col("metric") == "body_weight").select("value", "device").iter_rows())
    assert devices == {70.5: "Fitbit Aria", 70.1: "Fitbit (Web entry)"}
    assert got.filter(pl.col("metric") == "body_fat_percentage")["value"].to_list() == [18.5]
    resting = got.filter(pl.col("metric") == "resting_heart_rate").row(0, named=True)
    assert (resting["value"], resting["end_time"] - resting["start_time"]) == (58, timedelta(days=1))
    assert normalize_samples(pa.concat_tables([b.samples for b in batches if b.samples]))[1].num_rows == 0


def test_what_cannot_become_a_sample_is_a_problem_with_the_reason(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    server = fitbit_server
    server.bodies[HEART]["activities-heart-intraday"]["dataset"] += [
        {"time": "25:99:00", "value": 70},
        {"time": "00:09:00", "value": "n/a"},
    ]
    server.bodies["fitbit-sleep-date-range.json"]["sleep"][0]["levels"]["data"].append(
        {"dateTime": "2016-12-13T00:52:00.000", "level": "snoring", "seconds": 60}
    )
    source = make_source(server, tmp_path, "heart_rate", "sleep", since="2015-08-20")
    store = token_store(source)
    connect(server, source, store)
    batches, connector = pull(source, store, now=AUG_23)
    found = {(row["reason"], row["raw"]) for row in problems(batches)}
    assert found == {
        ("an intraday point whose time is not HH:MM:SS", '{"time":"25:99:00","value":70}'),
        ("an intraday point whose value is not a number", '{"time":"00:09:00","value":"n/a"}'),
    }
    assert counts(batches)["heart_rate"] == 6  # the good points still land
    assert connector.stats["problems"] == 2
    sleeps, _ = pull(make_source(server, tmp_path, "sleep", since="2016-12-12"), store)
    assert [r["reason"] for r in problems(sleeps)] == ["an unknown sleep level in sleep log 26013218219"]
    assert {r["file"] for r in problems(sleeps)} == {"/1.2/user/-/sleep/date/2016-12-12/2016-12-15.json"}


def test_a_day_without_intraday_points_keeps_its_daily_total(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.bodies[STEPS]["activities-steps-intraday"]["dataset"] = []  # an app without intraday access
    source = make_source(fitbit_server, tmp_path, "steps", since="2015-08-20")
    store = token_store(source)
    connect(fitbit_server, source, store)
    batches, _ = pull(source, store, now=AUG_23)
    row = frame(batches).row(0, named=True)
    assert len(frame(batches)) == 1  # days whose total is 0 add nothing
    assert (row["value"], row["end_time"] - row["start_time"]) == (40, timedelta(days=1))


def test_each_patient_has_a_watermark_and_the_next_sync_asks_from_it(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER2"] = User(
        "USER2", timezone="Europe/Berlin", last_sync="2016-12-10T07:00:00"
    )
    source = make_source(fitbit_server, tmp_path, "heart_rate", since="2016-12-01")
    store = token_store(source)
    connect(fitbit_server, source, store, "p1", "USER1")
    connect(fitbit_server, source, store, "p2", "USER2")
    batches, connector = pull(source, store)
    mark = batches[-1].watermark
    # Complete: before today and before the day the tracker last synced.
    assert mark == {"patients": {"p1": {"heart_rate": "2016-12-13"}, "p2": {"heart_rate": "2016-12-09"}}}
    assert connector.stats["patients"] == 2

    fitbit_server.state.requests.clear()
    pull(source, store, mark)
    asked = {
        u: [p.split("/")[7] for p in fitbit_server.api_requests(u) if "/heart/" in p]
        for u in ("USER1", "USER2")
    }
    # From the watermark, one day of overlap (a tracker may sync a day late), up to today.
    assert asked == {
        "USER1": ["2016-12-13", "2016-12-14", "2016-12-15"],
        "USER2": [str(date(2016, 12, 9) + timedelta(days=d)) for d in range(7)],
    }


def test_re_pulling_an_overlapping_window_yields_the_same_samples_never_new_ones(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, since="2015-08-19")
    store = token_store(source)
    connect(fitbit_server, source, store)
    first, _ = pull(source, store, now=AUG_23)
    overlap, _ = pull(source, store, {"patients": {"p1": {d: "2015-08-20" for d in SCOPE}}}, now=AUG_23)
    again, _ = pull(source, store, now=AUG_23)
    assert keys(overlap) <= keys(first) and keys(again) == keys(first)
    assert frame(again).sort("metric", "start_time").equals(frame(first).sort("metric", "start_time"))


def test_a_backfill_window_asks_for_its_days_and_leaves_the_watermark(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate")
    store = token_store(source)
    connect(fitbit_server, source, store)
    window = Window(since=datetime(2015, 8, 21, tzinfo=UTC), until=datetime(2015, 8, 22, tzinfo=UTC))
    batches, _ = pull(source, store, window=window)
    assert counts(batches) == {"heart_rate": intraday_points(fitbit_server, HEART), "resting_heart_rate": 1}
    assert [p.split("/")[7] for p in fitbit_server.api_requests() if "/heart/" in p] == [
        "2015-08-20",
        "2015-08-21",
        "2015-08-22",
    ]
    assert batches[-1].watermark == {"patients": {"p1": {}}}


def test_forced_expiry_refreshes_the_tokens_once_and_the_pull_goes_on(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    store = token_store(source)
    first = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()
    batches, connector = pull(source, store, now=AUG_23)
    assert len(batches[0].samples or []) > 0
    assert fitbit_server.state.statuses[401] == 1  # the expired token, once; then the fresh one
    assert connector.stats["token_refreshes"] == 1
    assert fitbit_server.token_posts() == 2  # the connection, the refresh
    saved = store.load("p1")
    assert saved is not None
    assert saved.access_token in fitbit_server.state.grants  # the new pair is the one saved
    assert saved.refresh_token in fitbit_server.state.refresh
    assert first.refresh_token in fitbit_server.state.used_refresh
    assert saved.refreshing_since is None


def test_a_token_expired_by_the_clock_is_refreshed_before_asking(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "weight")
    store = token_store(source)
    tokens = connect(fitbit_server, source, store)
    pull(source, store, now=datetime.fromtimestamp(tokens.expires_at, UTC) + timedelta(minutes=1))
    assert fitbit_server.state.statuses[401] == 0
    assert fitbit_server.token_posts() == 2
    assert fitbit_server.state.requests[1] == ("POST", "/oauth2/token", "")  # before any data request


def test_a_server_app_authenticates_with_its_client_secret(
    fitbit_server: FitbitServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FITBIT_SECRET", "s3cret")
    source = make_source(fitbit_server, tmp_path, "weight", client_secret_env="FITBIT_SECRET")
    store = token_store(source)
    connect(fitbit_server, source, store)
    assert fitbit_server.state.basic_auth == [f"{CLIENT_ID}:s3cret"]
    assert fitbit_server.state.form_client_ids == [None]  # not in the body then


def test_429_with_retry_after_is_waited_out_and_retried(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    store = token_store(source)
    connect(fitbit_server, source, store)
    calm, _ = pull(source, store, now=AUG_23)
    fitbit_server.state.fail_next_429, fitbit_server.state.retry_after = 2, "3"
    waits: list[float] = []
    batches, connector = pull(source, store, now=AUG_23, sleep=waits.append)
    assert waits == [3.0, 3.0]
    assert keys(batches) == keys(calm)
    assert connector.stats["rate_limited"] == 2


def test_a_spent_budget_is_waited_for_when_it_resets_soon(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    store = token_store(source)
    connect(fitbit_server, source, store)
    fitbit_server.state.hourly_limit, fitbit_server.state.reset_seconds = 3, 5
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the hour passes
        waits.append(seconds)
        fitbit_server.state.spent.clear()

    batches, connector = pull(source, store, now=AUG_23, sleep=sleep)
    assert counts(batches)["heart_rate"] == intraday_points(fitbit_server, HEART)
    assert fitbit_server.state.statuses[429] == 0  # the headers said so before Fitbit had to
    assert len(waits) == 2  # 8 requests (profile, devices, 3 days of each) at 3 an "hour"
    assert all(5 <= w <= 7 for w in waits)
    assert connector.stats["rate_limit_waits"] == 2


@pytest.mark.parametrize("how", ["headers", "429"])
def test_a_long_rate_limit_leaves_the_patient_for_the_next_sync(
    fitbit_server: FitbitServer, tmp_path: Path, how: str
) -> None:
    fitbit_server.state.users["USER2"] = User("USER2")
    source = make_source(fitbit_server, tmp_path, "heart_rate", "steps", since="2015-08-19")
    store = token_store(source)
    connect(fitbit_server, source, store, "p1", "USER1")
    connect(fitbit_server, source, store, "p2", "USER2")
    now = datetime(2015, 8, 24, tzinfo=UTC)
    if how == "headers":
        fitbit_server.state.hourly_limit, fitbit_server.state.reset_seconds = 6, 1800
    else:  # no warning in the headers: Fitbit's 429 says to come back in half an hour
        fitbit_server.state.fail_next_429, fitbit_server.state.retry_after = 1, "1800"
    waits: list[float] = []
    first, connector = pull(source, store, now=now, sleep=waits.append)
    assert waits == []  # never an hour's sleep inside a sync
    assert connector.stats["patients_rate_limited"] == (2 if how == "headers" else 1)
    mark = first[-1].watermark

    fitbit_server.state.hourly_limit = 10_000
    fitbit_server.state.spent.clear()
    rest, _ = pull(source, store, mark, now=now)
    assert rest[-1].watermark == {
        "patients": {p: {"heart_rate": "2015-08-22", "steps": "2015-08-22"} for p in ("p1", "p2")}
    }
    whole, _ = pull(source, store, None, now=now)
    assert keys(first) | keys(rest) == keys(whole)
    assert len(keys(whole)) == 2 * (
        intraday_points(fitbit_server, HEART) + 1 + intraday_points(fitbit_server, STEPS)
    )


def _crash_mid_refresh(source: FitbitSource, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A sync in its own process, killed (os._exit: no cleanup runs) after Fitbit answered the
    refresh and before the new pair was saved."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\n"
        "from datetime import datetime, UTC\n"
        "from pathlib import Path\n"
        "from connectors.wearables.fitbit.api import FitbitConnector\n"
        "from connectors.wearables.fitbit.config import FitbitSource\n"
        "from connectors.wearables.fitbit.oauth import FitbitOAuth, TokenStore\n"
        "FitbitOAuth._persist = lambda self, tokens: os._exit(17)\n"
        "source = FitbitSource.model_validate_json(sys.argv[1])\n"
        "store = TokenStore.for_source(source, source.token_path(Path('unused')))\n"
        "clock = datetime(2015, 8, 23, tzinfo=UTC).timestamp\n"
        "list(FitbitConnector(source, store, clock=clock).pull(None))\n"
    )
    return subprocess.run(
        [sys.executable, str(script), source.model_dump_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_crash_between_refresh_and_persist_strands_no_patient(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", "steps", since="2015-08-20")
    store = token_store(source)
    old = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()

    crashed = _crash_mid_refresh(source, tmp_path)
    assert crashed.returncode == 17, crashed.stderr
    kept = store.load("p1")
    assert kept is not None
    assert kept.refresh_token == old.refresh_token  # the old pair, whole, noting the refresh in flight
    assert kept.refreshing_since is not None
    assert old.refresh_token in fitbit_server.state.used_refresh  # Fitbit had rotated it

    batches, _ = pull(source, store, now=AUG_23)
    assert counts(batches)["heart_rate"] == intraday_points(fitbit_server, HEART)
    saved = store.load("p1")
    assert saved is not None and saved.refreshing_since is None
    assert saved.access_token in fitbit_server.state.grants
    assert saved.refresh_token in fitbit_server.state.refresh
    assert len(fitbit_server.state.refresh) == 1  # the retried refresh got the same pair, not another


def test_a_refused_refresh_names_the_patient_and_the_fix_and_the_others_still_land(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER2"] = User("USER2")
    source = make_source(fitbit_server, tmp_path, "heart_rate", since="2015-08-20")
    store = token_store(source)
    connect(fitbit_server, source, store, "p1", "USER1")
    connect(fitbit_server, source, store, "p2", "USER2")
    fitbit_server.expire_access_tokens()
    assert _crash_mid_refresh(source, tmp_path).returncode == 17  # p1 comes first
    fitbit_server.state.grace_seconds = 0  # too late to ask again

    connector = FitbitConnector(source, store, clock=AUG_23.timestamp)
    landed: list[Batch] = []
    with pytest.raises(SourceError) as caught:
        landed.extend(connector.pull(None))
    assert {row[0] for row in keys(landed)} == {"p2"}
    message = str(caught.value)
    assert message.startswith(
        "source 'fitbit': patient p1: Fitbit refused refreshing the access token (invalid_grant)"
    )
    assert "was cut short before its new tokens were saved" in message
    assert message.endswith(
        "connect them again: twinhub wearables connect fitbit --patient p1 --source fitbit"
    )
    assert "\n" not in message
    assert connector.stats["patients_refused"] == 1


def test_a_crash_while_writing_the_token_file_leaves_the_old_pair_whole(
    fitbit_server: FitbitServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source)
    old = connect(fitbit_server, source, store)
    before = sorted(p.name for p in store.path.parent.iterdir())

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        FitbitOAuth(source, store).refresh("p1", old)
    monkeypatch.undo()
    kept = store.load("p1")
    assert kept is not None and kept.refresh_token == old.refresh_token
    assert sorted(p.name for p in store.path.parent.iterdir()) == before  # no part file left
    assert before == ["fitbit.tokens", "fitbit.tokens.key", "fitbit.tokens.lock"]


def test_concurrent_refreshes_use_the_refresh_token_once(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source)
    old = connect(fitbit_server, source, store)
    fitbit_server.state.grace_seconds = 0  # a second use would be refused
    results: list[Tokens] = []

    def refresh() -> None:  # as separate processes would: each its own store and client
        results.append(FitbitOAuth(source, token_store(source)).refresh("p1", old))

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len({r.access_token for r in results}) == 1
    assert fitbit_server.token_posts() == 2  # the connection and one refresh


def test_tokens_never_reach_logs_errors_reprs_samples_or_the_file_in_clear(
    fitbit_server: FitbitServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = make_source(fitbit_server, tmp_path, "heart_rate", since="2015-08-20")
    store = token_store(source)
    tokens = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()
    batches, _ = pull(source, store, now=AUG_23)
    fitbit_server.expire_access_tokens()
    fitbit_server.state.refresh.clear()  # Fitbit forgot the grant: it refuses, quoting the token
    fitbit_server.state.used_refresh.clear()
    with pytest.raises(SourceError) as caught:
        pull(source, store, now=AUG_23)
    saved = store.load("p1")
    assert saved is not None
    issued = fitbit_server.issued_tokens() | {tokens.access_token, tokens.refresh_token}
    issued |= {saved.access_token, saved.refresh_token}
    request = authorization_request(source)
    visible = "\n".join(
        [caplog.text, str(caught.value), repr(saved), repr(tokens), repr(request), frame(batches).write_csv()]
        + [p.read_bytes().decode("latin-1") for p in store.path.parent.iterdir() if p.suffix != ".key"]
    )
    assert len(issued) >= 4
    assert not [t for t in issued | {request.verifier, request.state} if t in visible]
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert oct(store.path.with_name("fitbit.tokens.key").stat().st_mode & 0o777) == "0o600"


def test_the_connection_uses_pkce_and_checks_the_redirect(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path)
    request = authorization_request(source)
    query = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
    digest = (
        base64.urlsafe_b64encode(hashlib.sha256(request.verifier.encode()).digest()).rstrip(b"=").decode()
    )
    assert query["code_challenge"] == digest and query["code_challenge_method"] == "S256"
    assert query["client_id"] == CLIENT_ID and query["redirect_uri"] == source.redirect_uri
    assert sorted(query["scope"].split()) == sorted(source.scopes)
    assert 43 <= len(request.verifier) <= 128

    redirect = fitbit_server.authorize(request.url)
    with pytest.raises(SourceError, match="state does not match"):
        code_from_redirect("fitbit", authorization_request(source), redirect)
    with pytest.raises(SourceError, match=r"Fitbit did not authorize \(access_denied: The user denied"):
        code_from_redirect(
            "fitbit", request, f"{source.redirect_uri}?error=access_denied&error_description=The+user+denied"
        )
    bare = parse_qs(urlsplit(redirect).query)["code"][0]
    assert code_from_redirect("fitbit", request, f"  {bare}\n") == bare

    store = token_store(source)
    oauth = FitbitOAuth(source, store)
    tokens = oauth.connect("p1", request, bare)
    assert (tokens.user_id, tokens.patient) == ("USER1", "p1")
    assert fitbit_server.state.form_client_ids == [CLIENT_ID]  # a client app: PKCE, no secret
    with pytest.raises(
        PatientAuthError, match=r"Fitbit refused exchanging the authorization code \(invalid_grant\)"
    ):
        oauth.connect("p1", request, bare)  # a code works once
    with pytest.raises(SourceError, match="is not a FHIR Patient id"):
        oauth.connect("../p1", request, bare)
    oauth.close()


def test_data_the_patient_did_not_allow_is_not_asked_for(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", "weight", since="2015-05-12")
    store = token_store(source)
    connect(fitbit_server, source, store, scopes="weight")  # not heartrate, profile or settings
    batches, connector = pull(source, store, now=datetime(2015, 5, 30, tzinfo=UTC))
    assert set(counts(batches)) == {"body_weight", "body_mass_index", "body_fat_percentage"}
    assert connector.stats["heart_rate_not_allowed"] == 1
    assert all("/heart/" not in p and "profile" not in p for p in fitbit_server.api_requests())
    first = frame(batches).sort("start_time").row(0, named=True)
    assert first["start_time"] == datetime(2015, 5, 13, 8, tzinfo=UTC)  # the configured zone: UTC
    assert first["utc_offset_minutes"] == 0


def test_no_intraday_access_says_how_to_go_on(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, "steps", since="2015-08-20")
    store = token_store(source)
    connect(fitbit_server, source, store)
    fitbit_server.state.intraday_allowed = False
    with pytest.raises(
        SourceError, match="Fitbit gives this application no intraday data: set intraday = false"
    ):
        pull(source, store, now=AUG_23)
    daily = make_source(fitbit_server, tmp_path, "steps", since="2015-08-20", intraday=False)
    batches, _ = pull(daily, store, now=datetime(2015, 8, 26, tzinfo=UTC))
    steps = fitbit_server.bodies["fitbit-activities-steps-timeseries.json"]["activities-steps"]
    assert frame(batches)["value"].to_list() == [
        0,
        0,
        0,
        *(float(e["value"]) for e in steps),
    ]  # to 08-25 in LA


def test_a_wrong_or_missing_key_or_no_patient_is_one_line_naming_the_fix(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source)
    with pytest.raises(
        SourceError, match="no patient is connected yet; connect one: twinhub wearables connect"
    ):
        FitbitConnector(source, store).check()
    connect(fitbit_server, source, store)
    with pytest.raises(SourceError, match=r"cannot decrypt .*fitbit\.tokens with the configured token key"):
        TokenStore("fitbit", store.path, Fernet.generate_key().decode()).patients()
    with pytest.raises(SourceError, match="is not a Fernet key"):
        TokenStore("fitbit", store.path, "not a key").patients()
    store.path.with_name("fitbit.tokens.key").rename(tmp_path / "elsewhere.key")
    with pytest.raises(SourceError, match=r"the key file .*fitbit\.tokens\.key of .* is missing; restore it"):
        token_store(source).patients()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"client_secret": "s"}, "secrets never go in the config file: remove `client_secret`"),
        ({"token_key_file": "k", "token_key_env": "K"}, "set at most one of token_key_file or token_key_env"),
        ({"scopes": ["profile"]}, "scopes allow no data to pull; add at least one of"),
        ({"scopes": ["pulse"]}, "scopes.0"),
        ({"timezone": "Mars/Olympus"}, "'Mars/Olympus' is not an IANA time zone"),
        ({"api_url": "api.fitbit.com"}, r"is not an http\(s\) URL"),
    ],
)
def test_config_mistakes(extra: dict[str, object], message: str) -> None:
    base = {"name": "f", "kind": "fitbit", "client_id": "X", "redirect_uri": "http://127.0.0.1/cb"}
    with pytest.raises(ValueError, match=message):
        FitbitSource.model_validate({**base, **extra})


def test_samples_follow_the_seam_schema_in_bounded_batches(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, "heart_rate", since="2015-08-20", batch_samples=2)
    store = token_store(source)
    connect(fitbit_server, source, store)
    batches, _ = pull(source, store, now=AUG_23)
    assert all(b.samples is not None and b.samples.schema == SAMPLE_SCHEMA for b in batches)
    assert max(len(b.samples or []) for b in batches) <= 8  # one day's points at most past the bound
    assert batches[-1].watermark == {"patients": {"p1": {"heart_rate": "2015-08-21"}}}


def test_local_times_are_placed_with_the_offset_in_force_across_a_dst_change(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER1"] = User("USER1", timezone="Europe/Berlin")
    fitbit_server.bodies["fitbit-body-log-weight.json"]["weight"] = [
        {"date": "2016-03-27", "time": "01:30:00", "weight": 70.0, "logId": 1},  # CET, +01:00
        {"date": "2016-03-27", "time": "03:30:00", "weight": 69.9, "logId": 2},  # CEST, +02:00
    ]
    source = make_source(fitbit_server, tmp_path, "weight", since="2016-03-20")
    store = token_store(source)
    connect(fitbit_server, source, store)
    batches, _ = pull(source, store, now=datetime(2016, 3, 30, tzinfo=UTC))
    rows = frame(batches).sort("start_time").select("start_time", "utc_offset_minutes").rows()
    assert rows == [
        (datetime(2016, 3, 27, 0, 30, tzinfo=UTC), 60),
        (datetime(2016, 3, 27, 1, 30, tzinfo=UTC), 120),
    ]
