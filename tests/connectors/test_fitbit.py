"""The Fitbit connector against a local stand-in for the Fitbit Web API that serves the recorded
real responses (tests/fitbit_server.py): what lands, per-patient watermarks, token refresh and
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
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import polars as pl
import pyarrow as pa
import pytest

from connectors.base import Batch, Watermark, Window
from connectors.errors import SourceError
from connectors.fitbit import FitbitConnector, FitbitSource
from connectors.fitbit_auth import (
    FitbitOAuth,
    PatientAuthError,
    Tokens,
    TokenStore,
    authorization_request,
    code_from_redirect,
    new_key,
)
from harmonize.wearables import normalize_samples
from tests.fitbit_server import CLIENT_ID, FitbitServer, User

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2016, 12, 15, 12, tzinfo=UTC)


def make_source(server: FitbitServer, tmp_path: Path, **extra: object) -> FitbitSource:
    key = tmp_path / "token.key"
    if not key.exists():
        key.write_text(new_key())
    return FitbitSource.model_validate(
        {
            "name": "fitbit",
            "kind": "fitbit",
            "client_id": CLIENT_ID,
            "redirect_uri": "http://127.0.0.1:9/fitbit/callback",
            "token_key_file": key,
            "api_url": server.url,
            "authorize_url": f"{server.url}/oauth2/authorize",
            **extra,
        }
    )


def token_store(source: FitbitSource, tmp_path: Path) -> TokenStore:
    return TokenStore.for_source(source, tmp_path / "tokens")


def connect(
    server: FitbitServer,
    source: FitbitSource,
    store: TokenStore,
    patient: str = "p1",
    user: str = "USER1",
    scopes: str | None = None,
) -> Tokens:
    request = authorization_request(source)
    redirect = server.authorize(request.url, user, scopes)
    oauth = FitbitOAuth(source, store)
    try:
        return oauth.connect(patient, request, code_from_redirect(source.name, request, redirect))
    finally:
        oauth.close()


def pull(
    source: FitbitSource,
    store: TokenStore,
    since: Watermark | None = None,
    *,
    now: datetime = NOW,
    sleep: Callable[[float], None] | None = None,
    window: Window | None = None,
) -> tuple[list[Batch], FitbitConnector]:
    connector = FitbitConnector(source, store, clock=now.timestamp, sleep=sleep or (lambda s: None))
    return list(connector.pull(since, window)), connector


def frame(batches: list[Batch]) -> pl.DataFrame:
    tables = [b.samples for b in batches if b.samples is not None]
    found = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(found, pl.DataFrame)
    return found


def counts(batches: list[Batch]) -> dict[str, int]:
    return dict(Counter(frame(batches)["metric"].to_list()))


def keys(batches: list[Batch]) -> set[tuple[str, str, datetime]]:
    return set(frame(batches).select("patient_id", "metric", "start_time").iter_rows())


def test_recorded_responses_become_samples_with_the_right_counts(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    intraday = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-20")
    store = token_store(intraday, tmp_path)
    connect(fitbit_server, make_source(fitbit_server, tmp_path), store)  # every scope

    minutes, _ = pull(intraday, store, now=datetime(2015, 8, 23, 12, tzinfo=UTC))
    assert counts(minutes) == {"heart_rate": 5, "steps": 3}  # the recorded datasets, whole
    heart = frame(minutes).filter(pl.col("metric") == "heart_rate").sort("start_time").row(0, named=True)
    assert heart["start_time"] == datetime(2015, 8, 21, 7, 1, tzinfo=UTC)  # 00:01 in Los Angeles (PDT)
    assert heart["end_time"] - heart["start_time"] == timedelta(minutes=1)
    assert (heart["utc_offset_minutes"], heart["value"], heart["unit"]) == (-420, 64.0, "bpm")
    assert heart["device"] == "Fitbit Charge HR"
    assert heart["origin"] == "/1/user/-/activities/heart/date/2015-08-21/1d/1min.json"

    ranged = make_source(
        fitbit_server,
        tmp_path,
        data=["steps", "sleep", "spo2", "weight"],
        intraday=False,
        start_date="2015-05-01",
    )
    days, connector = pull(ranged, store)
    steps_days = (date(2016, 12, 15) - date(2015, 5, 1)).days + 1  # Fitbit answers 0 for a day without
    assert counts(days) == {
        "steps": steps_days,
        "sleep_asleep": 5,
        "sleep_awake": 3,  # classic "restless": Fitbit counts it in minutesAwake
        "time_in_bed": 2,
        "oxygen_saturation": 1,
        "body_weight": 4,
        "body_mass_index": 4,
    }
    # Far fewer requests by range: 1095 days of steps, 100 of sleep, 31 of weight, 30 of SpO2 each.
    assert connector.stats["steps_requests"] == 1
    assert connector.stats["sleep_requests"] == 6
    got = frame(days)
    assert got.filter(pl.col("metric") == "steps")["value"].sum() == 175 + 2937
    weight = got.filter(pl.col("metric") == "body_weight").sort("start_time")
    assert weight["value"].to_list() == [56.7, 55.9, 58.1, 57.2]
    assert set(weight["device"]) == {"Fitbit Aria"}
    assert weight["start_time"][0] == datetime(2015, 5, 14, 1, 28, 59, tzinfo=UTC)  # 18:28:59 PDT

    spo2 = make_source(fitbit_server, tmp_path, data=["spo2"], start_date="2016-12-12")
    nights, _ = pull(spo2, store)
    assert counts(nights) == {"oxygen_saturation": 4}

    # Every metric and unit the connector names is in the catalogue: nothing is quarantined.
    everything = pa.concat_tables([b.samples for b in minutes + days + nights if b.samples is not None])
    good, problems = normalize_samples(everything)
    assert problems.num_rows == 0
    assert good.num_rows == everything.num_rows
    normalized = pl.from_arrow(good)
    assert isinstance(normalized, pl.DataFrame)
    asleep = normalized.filter(pl.col("metric") == "sleep_asleep")
    assert asleep["value"].sum() == pytest.approx(175)  # minutesAsleep of the two recorded logs
    assert set(asleep["unit"]) == {"min"}
    assert set(asleep["utc_offset_minutes"]) == {-480}  # December: PST


def test_each_patient_has_a_watermark_and_the_next_sync_asks_from_it(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER2"] = User(
        "USER2", timezone="Europe/Berlin", last_sync="2016-12-10T07:00:00"
    )
    source = make_source(fitbit_server, tmp_path, data=["heart_rate"], start_date="2016-12-01")
    store = token_store(source, tmp_path)
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


def test_a_backfill_window_asks_for_its_days_and_leaves_the_watermark(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate"])
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store)
    window = Window(since=datetime(2015, 8, 21, tzinfo=UTC), until=datetime(2015, 8, 22, tzinfo=UTC))
    batches, _ = pull(source, store, window=window)
    assert counts(batches) == {"heart_rate": 5}
    assert [p.split("/")[7] for p in fitbit_server.api_requests() if "/heart/" in p] == [
        "2015-08-20", "2015-08-21", "2015-08-22"
    ]  # fmt: skip
    assert batches[-1].watermark == {"patients": {"p1": {}}}


def test_forced_expiry_refreshes_the_tokens_once_and_the_pull_goes_on(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    first = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()
    batches, connector = pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC))
    assert counts(batches) == {"heart_rate": 5, "steps": 3}
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
    source = make_source(fitbit_server, tmp_path, data=["weight"])
    store = token_store(source, tmp_path)
    tokens = connect(fitbit_server, source, store)
    later = datetime.fromtimestamp(tokens.expires_at, UTC) + timedelta(minutes=1)
    pull(source, store, now=later)
    assert fitbit_server.state.statuses[401] == 0
    assert fitbit_server.token_posts() == 2
    assert fitbit_server.state.requests[1] == ("POST", "/oauth2/token", "")  # before any data request


def test_429_with_retry_after_is_waited_out_and_retried(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store)
    fitbit_server.state.fail_next_429, fitbit_server.state.retry_after = 2, "3"
    waits: list[float] = []
    batches, connector = pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC), sleep=waits.append)
    assert waits == [3.0, 3.0]
    assert counts(batches) == {"heart_rate": 5, "steps": 3}
    assert connector.stats["rate_limited"] == 2


def test_a_spent_budget_is_waited_for_when_it_resets_soon(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store)
    fitbit_server.state.hourly_limit, fitbit_server.state.reset_seconds = 3, 5
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the hour passes
        waits.append(seconds)
        fitbit_server.state.spent.clear()

    batches, connector = pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC), sleep=sleep)
    assert counts(batches) == {"heart_rate": 5, "steps": 3}
    assert fitbit_server.state.statuses[429] == 0  # the headers said so before Fitbit had to
    assert len(waits) == 2  # 8 requests (profile, devices, 3 days of each) at 3 an "hour"
    assert all(5 <= w <= 7 for w in waits)
    assert connector.stats["rate_limit_waits"] == 2


@pytest.mark.parametrize("how", ["headers", "429"])
def test_a_long_rate_limit_leaves_the_patient_for_the_next_sync(
    fitbit_server: FitbitServer, tmp_path: Path, how: str
) -> None:
    fitbit_server.state.users["USER2"] = User("USER2")
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-19")
    store = token_store(source, tmp_path)
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
    assert len(keys(whole)) == 16


def _crash_mid_refresh(
    server: FitbitServer, source: FitbitSource, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """A sync in its own process, killed (os._exit, no cleanup) after Fitbit answered the refresh
    and before the new pair was saved."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\n"
        "from datetime import datetime, UTC\n"
        "from pathlib import Path\n"
        "from connectors.fitbit import FitbitConnector, FitbitSource\n"
        "from connectors.fitbit_auth import FitbitOAuth, TokenStore\n"
        "FitbitOAuth._persist = lambda self, tokens: os._exit(17)\n"
        "source = FitbitSource.model_validate_json(sys.argv[1])\n"
        "store = TokenStore.for_source(source, Path(sys.argv[2]))\n"
        "clock = datetime(2015, 8, 23, tzinfo=UTC).timestamp\n"
        "list(FitbitConnector(source, store, clock=clock).pull(None))\n"
    )
    return subprocess.run(
        [sys.executable, str(script), source.model_dump_json(), str(tmp_path / "tokens")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_crash_between_refresh_and_persist_strands_no_patient(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "steps"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    old = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()

    crashed = _crash_mid_refresh(fitbit_server, source, tmp_path)
    assert crashed.returncode == 17, crashed.stderr
    kept = store.load("p1")
    assert kept is not None
    assert kept.refresh_token == old.refresh_token  # the old pair, whole, noting the refresh in flight
    assert kept.refreshing_since is not None
    assert old.refresh_token in fitbit_server.state.used_refresh  # Fitbit had rotated it

    batches, _ = pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC))
    assert counts(batches) == {"heart_rate": 5, "steps": 3}
    saved = store.load("p1")
    assert saved is not None and saved.refreshing_since is None
    assert saved.access_token in fitbit_server.state.grants
    assert saved.refresh_token in fitbit_server.state.refresh
    assert len(fitbit_server.state.refresh) == 1  # the retried refresh got the same pair, not another


def test_a_refused_refresh_names_the_patient_and_the_fix_and_the_others_still_land(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    fitbit_server.state.users["USER2"] = User("USER2")
    source = make_source(fitbit_server, tmp_path, data=["heart_rate"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store, "p1", "USER1")
    connect(fitbit_server, source, store, "p2", "USER2")
    fitbit_server.expire_access_tokens()
    assert _crash_mid_refresh(fitbit_server, source, tmp_path).returncode == 17
    fitbit_server.state.grace_seconds = 0  # too late to ask again

    connector = FitbitConnector(source, store, clock=datetime(2015, 8, 23, tzinfo=UTC).timestamp)
    landed: list[Batch] = []
    with pytest.raises(SourceError) as caught:
        landed.extend(connector.pull(None))
    assert {row[0] for row in keys(landed)} == {"p2"}
    message = str(caught.value)
    assert message.startswith(
        "source 'fitbit': patient p1: Fitbit refused refreshing the access token (invalid_grant)"
    )
    assert "was cut short before its new tokens were saved" in message
    assert message.endswith("connect them again: twinhub wearables connect fitbit --patient p1")
    assert "\n" not in message
    assert connector.stats["patients_refused"] == 1


def test_a_crash_while_writing_the_token_file_leaves_the_old_pair_whole(
    fitbit_server: FitbitServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source, tmp_path)
    old = connect(fitbit_server, source, store)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    oauth = FitbitOAuth(source, store)
    with pytest.raises(OSError, match="No space left"):
        oauth.refresh("p1", old)
    monkeypatch.undo()
    kept = store.load("p1")
    assert kept is not None and kept.refresh_token == old.refresh_token
    assert sorted(p.name for p in store.folder.iterdir()) == ["p1.lock", "p1.token"]  # no part file left


def test_concurrent_refreshes_of_one_patient_use_the_refresh_token_once(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source, tmp_path)
    old = connect(fitbit_server, source, store)
    fitbit_server.state.grace_seconds = 0  # a second use would be refused
    results: list[Tokens] = []

    def refresh() -> None:
        oauth = FitbitOAuth(source, TokenStore.for_source(source, store.folder))
        results.append(oauth.refresh("p1", old))

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.access_token for r in results}) == 1 and len(results) == 4
    assert fitbit_server.token_posts() == 2  # the connection and one refresh


def test_tokens_never_reach_logs_errors_reprs_samples_or_the_file_in_clear(
    fitbit_server: FitbitServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = make_source(fitbit_server, tmp_path, data=["heart_rate"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    tokens = connect(fitbit_server, source, store)
    fitbit_server.expire_access_tokens()
    batches, _ = pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC))
    fitbit_server.expire_access_tokens()
    fitbit_server.state.refresh.clear()  # Fitbit forgot the grant: the refresh is refused, quoting the token
    fitbit_server.state.used_refresh.clear()
    with pytest.raises(SourceError) as caught:
        pull(source, store, now=datetime(2015, 8, 23, tzinfo=UTC))
    issued = fitbit_server.issued_tokens() | {tokens.access_token, tokens.refresh_token}
    saved = store.load("p1")
    assert saved is not None
    issued |= {saved.access_token, saved.refresh_token}
    visible = "\n".join(
        [caplog.text, str(caught.value), repr(saved), repr(tokens), frame(batches).write_csv()]
        + [p.read_bytes().decode("latin-1") for p in store.folder.iterdir()]
    )
    assert len(issued) >= 4
    assert not [t for t in issued if t in visible]
    assert oct((store.folder / "p1.token").stat().st_mode & 0o777) == "0o600"


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
    assert query["scope"].split() == ["activity", "heartrate", "oxygen_saturation", "profile", "settings",
                                      "sleep", "weight"]  # fmt: skip
    assert 43 <= len(request.verifier) <= 128 and request.verifier not in repr(request)

    redirect = fitbit_server.authorize(request.url)
    with pytest.raises(SourceError, match="state does not match"):
        code_from_redirect("fitbit", authorization_request(source), redirect)
    with pytest.raises(SourceError, match=r"Fitbit did not authorize \(access_denied: The user denied"):
        code_from_redirect(
            "fitbit", request, f"{source.redirect_uri}?error=access_denied&error_description=The+user+denied"
        )
    bare = parse_qs(urlsplit(redirect).query)["code"][0]
    assert code_from_redirect("fitbit", request, f"  {bare}\n") == bare

    store = token_store(source, tmp_path)
    oauth = FitbitOAuth(source, store)
    tokens = oauth.connect("p1", request, bare)
    assert (tokens.user_id, tokens.patient) == ("USER1", "p1")
    with pytest.raises(
        PatientAuthError, match=r"Fitbit refused exchanging the authorization code \(invalid_grant\)"
    ):
        oauth.connect("p1", request, bare)  # a code works once
    with pytest.raises(SourceError, match="is not a FHIR Patient id"):
        oauth.connect("../p1", request, bare)
    oauth.close()


def test_data_the_patient_did_not_allow_is_not_asked_for(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, data=["heart_rate", "weight"], start_date="2015-05-12")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store, scopes="weight")  # not heartrate, profile or settings
    batches, connector = pull(source, store, now=datetime(2015, 5, 30, tzinfo=UTC))
    assert counts(batches) == {"body_weight": 4, "body_mass_index": 4}
    assert connector.stats["heart_rate_not_allowed"] == 1
    assert all("/heart/" not in p and "profile" not in p for p in fitbit_server.api_requests())
    first = frame(batches).sort("start_time").row(0, named=True)
    assert first["start_time"] == datetime(2015, 5, 13, 18, 28, 59, tzinfo=UTC)  # the configured zone: UTC
    assert first["device"] == "Fitbit"


def test_a_missing_intraday_grant_says_how_to_go_on(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, data=["steps"], start_date="2015-08-20")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store)
    fitbit_server.state.intraday_allowed = False
    with pytest.raises(SourceError, match="no intraday access: set intraday = false"):
        pull(source, store, now=datetime(2015, 8, 22, tzinfo=UTC))
    daily = make_source(fitbit_server, tmp_path, data=["steps"], start_date="2015-08-20", intraday=False)
    batches, _ = pull(daily, store, now=datetime(2015, 8, 26, tzinfo=UTC))
    assert frame(batches)["value"].to_list() == [0, 0, 0, 175, 2937, 0]  # to 08-25 in Los Angeles


