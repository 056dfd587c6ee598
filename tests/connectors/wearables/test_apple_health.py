"""Apple Health exports (export.xml, export.zip) into wearable samples: mapping, times and
devices, safe parsing of hostile files, broken files, watermarks and streaming at scale."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import PROBLEM_SCHEMA, SAMPLE_SCHEMA, Batch
from connectors.errors import ConfigError, SourceError
from connectors.wearables.apple_health import AppleHealthConnector, AppleHealthSource
from flows.config import load_settings
from flows.sync import build_connector
from harmonize.wearables.metrics import metrics, normalize_samples
from tests.support.data import ROOT, SHARED

log = logging.getLogger(__name__)
TDDA = SHARED / "wearables" / "apple-health" / "tdda-applehealthdata"
DTD = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!-- HealthKit Export Version: 11 -->
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
<!ELEMENT ExportDate EMPTY>
<!ATTLIST ExportDate
  value CDATA #REQUIRED
>
<!ELEMENT Me EMPTY>
<!ATTLIST Me
  HKCharacteristicTypeIdentifierDateOfBirth         CDATA #REQUIRED
  HKCharacteristicTypeIdentifierBiologicalSex       CDATA #REQUIRED
>
<!ELEMENT Record ((MetadataEntry|HeartRateVariabilityMetadataList)*)>
<!ATTLIST Record
  type          CDATA #REQUIRED
  unit          CDATA #IMPLIED
  value         CDATA #IMPLIED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!-- Note: Any Records that appear as children of a correlation also appear as top-level records
     in this document. -->
<!ELEMENT Correlation ((MetadataEntry|Record)*)>
<!ATTLIST Correlation
  type          CDATA #REQUIRED
  sourceName    CDATA #REQUIRED
  sourceVersion CDATA #IMPLIED
  device        CDATA #IMPLIED
  creationDate  CDATA #IMPLIED
  startDate     CDATA #REQUIRED
  endDate       CDATA #REQUIRED
>
<!ELEMENT MetadataEntry EMPTY>
<!ATTLIST MetadataEntry
  key   CDATA #REQUIRED
  value CDATA #REQUIRED
>
]>
<HealthData locale="en_GB">
 <ExportDate value="2023-06-10 09:00:00 +0100"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="1970-01-01"
     HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexFemale"/>
"""
END = "</HealthData>\n"
WATCH = (
    "&lt;&lt;HKDevice: 0x283e1c5a0&gt;, name:Apple Watch, manufacturer:Apple Inc., model:Watch, "
    "hardware:Watch2,3, software:4.3&gt;"
)
PHONE = (
    "&lt;&lt;HKDevice: 0x2837b3d90&gt;, name:iPhone, manufacturer:Apple Inc., model:iPhone, "
    "hardware:iPhone10,4, software:16.5&gt;"
)
SCALE = (
    "&lt;&lt;HKDevice: 0x280a18f00&gt;, name:Body Cardio, manufacturer:Withings, model:WBS04, "
    "firmware:1190, localIdentifier:00:24:e4:aa:bb:cc&gt;"
)
Q = "HKQuantityTypeIdentifier"
SLEEP = "HKCategoryTypeIdentifierSleepAnalysis"
NOON = "2023-06-01 12:00:00 +0100"


def record(
    kind: str,
    value: str,
    unit: str | None = None,
    start: str = NOON,
    end: str | None = None,
    source: str = "Ann's Apple Watch",
    device: str | None = WATCH,
    children: str = "",
) -> str:
    attrs = f'type="{kind}" sourceName="{source}" sourceVersion="9.5"'
    attrs += f' device="{device}"' if device else ""
    attrs += f' unit="{unit}"' if unit else ""
    attrs += f' creationDate="{start}" startDate="{start}" endDate="{end or start}" value="{value}"'
    return f" <Record {attrs}>\n{children} </Record>\n" if children else f" <Record {attrs}/>\n"


def sleep(stage: str, start: str, end: str) -> str:
    return record(SLEEP, f"HKCategoryValueSleepAnalysis{stage}", start=start, end=end, device=None)


