"""Small inputs for every source kind, for the tests of what `twinhub status` says about each:
files written here (two where a kind reads a folder), and a small FHIR server."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support.data import write_ndjson
from tests.support.fhir_server import ADMIN_TOKEN, FhirServer
from tests.support.hl7v2 import MESSAGE
from tests.support.vcf import RECORDS, write_vcf

FILE_KINDS = ["fhir-ndjson", "lab-csv", "hl7v2", "vcf", "fitbit-csv", "openmhealth", "apple-health"]
SERVER_KINDS = ["fhir-search", "fhir-bulk"]


@dataclass(frozen=True)
class FileSource:
    table: dict[str, Any]
    """The source's `[[sources]]` table, but its name."""
    complete: str
    """What `status` says once every file landed."""


def write_file_source(kind: str, folder: Path) -> FileSource:
    """Small valid input of a file kind in `folder`, and the source reading it."""
    folder.mkdir(parents=True, exist_ok=True)
    return WRITERS[kind](folder)


def _fhir_ndjson(folder: Path) -> FileSource:
    write_ndjson(folder / "Patient.ndjson", [{"resourceType": "Patient", "id": f"p{i}"} for i in range(3)])
    subject = {"reference": "Patient/p0"}
    observations = [
        {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "code": {"text": "x"},
            "subject": subject,
        }
        for i in range(5)
    ]
    write_ndjson(folder / "Observation.ndjson", observations)
    return FileSource({"kind": "fhir-ndjson", "path": str(folder)}, "2/2 files complete, 8 lines")


def _lab_csv(folder: Path) -> FileSource:
    header = "mrn,test,taken,result\n"
    (folder / "a.csv").write_text(
        header + "p1,718-7,2024-03-01T08:30:00Z,13.9\np1,718-7,2024-03-02T08:30:00Z,14.1\n"
    )
    (folder / "b.csv").write_text(header + "p2,718-7,2024-03-03T08:30:00Z,12.5\n")
    columns = {"patient": "mrn", "code": "test", "time": "taken", "value": "result"}
    return FileSource(
        {"kind": "lab-csv", "path": str(folder), "columns": columns}, "2/2 files complete, 3 rows"
    )


def _hl7v2(folder: Path) -> FileSource:
    (folder / "a.hl7").write_text(MESSAGE + "\r")
    (folder / "b.hl7").write_text(MESSAGE.replace("MSG001", "MSG002").replace("PL1|FL1", "PL2|FL2") + "\r")
    return FileSource({"kind": "hl7v2", "path": str(folder)}, "2/2 files complete")


def _vcf(folder: Path) -> FileSource:
    write_vcf(folder / "a.vcf", RECORDS[:1])
    write_vcf(folder / "b.vcf", RECORDS[1:])
    return FileSource({"kind": "vcf", "path": str(folder)}, "2/2 files complete")


def _fitbit_csv(folder: Path) -> FileSource:
    (folder / "hourlySteps_merged.csv").write_text(
        "Id,ActivityHour,StepTotal\n111,3/12/2016 12:00:00 AM,40\n111,3/12/2016 1:00:00 PM,60\n"
    )
    (folder / "dailyActivity_merged.csv").write_text(
        "Id,ActivityDate,TotalSteps,TotalDistance,VeryActiveMinutes,FairlyActiveMinutes,Calories\n"
        "111,3/13/2016,250,2.5,0,1,2100\n"
    )
    return FileSource(
        {"kind": "fitbit-csv", "path": str(folder), "patients": {"111": "p1"}}, "2/2 files complete"
    )


HEART_RATE_SCHEMA = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "type": "object",
    "required": ["heart_rate"],
}


