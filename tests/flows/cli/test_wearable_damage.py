"""Damaged wearable data as a user meets it, through `twinhub sync` (real subprocesses): one bad
record or file is quarantined and never stops its source or the store's other sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.data import write_config, write_ndjson
from twin_store import connect

HOURLY = "Id,ActivityHour,StepTotal\n111,4/12/2016 12:00:00 AM,40\n111,4/12/2016 1:00:00 AM,61\n"
"""The exit status of a sync whose problems went to quarantine: "landed with problems"."""
LANDED = 3


def config(tmp_path: Path, fitabase: Path) -> Path:
    """A store with a Fitabase export (accounts become Patients "fitabase-<Id>") and an EHR."""
    ehr = write_ndjson(tmp_path / "ehr" / "Patient.ndjson", [{"resourceType": "Patient", "id": "e1"}])
    path = write_config(tmp_path, ehr, name="ehr")
    with path.open("a") as fh:
        fh.write(f'\n[[sources]]\nname = "fa"\nkind = "fitbit-csv"\npath = "{fitabase}"\n')
        fh.write('patient_prefix = "fitabase-"\n')
    return path


def test_after_a_bad_fitabase_id_another_source_still_syncs(tmp_path: Path, api_env: dict[str, str]) -> None:
    fitabase = tmp_path / "fa"
    fitabase.mkdir()
    (fitabase / "hourlySteps_merged.csv").write_text(HOURLY + "../x,4/12/2016 2:00:00 AM,7\n")
    cfg = str(config(tmp_path, fitabase))
    first = run_cli("--config", cfg, "sync", "fa", env=api_env, check=False)
    assert first.returncode == LANDED, first.stdout + first.stderr
    ehr = run_cli("--config", cfg, "sync", "ehr", env=api_env, check=False)
    assert ehr.returncode == 0, ehr.stdout + ehr.stderr
    con = connect(tmp_path / "store")
    [(source, line, reason)] = con.sql("SELECT source, line_no, reason FROM quarantine").fetchall()
    assert (source, line) == ("fa", 4)
    assert "account Id '../x' makes the Patient id 'fitabase-../x', which is not a FHIR id" in reason
    patients = con.sql("SELECT DISTINCT patient_id FROM wearable_sample").fetchall()
    assert patients == [("fa/fitabase-111",)]  # the wearable's own twin: no other source has it
    assert con.sql("SELECT id FROM patient").fetchall() == [("ehr/e1",)]
    assert "../x" not in first.stdout + first.stderr, (
        "a printed message names the file and line, never the data"
    )


@pytest.mark.slow  # the connector's own tests cover the damage in the fast run
def test_a_damaged_fitabase_file_lands_its_readable_rows_and_its_replacement_lands_next(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    fitabase = tmp_path / "fa"
    fitabase.mkdir()
    (fitabase / "dailySteps_merged.csv").write_text("Id,ActivityDay,StepTotal\n111,4/13/2016,5000\n")
    hourly = fitabase / "hourlySteps_merged.csv"
    hourly.write_bytes(HOURLY.encode() + b"111,4/12/2016 2:00:00 AM,\xff\xfe\n111,4/12/2016 3:00:00 AM,9,9\n")
    cfg = str(config(tmp_path, fitabase))
    damaged = run_cli("--config", cfg, "sync", "fa", env=api_env, check=False)
    assert damaged.returncode == LANDED, damaged.stdout + damaged.stderr
    con = connect(tmp_path / "store")
    steps = "SELECT day, value FROM wearable_daily WHERE metric = 'steps' ORDER BY day"
    assert [v for _, v in con.sql(steps).fetchall()] == [101.0, 5000.0], (
        "the readable rows and the other file"
    )
    quarantined = con.sql("SELECT file, line_no, reason FROM quarantine ORDER BY line_no").fetchall()
    assert [(Path(f).name, n) for f, n, _ in quarantined] == [
        ("hourlySteps_merged.csv", 4),
        ("hourlySteps_merged.csv", 5),
    ]
    assert "is not valid UTF-8" in quarantined[0][2] and "the row has 4 fields" in quarantined[1][2]
    hourly.write_text(HOURLY + "111,4/12/2016 2:00:00 AM,20\n111,4/12/2016 3:00:00 AM,9\n")
    replaced = run_cli("--config", cfg, "sync", "fa", env=api_env, check=False)
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    con = connect(tmp_path / "store")
    assert [v for _, v in con.sql(steps).fetchall()] == [130.0, 5000.0]
    assert con.sql("SELECT count(*) FROM wearable_sample WHERE metric = 'steps'").fetchone() == (5,)