BP_CUFF = {"source": "Omron", "device": None}
RECORDS = [
    record(
        f"{Q}HeartRate",
        "72",
        "count/min",
        children='  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>\n',
    ),
    record(f"{Q}RestingHeartRate", "55", "count/min"),
    record(
        f"{Q}StepCount",
        "120",
        "count",
        "2023-06-01 12:00:00 +0100",
        "2023-06-01 12:10:00 +0100",
        source="Ann's iPhone",
        device=PHONE,
    ),
    record(f"{Q}OxygenSaturation", "0.97", "%"),
    record(f"{Q}RespiratoryRate", "14.5", "count/min"),
    record(f"{Q}BodyMass", "165.3", "lb", source="Health Mate", device=SCALE),
    record(f"{Q}BodyMass", "75", "kg", "2023-06-02 07:00:00 +0100", source="Health", device=None),
    record(f"{Q}Height", "180", "cm", source="Health", device=None),
    record(f"{Q}BodyMassIndex", "23.1", "count", source="Health Mate", device=SCALE),
    record(f"{Q}BodyFatPercentage", "0.215", "%", source="Health Mate", device=SCALE),
    record(f"{Q}BodyTemperature", "98.6", "degF", source="Health", device=None),
    record(f"{Q}BodyTemperature", "37", "degC", "2023-06-02 12:00:00 +0100", source="Health", device=None),
    ' <Correlation type="HKCorrelationTypeIdentifierBloodPressure" sourceName="Omron" '
    f'creationDate="{NOON}" startDate="{NOON}" endDate="{NOON}">\n'
    + record(f"{Q}BloodPressureSystolic", "120", "mmHg", **BP_CUFF)
    + record(f"{Q}BloodPressureDiastolic", "80", "mmHg", **BP_CUFF)
    + " </Correlation>\n",
    record(f"{Q}BloodPressureSystolic", "120", "mmHg", **BP_CUFF),
    record(f"{Q}BloodPressureDiastolic", "80", "mmHg", **BP_CUFF),
    record(f"{Q}BloodGlucose", "95", "mg/dL", source="Dexcom", device=None),
    record(
        f"{Q}BloodGlucose",
        "5.5",
        "mmol&lt;180.1558800000541&gt;/L",
        "2023-06-01 13:00:00 +0100",
        source="Dexcom",
        device=None,
    ),
    record(f"{Q}DistanceWalkingRunning", "1.2", "mi", NOON, "2023-06-01 12:30:00 +0100"),
    record(f"{Q}ActiveEnergyBurned", "100", "kJ", NOON, "2023-06-01 12:01:00 +0100"),
    record(f"{Q}AppleExerciseTime", "5", "min", NOON, "2023-06-01 12:05:00 +0100"),
    sleep("InBed", "2023-05-31 22:30:00 -0500", "2023-06-01 06:30:00 -0500"),
    sleep("AsleepUnspecified", "2023-05-31 23:00:00 -0500", "2023-06-01 04:00:00 -0500"),
    sleep("Asleep", "2023-05-30 23:00:00 -0500", "2023-05-31 05:40:00 -0500"),
    sleep("AsleepCore", "2023-06-01 04:00:00 -0500", "2023-06-01 05:00:00 -0500"),
    sleep("AsleepDeep", "2023-06-01 05:00:00 -0500", "2023-06-01 05:30:00 -0500"),
    sleep("AsleepREM", "2023-06-01 05:30:00 -0500", "2023-06-01 05:50:00 -0500"),
    sleep("Awake", "2023-06-01 05:50:00 -0500", "2023-06-01 05:55:00 -0500"),
    record(f"{Q}BasalEnergyBurned", "1.1", "kcal"),
    record(f"{Q}BasalEnergyBurned", "1.2", "kcal"),
    record(f"{Q}HeartRate", "abc", "count/min"),
    record(f"{Q}StepCount", "10", "count", "2023-13-45 12:00:00 +0100", "2023-06-01 12:10:00 +0100"),
    sleep("Napping", "2023-06-01 14:00:00 +0100", "2023-06-01 14:20:00 +0100"),
    ' <Workout workoutActivityType="HKWorkoutActivityTypeWalking" duration="30" durationUnit="min" '
    f'sourceName="Ann\'s Apple Watch" startDate="{NOON}" endDate="{NOON}"/>\n',
    ' <ActivitySummary dateComponents="2023-06-01" activeEnergyBurned="400"'
    ' activeEnergyBurnedUnit="kcal"/>\n',
]
EXPORT = DTD + "".join(RECORDS) + END


def utc(day: int, hour: int, minute: int = 0, month: int = 6) -> datetime:
    return datetime(2023, month, day, hour, minute, tzinfo=UTC)


