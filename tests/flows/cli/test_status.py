"""`twinhub status` as a user runs it, on a store where one source of every kind landed: each
source's row names its kind and says, in its kind's words, how far it got."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from connectors.errors import SourceError
from connectors.wearables.fitbit.config import FitbitSource
from connectors.wearables.fitbit.oauth import TokenStore
from flows.config import load_settings
from flows.sync import land_source
from tests.support.cli import run_cli
from tests.support.data import write_ndjson
from tests.support.fhir_server import start_server
from tests.support.fitbit import connect
from tests.support.fitbit_server import CLIENT_ID, FitbitServer, User
from tests.support.kinds import (
    FILE_KINDS,
    SERVER_KINDS,
    load_small_ehr,
    server_table,
    write_file_source,
    write_sources_config,
)

INSTANT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)"
AT = r" at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
"""When the watermark was written, as `status` shows it after the kind's words."""


def status_rows(config: Path) -> dict[str, list[str]]:
    """Each source's kind, schedule and progress as `status --json` gives them (the progress
    followed by when it was written, as the text says it), by source name."""
    result = run_cli("--config", str(config), "status", "--json")
    assert result.returncode == 0, "every source's last sync succeeded"
    facts = orjson.loads(result.stdout)
    rows = {}
    for source in facts["sources"]:
        at = source["progress_at"]
        progress = f"{source['progress']} at {at[:10]} {at[11:19]}" if at else "never synced"
        rows[source["name"]] = [source["kind"], source["schedule"] or "-", progress]
    return rows


def bad_lines(n_reasons: int) -> list[dict[str, object] | str]:
    """Four good Patients, then bad lines: `n_reasons` malformed references (a reason each), two
    lines of invalid JSON and two that are not JSON objects."""
    good: list[dict[str, object] | str] = [{"resourceType": "Patient", "id": f"p{i}"} for i in range(4)]
    bad: list[dict[str, object] | str] = [
        {"resourceType": "Patient", "id": f"b{i}", "link": [{"other": {"reference": f"no good {i}"}}]}
        for i in range(n_reasons)
    ]
    return [*good, *bad, '{"resourceType": "Patient", "id": "x"', '{"resourceType":', "[1]", "[2]"]


def test_status_reads_at_80_columns_says_why_a_run_failed_and_exits_2(tmp_path: Path) -> None:
    export = write_ndjson(tmp_path / "export" / "Patient.ndjson", bad_lines(6)).parent
    gone = tmp_path / "a folder the export was meant to be copied to, which never came to be"
    config = write_sources_config(
        tmp_path,
        {
            "ehr": {"kind": "fhir-ndjson", "path": str(export), "schedule": "0 2 * * *"},
            "copy": {"kind": "fhir-ndjson", "path": str(gone)},
        },
    )
    land_source.fn(str(config), "ehr")
    with pytest.raises(SourceError):
        land_source.fn(str(config), "copy")

    result = run_cli("--config", str(config), "status", env={"COLUMNS": "80"}, check=False)
    assert result.returncode == 2, "the last sync of a source failed: monitoring sees it"
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    text = " ".join(result.stdout.split())
    assert "ehr (fhir-ndjson, schedule 0 2 * * *) progress: 1/1 files complete, 14 lines" in text
    assert (
        "sync succeeded" in text and "14 lines read -> 4 new, 0 updated, 0 unchanged, 10 quarantined" in text
    )
    assert "copy (fhir-ndjson, no schedule) progress: none yet" in text
    assert (
        "sync FAILED" in text and f"error: SourceError: source 'copy': path '{gone}' does not exist" in text
    )
    # Quarantine by source and reason, the most frequent first, the rest counted.
    assert "Quarantine: 10 lines" in text and "ehr: 10 lines, 8 reasons" in text
    assert "2 invalid JSON 2 not a JSON object 1 malformed reference" in text
    assert "... 3 more (3 lines): twinhub quarantine list --source ehr" in text
    assert "Rows per table" in text and "Waiting for their patient: nothing" in text

    facts = orjson.loads(run_cli("--config", str(config), "status", "--json", check=False).stdout)
    assert (facts["healthy"], facts["failed_sources"]) == (False, ["copy"])
    sources = {s["name"]: s for s in facts["sources"]}
    [ehr_run] = sources["ehr"]["runs"]
    assert ehr_run["status"] == "succeeded" and ehr_run["counts"]["quarantined"] == 10
    assert sources["ehr"]["progress"] == "1/1 files complete, 14 lines"
    [failed] = sources["copy"]["runs"]
    assert failed["status"] == "failed" and failed["error"].endswith("or a glob")
    [quarantined] = facts["quarantine"]
    assert (quarantined["source"], quarantined["lines"], quarantined["reasons"]) == ("ehr", 10, 8)
    assert quarantined["top"][:2] == [
        {"reason": "invalid JSON", "lines": 2},
        {"reason": "not a JSON object", "lines": 2},
    ]
    assert facts["tables"]["patient"] == 4 and facts["tables"]["quarantine"] == 10
    assert facts["waiting"] == [] and facts["models"] == []


