"""`twinhub demo`, the README's first command, as a user runs it: sync, then the twin models."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import TWINHUB
from tests.support.data import SHARED
from twin_store import connect


def demo(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # embedded defaults: no server
    result = subprocess.run(
        [TWINHUB, *args] if args[:1] == ("--config",) else [TWINHUB, "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def test_the_demo_leaves_alone_what_it_did_not_make(tmp_path: Path) -> None:
    """Issue 16, item 6: a folder of that name the demo did not make, and `--config`, are refused
    before anything is written or deleted."""
    (tmp_path / "twinhub-demo").mkdir()
    (tmp_path / "twinhub-demo" / "notes.txt").write_text("mine")
    refused = demo(tmp_path, check=False)
    assert refused.returncode == 1
    assert "'twinhub-demo' exists and was not made by `twinhub demo`" in refused.stderr
    assert [p.name for p in (tmp_path / "twinhub-demo").iterdir()] == ["notes.txt"]
    (tmp_path / "mine.toml").write_text('[store]\npath = "mine"\n')
    with_config = demo(tmp_path, "--config", "mine.toml", "demo", "--dir", "elsewhere", check=False)
    assert with_config.returncode == 1
    assert "the demo writes its own config" in with_config.stderr
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_the_generated_demo_syncs_and_refreshes_the_models(tmp_path: Path) -> None:
    # The store of the project's own twinhub.toml lives in ./.twinhub: the demo never touches it.
    (tmp_path / ".twinhub").mkdir()
    (tmp_path / ".twinhub" / "fitbit-tokens.json").write_text("{}")
    result = demo(tmp_path, "--generate")
    assert "Twin models refreshed after the sync" in result.stdout
    assert [p.name for p in (tmp_path / ".twinhub").iterdir()] == ["fitbit-tokens.json"]
    con = connect(tmp_path / "twinhub-demo" / ".twinhub")
    (ok, without_inputs) = con.sql(
        """SELECT count(*) FILTER (status = 'ok'), count(*) FILTER (status = 'ok' AND len(inputs) < 4)
        FROM model_output WHERE model = 'ascvd-pce'"""
    ).fetchone() or (0, 0)
    assert ok > 0 and without_inputs == 0
    # The wearable sync changed five twins' vital signs (their daily heart rate and weight): the
    # second refresh recomputed those five, and only those.
    refreshes = con.sql(
        "SELECT scope, patients FROM model_run WHERE model = 'ascvd-pce' ORDER BY finished_at"
    ).fetchall()
    assert refreshes == [("full", refreshes[0][1]), ("changed", 5)]
    con.close()
    # Run again: the demo takes back its own folder and starts afresh.
    demo(tmp_path, "--generate")
    again = connect(tmp_path / "twinhub-demo" / ".twinhub")
    assert again.sql("SELECT count(*) FROM model_run WHERE model = 'ascvd-pce'").fetchone() == (2,)


@pytest.mark.slow
@pytest.mark.shared
def test_on_synthea_every_eligible_patient_gets_a_risk_with_lineage(tmp_path: Path) -> None:
    """Issue 7, point 4: eligible here is computed independently, in SQL over the views: alive,
    40-79 on the day of the latest of their three measurements, every input present and in range."""
    if not (SHARED / "fhir").is_dir():
        pytest.skip(f"shared Synthea export not found under {SHARED} (../shared/data is absent)")
    (tmp_path / "shared").symlink_to(SHARED.parent)
    (tmp_path / "work").mkdir()
    demo(tmp_path / "work")
    con = connect(tmp_path / "work" / "twinhub-demo" / ".twinhub")
    eligible = {
        p
        for (p,) in con.sql(
            """WITH latest AS (
                SELECT patient_id, arg_max(value_numeric, effective) FILTER (code = '2093-3') AS tc,
                       arg_max(value_numeric, effective) FILTER (code = '2085-9') AS hdl,
                       max(effective) FILTER (code IN ('2093-3', '2085-9')) AS lab_at
                FROM lab_result GROUP BY patient_id),
            bp AS (SELECT patient_id, arg_max(value_numeric, effective) AS sbp, max(effective) AS bp_at
                   FROM observation_component WHERE component_code = '8480-6' GROUP BY patient_id),
            smoking AS (SELECT DISTINCT patient_id FROM observation WHERE code = '72166-2'),
            dated AS (
                SELECT p.id AS patient_id, l.tc, l.hdl, b.sbp, p.deceased, p.deceased_at,
                       CAST(p.birth_date AS DATE) AS born,
                       CAST(greatest(CAST(l.lab_at AS TIMESTAMPTZ), CAST(b.bp_at AS TIMESTAMPTZ)) AS DATE)
                           AS as_of
                FROM patient p JOIN latest l ON l.patient_id = p.id JOIN bp b ON b.patient_id = p.id
                JOIN smoking s ON s.patient_id = p.id
                WHERE p.gender IN ('male', 'female') AND p.race_code IS NOT NULL),
            people AS (
                SELECT *, date_diff('year', born, as_of)
                          - CASE WHEN strftime(as_of, '%m%d') < strftime(born, '%m%d') THEN 1 ELSE 0 END
                          AS age
                FROM dated)
            SELECT patient_id FROM people
            WHERE age BETWEEN 40 AND 79 AND tc BETWEEN 130 AND 320 AND hdl BETWEEN 20 AND 100
              AND sbp BETWEEN 90 AND 200 AND NOT coalesce(deceased, false) AND deceased_at IS NULL"""
        ).fetchall()
    }
    computed = {
        p
        for (p,) in con.sql(
            "SELECT patient_id FROM model_output WHERE model = 'ascvd-pce' AND status = 'ok'"
        ).fetchall()
    }
    assert len(eligible) > 100 and computed == eligible
    history = subprocess.run(
        [TWINHUB, "models", "history", "ascvd-pce", "--limit", "5"],
        cwd=tmp_path / "work" / "twinhub-demo",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert history.returncode == 0, history.stderr
    assert "input_snapshot_id" in history.stdout and "lab_result/" in history.stdout