NOON_UTC = utc(1, 11)
WATCH_, PHONE_, SCALE_ = "Apple Watch (Watch2,3)", "iPhone (iPhone10,4)", "Body Cardio (WBS04)"
BED = "Ann's Apple Watch"  # sleep records carry no device: the source names it
EXPECTED = [  # metric, value, unit, start (UTC), end (UTC, None for an instant), offset, device
    ("heart_rate", 72, "count/min", NOON_UTC, None, 60, WATCH_),
    ("resting_heart_rate", 55, "count/min", NOON_UTC, None, 60, WATCH_),
    ("steps", 120, "count", NOON_UTC, utc(1, 11, 10), 60, PHONE_),
    ("oxygen_saturation", 97, "%", NOON_UTC, None, 60, WATCH_),
    ("respiratory_rate", 14.5, "count/min", NOON_UTC, None, 60, WATCH_),
    ("body_weight", 165.3, "lb", NOON_UTC, None, 60, SCALE_),
    ("body_weight", 75, "kg", utc(2, 6), None, 60, "Health"),
    ("body_height", 180, "cm", NOON_UTC, None, 60, "Health"),
    ("body_mass_index", 23.1, "count", NOON_UTC, None, 60, SCALE_),
    ("body_fat_percentage", 21.5, "%", NOON_UTC, None, 60, SCALE_),
    ("body_temperature", 98.6, "degF", NOON_UTC, None, 60, "Health"),
    ("body_temperature", 37, "degC", utc(2, 11), None, 60, "Health"),
    ("systolic_blood_pressure", 120, "mmHg", NOON_UTC, None, 60, "Omron"),
    ("diastolic_blood_pressure", 80, "mmHg", NOON_UTC, None, 60, "Omron"),
    ("blood_glucose", 95, "mg/dL", NOON_UTC, None, 60, "Dexcom"),
    ("blood_glucose", 5.5 * 18.01558800000541, "mg/dL", utc(1, 12), None, 60, "Dexcom"),
    ("distance", 1.2, "mi", NOON_UTC, utc(1, 11, 30), 60, WATCH_),
    ("calories", 100, "kJ", NOON_UTC, utc(1, 11, 1), 60, WATCH_),
    ("active_minutes", 5, "min", NOON_UTC, utc(1, 11, 5), 60, WATCH_),
    ("time_in_bed", 480, "min", utc(1, 3, 30), utc(1, 11, 30), -300, BED),
    ("sleep_asleep", 300, "min", utc(1, 4), utc(1, 9), -300, BED),
    ("sleep_asleep", 400, "min", utc(31, 4, month=5), utc(31, 10, 40, month=5), -300, BED),
    ("sleep_light", 60, "min", utc(1, 9), utc(1, 10), -300, BED),
    ("sleep_deep", 30, "min", utc(1, 10), utc(1, 10, 30), -300, BED),
    ("sleep_rem", 20, "min", utc(1, 10, 30), utc(1, 10, 50), -300, BED),
    ("sleep_awake", 5, "min", utc(1, 10, 50), utc(1, 10, 55), -300, BED),
]


def source(path: Path, **extra: Any) -> AppleHealthSource:
    return AppleHealthSource(name="ah", kind="apple-health", path=path, patient="p1", **extra)


def pull(path: Path, since: dict[str, Any] | None = None, **extra: Any) -> list[Batch]:
    return list(AppleHealthConnector(source(path, **extra)).pull(since))


def samples(batches: list[Batch]) -> list[dict[str, Any]]:
    tables = [b.samples for b in batches if b.samples is not None]
    return pa.concat_tables(tables).to_pylist() if tables else []


def problems(batches: list[Batch]) -> list[dict[str, Any]]:
    return pa.concat_tables([b.problems for b in batches]).to_pylist()


