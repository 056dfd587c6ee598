"""`twinhub models` as a user runs it: a name or a patient it does not know is one line saying so."""

from __future__ import annotations

from pathlib import Path

from flows.sync import land_source
from tests.support.cli import run_cli
from tests.support.data import write_config, write_ndjson
from twin_store import connect


def test_an_unknown_model_or_patient_is_one_line_and_computes_nothing(tmp_path: Path) -> None:
    export = write_ndjson(tmp_path / "export" / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    config = write_config(tmp_path, export.parent)
    land_source.fn(str(config), "src")
    for args, message in [
        (
            ["models", "history", "ascvd"],
            "error: no model 'ascvd'; installed: ascvd-pce, diabetes-risk, resting-hr-baseline",
        ),
        (
            ["models", "run", "resting-hr-baseline", "--patient", "nobody"],
            "error: model resting-hr-baseline: the patient asked for is not in the store; "
            'list them with: twinhub sql "SELECT id FROM patient"',
        ),
    ]:
        result = run_cli("--config", str(config), *args, check=False)
        assert (result.returncode, result.stderr.strip()) == (1, message), result.stdout
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM model_output").fetchone() == (0,), "no output for nobody"