def test_a_wrong_key_or_no_patient_is_one_line_naming_the_fix(
    fitbit_server: FitbitServer, tmp_path: Path
) -> None:
    source = make_source(fitbit_server, tmp_path)
    store = token_store(source, tmp_path)
    with pytest.raises(
        SourceError, match="no patient is connected yet; connect one: twinhub wearables connect"
    ):
        FitbitConnector(source, store).check()
    connect(fitbit_server, source, store)
    other = TokenStore("fitbit", store.folder, new_key())
    with pytest.raises(SourceError, match=r"cannot decrypt .*p1\.token with the configured token key"):
        other.load("p1")
    with pytest.raises(SourceError, match="is not a Fernet key; make one with `twinhub wearables key FILE`"):
        TokenStore("fitbit", store.folder, "not a key")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"client_secret": "s"}, "secrets never go in the config file: remove `client_secret`"),
        ({"token_key_file": None}, "set exactly one of token_key_file or token_key_env"),
        ({"data": ["pulse"]}, "data.0"),
        ({"timezone": "Mars/Olympus"}, "'Mars/Olympus' is not an IANA time zone"),
        ({"api_url": "api.fitbit.com"}, "is not an http(s) URL"),
    ],
)
def test_config_mistakes(tmp_path: Path, extra: dict[str, object], message: str) -> None:
    base: dict[str, Any] = {"name": "f", "kind": "fitbit", "client_id": "X", "redirect_uri": "http://127.0.0.1/cb",
                            "token_key_file": tmp_path / "k"}  # fmt: skip
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FitbitSource.model_validate({**base, **extra})


def test_samples_serialize_to_the_seam_schema(fitbit_server: FitbitServer, tmp_path: Path) -> None:
    source = make_source(fitbit_server, tmp_path, data=["sleep"], start_date="2016-12-12")
    store = token_store(source, tmp_path)
    connect(fitbit_server, source, store)
    batches, _ = pull(source, store)
    from connectors.base import SAMPLE_SCHEMA

    assert all(b.samples is not None and b.samples.schema == SAMPLE_SCHEMA for b in batches)
    assert orjson.loads(orjson.dumps(batches[-1].watermark)) == batches[-1].watermark