def as_expected(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r["metric"],
            pytest.approx(r["value"]),
            r["unit"],
            r["start_time"],
            r["end_time"],
            r["utc_offset_minutes"],
            r["device"],
        )
        for r in rows
    ]


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def write_zip(path: Path, members: dict[str, str | bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# --- mapping, times, devices --------------------------------------------------------------------


def test_every_mapped_type_becomes_a_sample_with_its_unit_time_offset_and_device(tmp_path: Path) -> None:
    path = tmp_path / "export.xml"
    path.write_text(EXPORT)
    batches = pull(path)
    rows = samples(batches)
    assert as_expected(rows) == EXPECTED  # the Correlation's copies of the pressures are not read twice
    assert {r["patient_id"] for r in rows} == {"p1"} and {r["origin"] for r in rows} == {str(path)}
    normalized, bad = normalize_samples(pa.concat_tables([b.samples for b in batches if b.samples]))
    assert bad.num_rows == 0, bad.to_pylist()  # every unit Apple wrote is one the catalogue takes
    assert normalized.num_rows == len(EXPECTED)

    stats = sum((b.stats for b in batches), Counter())
    assert stats == Counter(
        {
            f"unmapped {Q}BasalEnergyBurned": 2,
            "unmapped Correlation": 1,
            "unmapped Workout": 1,
            "unmapped ActivitySummary": 1,
        }
    )


def test_a_record_that_cannot_be_read_is_a_problem_with_its_line_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "export.xml"
    path.write_text(EXPORT)
    found = {(p["line_no"], p["reason"]) for p in problems(pull(path))}
    abc, month, nap = (
        line_of(EXPORT, 'value="abc"'),
        line_of(EXPORT, "2023-13-45"),
        line_of(EXPORT, "Napping"),
    )
    assert found == {
        (abc, f"{Q}HeartRate record at line {abc}: value 'abc' is not a number"),
        (
            month,
            f"{Q}StepCount record at line {month}: startDate '2023-13-45 12:00:00 +0100' is not a date "
            "like 2016-04-13 09:06:19 +0100",
        ),
        (
            nap,
            f"{SLEEP} record at line {nap}: value 'HKCategoryValueSleepAnalysisNapping' is not one "
            "twinhub maps (see connectors/wearables/apple_health.toml)",
        ),
    }
    raw = json.loads(next(p["raw"] for p in problems(pull(path)) if "abc" in p["reason"]))
    assert raw["value"] == "abc" and raw["startDate"] == NOON


def test_the_zip_is_read_in_place_and_apples_cda_copy_is_left_out(tmp_path: Path) -> None:
    archive = write_zip(
        tmp_path / "export.zip",
        {
            "apple_health_export/export.xml": EXPORT,
            "apple_health_export/export_cda.xml": "<ClinicalDocument/>",
            "apple_health_export/workout-routes/route_1.gpx": "<gpx/>",
        },
    )
    batches = pull(archive)
    rows = samples(batches)
    assert as_expected(rows) == EXPECTED
    assert {r["origin"] for r in rows} == {f"{archive}!/apple_health_export/export.xml"}
    assert len(problems(batches)) == 3  # the three bad records, nothing about the other members

    gzipped = tmp_path / "export.xml.gz"
    gzipped.write_bytes(gzip.compress(EXPORT.encode()))
    assert as_expected(samples(pull(gzipped))) == EXPECTED

    folder = tmp_path / "apple_health_export"
    folder.mkdir()
    (folder / "export.xml").write_text(EXPORT)
    (folder / "export_cda.xml").write_text("<ClinicalDocument/>")
    assert as_expected(samples(pull(folder))) == EXPECTED
    (folder / "export.xml").unlink()
    with pytest.raises(SourceError, match="only Apple's CDA copy"):
        pull(folder)


@pytest.mark.shared
def test_the_shared_sample_yields_its_records_as_the_parsers_csvs_list_them(tmp_path: Path) -> None:
    if not TDDA.is_dir():
        pytest.skip(f"shared Apple Health sample not found at {TDDA} (../shared/data is absent)")
    expected = []
    for kind, metric in (("StepCount", "steps"), ("DistanceWalkingRunning", "distance")):
        with (TDDA / f"{kind}.csv").open() as fh:
            for row in csv.DictReader(fh):
                start = datetime.strptime(row["startDate"], "%Y-%m-%d %H:%M:%S %z")
                end = datetime.strptime(row["endDate"], "%Y-%m-%d %H:%M:%S %z")
                offset = start.utcoffset()
                assert offset is not None
                value, minutes = pytest.approx(float(row["value"])), offset.total_seconds() // 60
                when = (start.astimezone(UTC), end.astimezone(UTC), minutes)
                expected.append((metric, value, row["unit"], *when, row["sourceName"]))
    batches = pull(TDDA / "export6s3sample.xml")
    assert len(expected) == 15
    assert as_expected(samples(batches)) == expected
    assert problems(batches) == []
    assert sum((b.stats for b in batches), Counter()) == Counter(
        {"unmapped ActivitySummary": 2, "unmapped Workout": 1}
    )


# --- batches and watermarks ---------------------------------------------------------------------


def test_batches_are_bounded_and_only_the_last_marks_the_file_done(tmp_path: Path) -> None:
    path = tmp_path / "export.xml"
    path.write_text(EXPORT)
    batches = pull(path, batch_samples=4)
    assert [len(b) for b in batches] == [4] * 7 + [1]  # 26 samples and 3 problems
    assert as_expected(samples(batches)) == EXPECTED
    assert all(b.watermark == {"files": {}} for b in batches[:-1])
    assert list(batches[-1].watermark["files"]) == [str(path)]


def test_an_unchanged_export_is_not_read_again_and_a_changed_one_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "export.xml"
    path.write_text(EXPORT)
    watermark = pull(path)[-1].watermark
    assert pull(path, since=watermark) == []
    path.write_text(EXPORT.replace(END, record(f"{Q}StepCount", "5", "count") + END))
    again = samples(pull(path, since=watermark))
    assert len(again) == len(EXPECTED) + 1


# --- hostile and broken files -------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">\n' for i in range(1, 10)
    )
    + ']>\n<HealthData locale="en_GB">\n'
    + record(f"{Q}StepCount", "&lol9;", "count") * 5
    + END
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n <!ENTITY xxe SYSTEM "file:///etc/passwd">\n]>\n'
    '<HealthData locale="en_GB">\n' + record(f"{Q}StepCount", "1", "count", source="&xxe;") * 5 + END
)
PARAMETER_ENTITY = (
    '<?xml version="1.0"?>\n<!DOCTYPE HealthData [\n <!ENTITY % remote SYSTEM "http://127.0.0.1:9/x.dtd">\n'
    " %remote;\n]>\n<HealthData>\n" + record(f"{Q}StepCount", "1", "count") + END
)