def _openmhealth(folder: Path) -> FileSource:
    (folder / "schema" / "omh").mkdir(parents=True)
    (folder / "schema" / "omh" / "heart-rate-1.0.json").write_bytes(orjson.dumps(HEART_RATE_SCHEMA))
    schema_id = {"namespace": "omh", "name": "heart-rate", "version": "1.0"}
    for n in (1, 2):
        header = {"id": f"dp{n}", "creation_date_time": "2024-05-02T00:00:00Z", "schema_id": schema_id}
        body = {
            "heart_rate": {"value": 60 + n, "unit": "beats/min"},
            "effective_time_frame": {"date_time": f"2024-05-0{n}T08:30:00+02:00"},
        }
        write_ndjson(folder / "data" / f"day{n}.ndjson", [{"header": header, "body": body}])
    table = {
        "kind": "openmhealth",
        "path": str(folder / "data"),
        "schemas": str(folder / "schema"),
        "patient": "p1",
    }
    return FileSource(table, "2/2 files complete")


def _apple_health(folder: Path) -> FileSource:
    at = "2023-06-01 12:00:00 +0100"
    (folder / "export.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<HealthData locale="en_GB">\n'
        ' <ExportDate value="2023-06-10 09:00:00 +0100"/>\n'
        f' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Watch" unit="count/min" '
        f'creationDate="{at}" startDate="{at}" endDate="{at}" value="72"/>\n</HealthData>\n'
    )
    return FileSource(
        {"kind": "apple-health", "path": str(folder / "export.xml"), "patient": "p1"}, "1/1 files complete"
    )


WRITERS: dict[str, Callable[[Path], FileSource]] = {
    "fhir-ndjson": _fhir_ndjson,
    "lab-csv": _lab_csv,
    "hl7v2": _hl7v2,
    "vcf": _vcf,
    "fitbit-csv": _fitbit_csv,
    "openmhealth": _openmhealth,
    "apple-health": _apple_health,
}


PADDING = 600_000
"""Bytes of narrative per Patient: two of them fill a 1 MB batch, so a walk or an export of
three is cut into batches."""


def load_small_ehr(server: FhirServer) -> None:
    """Three large Patients and four Observations; returns once the server's clock (its Date
    header, whole seconds) is past their lastUpdated, so a search begun now sees them as
    unchanged during it."""
    div = f'<div xmlns="http://www.w3.org/1999/xhtml">{"x" * PADDING}</div>'
    patients = [
        {"resourceType": "Patient", "id": f"p{i}", "text": {"status": "generated", "div": div}}
        for i in range(3)
    ]
    observations = [
        {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p0"},
        }
        for i in range(4)
    ]
    server.load([*patients, *observations], bundle_type="transaction")
    updated = max(
        datetime.fromisoformat(r["meta"]["lastUpdated"])
        for r in server.dump(["Patient", "Observation"]).values()
    )
    deadline = time.monotonic() + 30
    while (
        email.utils.parsedate_to_datetime(httpx.get(f"{server.base_url}/metadata").headers["date"]) <= updated
    ):
        assert time.monotonic() < deadline, "the server's clock does not move"
        time.sleep(0.2)


def server_table(server: FhirServer, folder: Path, kind: str) -> dict[str, Any]:
    """A `[[sources]]` table (but its name) of `kind` on the server, as small batches as allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    table: dict[str, Any] = {
        "kind": kind,
        "base_url": server.base_url,
        "resource_types": ["Patient", "Observation"],
        "batch_mb": 1,
        "backoff_seconds": 0.05,
        "auth": {"type": "bearer", "token_file": str(token)},
    }
    if kind == "fhir-search":
        table["page_size"] = 1
    else:
        table["poll_seconds"] = 0.2
    return table


def write_sources_config(folder: Path, sources: dict[str, dict[str, Any]]) -> Path:
    """A twinhub.toml with a store in `folder/store` and one `[[sources]]` table per name."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{orjson.dumps(k).decode()} = {value(x)}" for k, x in v.items()) + "}"
        return orjson.dumps(v).decode()

    tables = [
        f'[[sources]]\nname = "{name}"\n' + "".join(f"{k} = {value(v)}\n" for k, v in table.items())
        for name, table in sources.items()
    ]
    config = folder / "twinhub.toml"
    config.write_text('[store]\npath = "store"\n\n' + "\n".join(tables))
    return config
