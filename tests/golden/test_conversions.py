"""Golden files for the conversions: committed inputs -> the committed output they must make.

Each case folder holds its inputs (`input/`, small files written for these tests) and what the
conversion makes of them (`expected*.json`: pretty JSON, keys sorted, numbers as written):

- hl7v2/: HL7 v2 messages -> FHIR (`harmonize.labs.hl7v2.resources_from_messages`, with the
  local codes of concept_map.json), plus the refused messages with their reasons;
- lab_csv/: lab CSV rows (`connectors.labs.lab_csv.LabCsvConnector`) -> FHIR Observations
  (`harmonize.labs.rows.observations_from_rows`), plus the refused rows;
- vcf/: VCF files (`connectors.genomics.vcf.VcfConnector`) -> `genomic_variant` rows, the
  records' spec warnings and the files quarantined whole;
- wearables/: samples -> samples in standard units (`harmonize.wearables.metrics.normalize_samples`,
  both its general path and its one-series fast path), and daily rollups -> FHIR
  (`daily_resources`).

Two more cases read real samples in place from ../shared/data (skipped when it is absent; the
inputs are never copied here): NIST's HL7 v2 ELR messages and a vcf2fhir VCF.

Regenerate every expected file from what the code makes now with one command, then review the
change like any other diff:

    .venv/bin/pytest tests/golden --update-golden
    git diff tests/golden

What is not deterministic, or not the conversion's, is normalized or left out, explicitly:
- absolute paths (a record's `file`, a sample's `origin` is left as the input wrote it) become
  paths relative to the case's input folder (or to ../shared/data);
- the watermarks that come with each batch are left out (they hold the files' mtimes);
- `daily_resources` gets a pinned clock (RECORDED, which the store takes from `datetime.now`)
  and a pinned activity (ACTIVITY, which names the store's run id);
- a batch's stats are written as a dict sorted by key.
Nothing else is changed: ids are derived from the input, so they must stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from connectors.base import SAMPLE_SCHEMA, Batch
from connectors.genomics.vcf import VcfConnector, VcfSource
from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source
from connectors.labs.lab_csv import LabCsvColumns, LabCsvConnector, LabCsvSource
from harmonize.labs.codes import code_map_from_json
from harmonize.labs.hl7v2 import resources_from_messages
from harmonize.labs.rows import observations_from_rows
from harmonize.wearables.metrics import DAILY_SCHEMA, daily_resources, normalize_samples
from tests.support.data import SHARED
from tests.support.golden import check, loads

HERE = Path(__file__).parent
RECORDED = datetime(2024, 3, 4, 2, 0, tzinfo=UTC)
"""The clock `daily_resources` is given (Provenance.recorded), pinned."""
ACTIVITY = "run golden batch 1"
"""The activity `daily_resources` is given (it names the store's run), pinned."""
NIST = SHARED / "labs" / "hl7v2" / "node-hl7-complete" / "nist"
NB6TK328 = SHARED / "genomics" / "vcf" / "vcf2fhir" / "NB6TK328_filtered.vcf"


def relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def mapped(batches: Iterable[Batch], root: Path) -> dict[str, Any]:
    """Records (each a FHIR resource, with the file and record number it came from), problems
    and stats of mapped batches."""
    records, problems, stats = [], [], {}
    for batch in batches:
        records += [
            {"file": relative(r["file"], root), "line_no": r["line_no"], "resource": loads(r["raw"])}
            for r in batch.records.to_pylist()
        ]
        problems += [{**p, "file": relative(p["file"], root)} for p in batch.problems.to_pylist()]
        for key, n in batch.stats.items():
            stats[key] = stats.get(key, 0) + n
    return {"records": records, "problems": problems, "stats": dict(sorted(stats.items()))}


def hl7v2_source(path: Path) -> Hl7v2Source:
    return Hl7v2Source(
        name="lab",
        kind="hl7v2",
        path=path,
        timezone="Europe/Berlin",
        patient_systems={"ACME": "http://acme.example.org/mrn"},
    )


def test_hl7v2_messages_to_fhir(update: bool) -> None:
    case = HERE / "hl7v2"
    source = hl7v2_source(case / "input")
    codes = code_map_from_json((case / "concept_map.json").read_bytes())
    batches = [resources_from_messages(b, source, codes) for b in Hl7v2Connector(source).pull(None)]
    check(case / "expected.json", mapped(batches, case / "input"), update=update)


@pytest.mark.shared
def test_hl7v2_nist_elr_messages_to_fhir(update: bool) -> None:
    if not NIST.is_dir():
        pytest.skip(f"shared HL7 v2 samples not found at {NIST} (../shared/data is absent)")
    source = hl7v2_source(NIST)
    batches = [resources_from_messages(b, source) for b in Hl7v2Connector(source).pull(None)]
    check(HERE / "hl7v2" / "expected_shared_nist.json", mapped(batches, SHARED), update=update)


def test_lab_csv_rows_to_fhir(update: bool) -> None:
    case = HERE / "lab_csv"
    columns = LabCsvColumns(
        id="result_id",
        patient="mrn",
        code="test",
        code_system="test_system",
        display="name",
        time="taken",
        value="result",
        unit="units",
        ucum="ucum",
        reference_low="low",
        reference_high="high",
        interpretation="flag",
        value_code="coded",
        value_code_system="coded_system",
        value_code_display="coded_name",
        status="status",
        issued="issued",
    )
    source = LabCsvSource(name="lab", kind="lab-csv", path=case / "input", columns=columns)
    batches = [observations_from_rows(b, source) for b in LabCsvConnector(source).pull(None)]
    check(case / "expected.json", mapped(batches, case / "input"), update=update)


def vcf_rows(source: VcfSource, root: Path) -> dict[str, Any]:
    """The variant rows, warnings and problems of every batch the connector yields."""
    variants, warnings, problems = [], [], []
    for batch in VcfConnector(source).pull(None):
        assert batch.records.num_rows == 0, "a VCF makes rows, never raw records"
        if batch.variants is not None:
            variants += [{**v, "file": relative(v["file"], root)} for v in batch.variants.to_pylist()]
        warnings += [{**w, "file": relative(w["file"], root)} for w in batch.warnings.to_pylist()]
        problems += [{**p, "file": relative(p["file"], root)} for p in batch.problems.to_pylist()]
    return {"variants": variants, "warnings": warnings, "problems": problems}


def test_vcf_to_variant_rows(update: bool) -> None:
    case = HERE / "vcf"
    source = VcfSource(name="seq", kind="vcf", path=case / "input", samples={"S1": "p1"})
    check(case / "expected.json", vcf_rows(source, case / "input"), update=update)


@pytest.mark.shared
def test_vcf2fhir_annotated_vcf_to_variant_rows(update: bool) -> None:
    if not NB6TK328.is_file():
        pytest.skip(f"shared VCF not found at {NB6TK328} (../shared/data is absent)")
    source = VcfSource(name="seq", kind="vcf", path=NB6TK328, samples={"NB6TK328": "p1"})
    check(HERE / "vcf" / "expected_shared_NB6TK328.json", vcf_rows(source, SHARED), update=update)


def samples(path: Path) -> pa.Table:
    """Samples (SAMPLE_SCHEMA) from JSON: times in ISO 8601, a value "NaN" as the float."""
    rows = orjson.loads(path.read_bytes())
    for row in rows:
        row["value"] = float(row["value"])
        for key in ("start_time", "end_time"):
            row[key] = row[key] and datetime.fromisoformat(row[key])
    return pa.Table.from_pylist(rows, SAMPLE_SCHEMA)


def as_json(table: pa.Table) -> list[dict[str, Any]]:
    return [
        {k: v.isoformat() if isinstance(v, (datetime, date)) else v for k, v in row.items()}
        for row in table.to_pylist()
    ]


@pytest.mark.parametrize("name", ["samples", "one_series"])
def test_wearable_samples_to_standard_units(name: str, update: bool) -> None:
    """`samples` takes the general path (several metrics, bad samples); `one_series` the fast one
    (one metric in one unit, all good): both must convert alike."""
    case = HERE / "wearables"
    normalized, problems = normalize_samples(samples(case / "input" / f"{name}.json"))
    got = {"samples": as_json(normalized), "problems": as_json(problems)}
    check(case / f"expected_{name}.json", got, update=update)


def test_wearable_days_to_daily_fhir(update: bool) -> None:
    case = HERE / "wearables"
    rows = orjson.loads((case / "input" / "days.json").read_bytes())
    for row in rows:
        row["day"] = date.fromisoformat(row["day"])
    days = pa.Table.from_pylist(rows, DAILY_SCHEMA)
    resources = [loads(r) for r in daily_resources(days, RECORDED, ACTIVITY)]
    check(case / "expected_daily.json", resources, update=update)