@pytest.mark.parametrize(
    ("text", "declared"),
    [
        (BILLION_LAUGHS, "it declares the XML entity 'lol'"),
        (EXTERNAL_ENTITY, "it declares the XML entity 'xxe' (SYSTEM 'file:///etc/passwd')"),
        (PARAMETER_ENTITY, "it declares the XML entity 'remote' (SYSTEM 'http://127.0.0.1:9/x.dtd')"),
    ],
    ids=["billion-laughs", "external-entity", "parameter-entity"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["xml", "zip"])
def test_a_file_declaring_entities_is_refused_whole_and_yields_no_sample(
    tmp_path: Path, text: str, declared: str, packed: bool
) -> None:
    path = tmp_path / "export.xml"
    path.write_text(text)
    origin = str(path)
    if packed:
        path = write_zip(tmp_path / "export.zip", {"apple_health_export/export.xml": text})
        origin = f"{path}!/apple_health_export/export.xml"
    batches = pull(path, batch_samples=1)  # a batch per record, were any read
    assert len(batches) == 1
    assert samples(batches) == []
    [problem] = problems(batches)
    assert problem["file"] == origin
    assert problem["reason"].startswith(f"{origin} is refused: {declared}. Entities are never expanded")
    assert list(batches[0].watermark["files"]) == [str(path)]  # not read again until it changes


def test_an_external_dtd_is_never_fetched(tmp_path: Path) -> None:
    asked: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'<!ENTITY x "y">')

    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dtd = f"http://127.0.0.1:{server.server_port}/healthdata.dtd"
        path = tmp_path / "export.xml"
        path.write_text(
            f'<?xml version="1.0"?>\n<!DOCTYPE HealthData SYSTEM "{dtd}">\n<HealthData>\n'
            + record(f"{Q}StepCount", "7", "count")
            + END
        )
        assert [r["value"] for r in samples(pull(path))] == [7]
    finally:
        server.shutdown()
        server.server_close()
    assert asked == []


def test_apples_internal_dtd_parses(tmp_path: Path) -> None:
    path = tmp_path / "export.xml"
    path.write_text(DTD + record(f"{Q}StepCount", "7", "count") + END)
    assert [r["value"] for r in samples(pull(path))] == [7]


def test_a_cut_export_keeps_the_samples_before_the_break_and_quarantines_the_break(tmp_path: Path) -> None:
    cut = EXPORT.index('<Record type="HKQuantityTypeIdentifierBodyMassIndex"') + 30
    path = tmp_path / "export.xml"
    path.write_text(EXPORT[:cut])
    batches = pull(path)
    assert as_expected(samples(batches)) == EXPECTED[:8]  # up to Height, the record before the cut
    [problem] = problems(batches)
    line = EXPORT[:cut].count("\n") + 1  # the unclosed <Record starts at its second column
    assert problem["line_no"] == line
    assert problem["reason"].startswith(
        f"{path} breaks off at line {line}, column 2 (unclosed token); the samples before it are kept"
    )
    assert list(batches[-1].watermark["files"]) == [str(path)]


def test_a_damaged_zip_member_keeps_what_came_before(tmp_path: Path) -> None:
    big = DTD + record(f"{Q}StepCount", "1", "count") * 20_000 + END
    archive = write_zip(tmp_path / "export.zip", {"apple_health_export/export.xml": big})
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the compressed stream
    archive.write_bytes(bytes(data))
    batches = pull(archive)
    assert 0 < len(samples(batches)) < 20_000
    [problem] = problems(batches)
    assert problem["file"] == f"{archive}!/apple_health_export/export.xml"
    assert "the samples before it are kept" in problem["reason"]