@pytest.mark.slow
def test_status_says_how_far_a_source_of_each_kind_got(tmp_path: Path, fitbit_server: FitbitServer) -> None:
    ehr = start_server(tmp_path / "ehr")
    try:
        load_small_ehr(ehr)
        files = {kind: write_file_source(kind, tmp_path / kind) for kind in FILE_KINDS}
        # The Fitbit patient lives in Los Angeles; their tracker synced today.
        today = datetime.now(ZoneInfo("America/Los_Angeles")).date()
        fitbit_server.state.users["USER1"] = User("USER1", last_sync=f"{today}T00:30:00.000")
        fitbit = {
            "kind": "fitbit",
            "client_id": CLIENT_ID,
            "redirect_uri": "http://127.0.0.1:9/fitbit/callback",
            "api_url": fitbit_server.url,
            "authorize_url": f"{fitbit_server.url}/oauth2/authorize",
            "token_url": f"{fitbit_server.url}/oauth2/token",
            "scopes": ["heartrate", "profile", "settings"],
            "since": str(today - timedelta(days=2)),
        }
        config = write_sources_config(
            tmp_path,
            {
                **{kind: source.table for kind, source in files.items()},
                **{kind: server_table(ehr, tmp_path / kind, kind) for kind in SERVER_KINDS},
                "fitbit": fitbit,
                "never": {"kind": "fhir-ndjson", "path": str(tmp_path / "fhir-ndjson")},
            },
        )
        settings = load_settings(config)
        watch = settings.source("fitbit")
        assert isinstance(watch, FitbitSource)
        connect(fitbit_server, watch, TokenStore.for_source(watch, watch.token_path(settings.store.path)))
        for source in settings.sources:
            if source.name != "never":
                land_source.fn(str(config), source.name)
    finally:
        ehr.stop()

    rows = status_rows(config)
    assert {name: cells[0] for name, cells in rows.items()} == {s.name: s.kind for s in settings.sources}
    progress = {name: cells[2] for name, cells in rows.items()}
    for kind, source in files.items():
        assert re.fullmatch(re.escape(source.complete) + AT, progress[kind]), kind
    assert re.fullmatch(rf"Patient up to {INSTANT}; Observation up to {INSTANT}{AT}", progress["fhir-search"])
    assert re.fullmatch(rf"exported up to {INSTANT}{AT}", progress["fhir-bulk"])
    assert re.fullmatch(rf"1 patient, complete through {today - timedelta(days=1)}{AT}", progress["fitbit"])
    assert progress["never"] == "never synced"


def test_a_sync_that_fails_before_its_run_begins_is_a_failed_run(tmp_path: Path) -> None:
    """The CLI checks a source before any flow starts; when that check fails (its folder moved
    away), the failure is recorded like a run's, so status and monitoring do not report the last
    sync that worked."""
    export = write_ndjson(tmp_path / "export" / "Patient.ndjson", bad_lines(0)[:4]).parent
    config = write_sources_config(tmp_path, {"ehr": {"kind": "fhir-ndjson", "path": str(export)}})
    land_source.fn(str(config), "ehr")
    export.rename(tmp_path / "moved")

    synced = run_cli("--config", str(config), "sync", "ehr", check=False)
    assert synced.returncode == 1 and "does not exist" in synced.stderr
    status = run_cli("--config", str(config), "status", "--json", check=False)
    assert status.returncode == 2, "the last sync of ehr failed"
    facts = orjson.loads(status.stdout)
    assert (facts["healthy"], facts["failed_sources"]) == (False, ["ehr"])
    failed, succeeded = next(s for s in facts["sources"] if s["name"] == "ehr")["runs"][:2]
    assert (failed["status"], succeeded["status"]) == ("failed", "succeeded")
    assert "does not exist" in failed["error"]
