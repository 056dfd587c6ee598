"""A lab-csv source and one mapped row, for the lab mapping's tests."""

from __future__ import annotations

from pathlib import Path

from connectors.labs.lab_csv import LabCsvColumns, LabCsvSource

SOURCE = LabCsvSource(
    name="lab",
    kind="lab-csv",
    path=Path("unused.csv"),
    columns=LabCsvColumns(
        id="result_id",
        patient="mrn",
        code="test",
        time="taken",
        value="result",
        unit="units",
        ucum="ucum",
        display="name",
        reference_low="low",
        reference_high="high",
        interpretation="flag",
        value_code="coded",
        value_code_system="coded_system",
    ),
)


ROW = {
    "result_id": "r1",
    "mrn": "p1",
    "test": "14749-6",
    "taken": "2024-03-01T08:30:00+01:00",
    "result": "5.50",
    "units": "mmol/L",
    "ucum": "mmol/L",
    "name": "Glucose",
    "low": "3.9",
    "high": "6.10",
    "flag": "N",
    "coded": "",
    "coded_system": "",
}