def test_a_zip_member_failing_its_checksum_keeps_what_was_read_before(tmp_path: Path) -> None:
    text = DTD + record(f"{Q}StepCount", "1", "count") * 20_000 + END  # several read chunks
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        out.writestr("apple_health_export/export.xml", text)
    data = archive.read_bytes()
    at = data.rindex(b'value="1"') + len('value="')
    archive.write_bytes(data[:at] + b"2" + data[at + 1 :])  # stored, so still XML, but the CRC fails
    batches = pull(archive)
    values = [r["value"] for r in samples(batches)]
    assert 0 < len(values) < 20_000 and set(values) == {1}  # the last chunk read fails the check
    [problem] = problems(batches)
    assert problem["line_no"] > 1
    assert problem["reason"].startswith(
        f"{archive}!/apple_health_export/export.xml cannot be read past line {problem['line_no']} "
        "(BadZipFile: Bad CRC-32"
    )


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        (
            "export.xml",
            b"<ClinicalDocument/>",
            "is not an Apple Health export (its root element is <ClinicalDocument>, not <HealthData>)",
        ),
        ("export.zip", b"PK\x03\x04 not a zip", "is not a readable zip"),
        ("export.zip", None, "holds no export.xml"),
    ],
    ids=["not-health-data", "bad-zip", "zip-without-export"],
)
def test_a_file_that_is_no_export_is_refused_whole_with_the_fix(
    tmp_path: Path, name: str, data: bytes | None, reason: str
) -> None:
    path = tmp_path / name
    if data is None:
        write_zip(path, {"notes.txt": "hello"})
    else:
        path.write_bytes(data)
    batches = pull(path)
    assert samples(batches) == []
    [problem] = problems(batches)
    assert problem["reason"].startswith(f"{path} {reason}")
    assert "export" in problem["reason"].split(";")[-1]  # says what to do


def test_a_missing_path_is_a_source_error() -> None:
    with pytest.raises(SourceError, match=r"does not exist; point sources\.path"):
        AppleHealthConnector(source(Path("/nonexistent/export.zip"))).check()


