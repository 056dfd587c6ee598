"""`twinhub status` as a user runs it, on a store where one source of every kind landed: each
source's row names its kind and says, in its kind's words, how far it got."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from connectors.wearables.fitbit.config import FitbitSource
from connectors.wearables.fitbit.oauth import TokenStore
from flows.config import load_settings
from flows.sync import land_source
from tests.support.cli import run_cli
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
    """The cells of each source's row in the table of sources and watermarks, by source name."""
    out = run_cli("--config", str(config), "status", env={"COLUMNS": "400"}).stdout
    table = out[out.index("Sources and watermarks") :].split("Rows per table")[0]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines()]
    return {cells[0]: cells[1:] for cells in rows if len(cells) == 4}


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