def test_the_source_is_configured_and_wired_like_any_other(tmp_path: Path) -> None:
    config = tmp_path / "twinhub.toml"
    config.write_text(
        '[[sources]]\nname = "ann-watch"\nkind = "apple-health"\npath = "export.zip"\npatient = "p1"\n'
    )
    settings_ = load_settings(config)
    [configured] = settings_.sources
    assert isinstance(configured, AppleHealthSource) and configured.path == tmp_path / "export.zip"
    assert isinstance(build_connector(settings_, configured), AppleHealthConnector)
    config.write_text('[[sources]]\nname = "ann-watch"\nkind = "apple-health"\npath = "export.zip"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\].patient: is required"):
        load_settings(config)


# --- hostile input, property-tested -------------------------------------------------------------

NOISE = st.binary(max_size=8) | st.text(alphabet=list("<>&;\"'=/ !-[]%\x00é0123456789.+:"), max_size=8).map(
    str.encode
)
CLEAN = EXPORT.encode()


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    data = CLEAN
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["noise", "cut", "truncate", "attribute", "entity"])):
            case "noise":
                data = data[:at] + draw(NOISE) + data[at + draw(st.integers(0, 6)) :]
            case "cut":
                data = data[:at] + data[at + draw(st.integers(1, 60)) :]
            case "truncate":
                data = data[:at]
            case "attribute":  # an attribute's value replaced
                name = draw(st.sampled_from([b'value="', b'startDate="', b'endDate="', b'unit="', b'type="']))
                starts = [i for i in range(len(data)) if data.startswith(name, i)]
                if starts:
                    i = draw(st.sampled_from(starts)) + len(name)
                    j = data.find(b'"', i)
                    value = draw(st.text(alphabet=list("0123456789.-+e: %<>HKabcdnif"), max_size=12))
                    data = data[:i] + value.replace("<", "&lt;").encode() + data[j if j >= 0 else i :]
            case "entity":  # a declaration slipped into the DTD
                data = data.replace(b"]>", b'<!ENTITY x "y">\n]>', 1)
    return data


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mangled(), packed=st.booleans(), damage=st.integers(0, 2))
def test_mangled_exports_give_samples_or_problems_never_an_exception(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, packed: bool, damage: int
) -> None:
    folder = tmp_path_factory.mktemp("mangled")
    path = folder / "export.xml"
    path.write_bytes(data)
    if packed:
        path = write_zip(folder / "export.zip", {"apple_health_export/export.xml": data})
        if damage:
            packed_bytes = bytearray(path.read_bytes())
            at = len(packed_bytes) // (damage + 1)
            packed_bytes[at] ^= 0x5A
            path.write_bytes(bytes(packed_bytes))
    batches = pull(path, batch_samples=7)
    assert batches and str(path) in batches[-1].watermark["files"]
    known = set(metrics())
    for batch in batches:
        assert batch.samples is not None and batch.samples.schema == SAMPLE_SCHEMA
        assert batch.problems.schema == PROBLEM_SCHEMA
        assert set(batch.samples["metric"].to_pylist()) <= known
        assert all(p["reason"] and p["file"] for p in batch.problems.to_pylist())
        normalize_samples(batch.samples)  # what the store does next never trips on them either
    if any("is refused" in p["reason"] for p in problems(batches)):
        assert samples(batches) == []  # nothing of a file that declares an entity


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, len(CLEAN)))
def test_a_truncated_export_yields_a_prefix_of_its_samples_and_says_where_it_broke(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    path = tmp_path_factory.mktemp("cut") / "export.xml"
    path.write_bytes(CLEAN[:cut])
    batches = pull(path)
    rows = as_expected(samples(batches))
    assert rows == EXPECTED[: len(rows)]
    breaks = [p for p in problems(batches) if "breaks off" in p["reason"]]
    assert len(breaks) == (0 if CLEAN[:cut].rstrip() == CLEAN.rstrip() else 1)


# --- scale --------------------------------------------------------------------------------------

MEASURE = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from connectors.wearables.apple_health import AppleHealthConnector, AppleHealthSource

source = AppleHealthSource(name="big", kind="apple-health", path=Path(sys.argv[1]), patient="p1")
started, counted = time.perf_counter(), {"samples": 0, "problems": 0, "batches": 0}
for batch in AppleHealthConnector(source).pull(None):
    counted["samples"] += batch.samples.num_rows
    counted["problems"] += batch.problems.num_rows
    counted["batches"] += 1
counted["seconds"] = time.perf_counter() - started
# This process's own peak: ru_maxrss would be the parent's (pytest's) when that is larger, as
# Linux carries it across the exec of a vforked child.
status = Path("/proc/self/status").read_text().splitlines()
counted["max_rss_mb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
print(json.dumps(counted))
"""


def write_big_export(path: Path, records: int) -> int:
    """A Health app export.zip of `records` top-level Records as a Watch and iPhone write them
    (heart rate with metadata, steps, distance, energy, sleep, blood pressure in correlations),
    streamed into the zip; returns how many of them map to samples."""
    minute = [
        lambda t: record(
            f"{Q}HeartRate",
            str(60 + t % 50),
            "count/min",
            t_(t),
            children=('  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="1"/>\n'),
        ),
        lambda t: record(f"{Q}StepCount", str(t % 120), "count", t_(t), t_(t + 1), "Ann's iPhone", PHONE),
        lambda t: record(f"{Q}DistanceWalkingRunning", f"{t % 90 / 1000:.5f}", "km", t_(t), t_(t + 1)),
        lambda t: record(f"{Q}ActiveEnergyBurned", f"{t % 7 / 3:.3f}", "kcal", t_(t), t_(t + 1)),
        lambda t: record(f"{Q}BasalEnergyBurned", "1.14", "kcal", t_(t), t_(t + 1)),  # unmapped
        lambda t: sleep("AsleepCore", t_(t), t_(t + 1)),
        lambda t: record(f"{Q}OxygenSaturation", "0.96", "%", t_(t)),
        lambda t: record(f"{Q}HeartRateVariabilitySDNN", "48.2", "ms", t_(t)),  # unmapped
    ]
    mapped = {0, 1, 2, 3, 5, 6}
    correlation = (
        ' <Correlation type="HKCorrelationTypeIdentifierBloodPressure" sourceName="Omron" '
        f'creationDate="{NOON}" startDate="{NOON}" endDate="{NOON}">\n'
        + record(f"{Q}BloodPressureSystolic", "121", "mmHg", **BP_CUFF)
        + record(f"{Q}BloodPressureDiastolic", "79", "mmHg", **BP_CUFF)
        + " </Correlation>\n"
    )
    expected = 0
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("apple_health_export/export.xml", "w", force_zip64=True) as out,
    ):
        out.write(DTD.encode())
        for first in range(0, records, 10_000):
            chunk = []
            for n in range(first, min(first + 10_000, records)):
                chunk.append(minute[n % len(minute)](n // len(minute)))
                expected += n % len(minute) in mapped
                if n % 5_000 == 0:
                    chunk.append(correlation)  # its records are copies of top-level ones
            out.write("".join(chunk).encode())
        out.write(END.encode())
    return expected


def t_(minute: int) -> str:
    """A local time `minute` minutes after 2020-01-01 00:00 (+0000 in winter, +0100 in summer)."""
    stamp = datetime(2020, 1, 1, tzinfo=UTC).timestamp() + 60 * minute
    local = datetime.fromtimestamp(stamp, UTC)
    summer = 4 <= local.month <= 9
    shown = datetime.fromtimestamp(stamp + 3600 * summer, UTC)
    return shown.strftime("%Y-%m-%d %H:%M:%S ") + ("+0100" if summer else "+0000")


@pytest.mark.slow
def test_a_million_record_export_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "export.zip"
    records = 1_000_000
    expected = write_big_export(path, records)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    measured = json.loads(result.stdout)
    unpacked = zipfile.ZipFile(path).infolist()[0].file_size
    rate = records / measured["seconds"]
    log.info(
        f"{records:,} records ({unpacked / 1e6:.0f} MB, {path.stat().st_size / 1e6:.0f} MB zipped): "
        f"{measured['samples']:,} samples "
        f"in {measured['batches']} batches, {measured['seconds']:.1f} s ({rate:,.0f} records/s), "
        f"peak RSS {measured['max_rss_mb']:.0f} MB (run {time.perf_counter() - started:.1f} s)"
    )
    assert measured["samples"] == expected and measured["problems"] == 0
    assert measured["max_rss_mb"] < 500


def write_attribute_bomb(path: Path, size: int) -> None:
    """An export.zip whose XML holds, after two good records, one Record with a `size`-byte
    attribute: a megabyte or so zipped, streamed into the zip."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("apple_health_export/export.xml", "w", force_zip64=True) as out,
    ):
        out.write((DTD + record(f"{Q}StepCount", "1", "count") * 2).encode())
        out.write(f' <Record type="{Q}StepCount" sourceName="x" unit="count" value="'.encode())
        block = b"A" * (1 << 20)
        for _ in range(size >> 20):
            out.write(block)
        out.write(f'" startDate="{NOON}" endDate="{NOON}"/>\n{END}'.encode())


def test_a_token_longer_than_the_limit_breaks_the_file_off_there(tmp_path: Path) -> None:
    path = tmp_path / "export.zip"
    write_attribute_bomb(path, 40 << 20)  # past MAX_TOKEN (16 MiB), small enough for the fast run
    batches = pull(path)
    assert [s["value"] for s in samples(batches)] == [1, 1], "the records before it"
    [problem] = problems(batches)
    assert problem["reason"].startswith(
        f"{path}!/apple_health_export/export.xml holds more than 16 MiB without a tag after line "
    )
    assert "the samples before it are kept" in problem["reason"]


@pytest.mark.slow
def test_the_attribute_bomb_is_refused_within_seconds_in_bounded_memory(tmp_path: Path) -> None:
    """A 1 MB zip whose XML holds one 1 GiB attribute took 308 s (expat rescanning the growing
    token) and held it in memory."""
    path = tmp_path / "export.zip"
    write_attribute_bomb(path, 1 << 30)
    assert path.stat().st_size < 4 << 20
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    measured = json.loads(result.stdout)
    log.info(
        f"attribute bomb ({path.stat().st_size / 1e6:.1f} MB zipped, 1 GiB attribute): "
        f"{measured['seconds']:.2f} s, peak RSS {measured['max_rss_mb']:.0f} MB"
    )
    assert (measured["samples"], measured["problems"]) == (2, 1)
    assert measured["seconds"] < 10
    assert measured["max_rss_mb"] < 1000


def test_a_zip_cut_short_keeps_the_samples_before_the_cut(tmp_path: Path) -> None:
    """A cut zip has lost its list of members (at its end): it is read front to back instead."""
    big = DTD + record(f"{Q}StepCount", "1", "count") * 20_000 + END
    archive = write_zip(tmp_path / "export.zip", {"apple_health_export/export.xml": big})
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    batches = pull(archive)
    assert 0 < len(samples(batches)) < 20_000
    assert {s["value"] for s in samples(batches)} == {1}
    [problem] = problems(batches)
    assert problem["file"] == f"{archive}!/apple_health_export/export.xml"
    assert problem["line_no"] > len(samples(batches))
    assert "the zip breaks off here (TruncatedDataError)" in problem["reason"]
    assert "the samples before it are kept" in problem["reason"]
    archive.write_bytes(whole)  # replaced: read again whole
    again = pull(archive, batches[-1].watermark)
    assert (len(samples(again)), problems(again)) == (20_000, [])
