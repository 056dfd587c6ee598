"""Open mHealth data points into wearable samples: validation against the schemas, the mapping of
bodies and time frames, and what is quarantined why. The fixture tests use tiny schemas of their
own (written below, in the upstream layout); the acceptance tests run upstream's own shouldPass /
shouldFail samples against the shared copy of the real schemas."""

from __future__ import annotations

import gzip
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from connectors.base import SAMPLE_SCHEMA, Batch
from connectors.errors import ConfigError, SourceError
from connectors.wearables.openmhealth import OpenMHealthConnector, OpenMHealthSource, time_frame
from connectors.wearables.openmhealth_schemas import rules
from tests.support.data import SHARED

D4 = "http://json-schema.org/draft-04/schema#"
D7 = "http://json-schema.org/draft-07/schema#"
IEEE = "https://w3id.org/ieee/ieee-1752-schema/"
UNIT_VALUE = {
    "type": "object",
    "properties": {"value": {"type": "number"}, "unit": {"type": "string"}},
    "required": ["value", "unit"],
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "unit-value-1.0.json": {"$schema": D4, **UNIT_VALUE},
    # 1.1 is stricter, so a body passing 1.0 but not 1.1 shows that `unit-value-1.x` means 1.1
    "unit-value-1.1.json": {
        "$schema": D7,
        **UNIT_VALUE,
        "properties": {"value": {"type": "number"}, "unit": {"type": "string", "minLength": 1}},
    },
    "date-time-1.0.json": {"$schema": D4, "type": "string", "format": "date-time"},
    "duration-unit-value-1.0.json": {
        "$schema": D4,
        "allOf": [
            {"$ref": "unit-value-1.x.json"},
            {"properties": {"unit": {"enum": ["sec", "min", "h", "d"]}}},
        ],
    },
    "time-interval-1.0.json": {
        "$schema": D4,
        "type": "object",
        "oneOf": [
            {"required": ["start_date_time", "end_date_time"]},
            {"required": ["start_date_time", "duration"]},
            {"required": ["end_date_time", "duration"]},
            {"required": ["date", "part_of_day"]},
        ],
        "properties": {
            "start_date_time": {"$ref": "date-time-1.x.json"},
            "end_date_time": {"$ref": "date-time-1.x.json"},
            "duration": {"$ref": "duration-unit-value-1.x.json"},
            "date": {"type": "string", "pattern": "^\\d{4}-\\d\\d-\\d\\d$"},
            "part_of_day": {"enum": ["morning", "afternoon", "evening", "night"]},
        },
    },
    "time-frame-1.0.json": {
        "$schema": D4,
        "type": "object",
        "oneOf": [
            {"properties": {"date_time": {"$ref": "date-time-1.x.json"}}, "required": ["date_time"]},
            {
                "properties": {"time_interval": {"$ref": "time-interval-1.x.json"}},
                "required": ["time_interval"],
            },
        ],
    },
    "header-1.0.json": {
        "$schema": D4,
        "type": "object",
        "required": ["id", "creation_date_time", "schema_id"],
        "properties": {
            "creation_date_time": {"$ref": "date-time-1.x.json"},
            "user_id": {"type": "string"},
            "acquisition_provenance": {"type": "object", "required": ["source_name"]},
        },
    },
    "heart-rate-1.0.json": {
        "$schema": D4,
        "type": "object",
        "required": ["heart_rate"],
        "properties": {
            "heart_rate": {
                "allOf": [{"$ref": "unit-value-1.x.json"}, {"properties": {"unit": {"enum": ["beats/min"]}}}]
            },
            "effective_time_frame": {"$ref": "time-frame-1.x.json"},
            "descriptive_statistic": {"enum": ["average", "minimum", "maximum"]},
        },
    },
    "step-count-1.0.json": {
        "$schema": D4,
        "type": "object",
        "required": ["step_count"],
        "properties": {
            "step_count": {"type": "number"},
            "effective_time_frame": {"$ref": "time-frame-1.x.json"},
        },
    },
    "blood-pressure-1.0.json": {
        "$schema": D4,
        "type": "object",
        "properties": {
            "systolic_blood_pressure": {"$ref": "unit-value-1.x.json"},
            "diastolic_blood_pressure": {"$ref": "unit-value-1.x.json"},
            "effective_time_frame": {"$ref": "time-frame-1.x.json"},
        },
    },
    "body-weight-9.0.json": {
        "$schema": D7,
        "type": "object",
        "required": ["body_weight"],
        "properties": {
            "body_weight": {"$ref": "unit-value-1.x.json"},
            "effective_time_frame": {"$ref": IEEE + "time-frame-1.0.json"},
        },
    },
    "blood-glucose-9.0.json": {
        "$schema": D7,
        "type": "object",
        "properties": {"blood_glucose": {"$ref": "glucose-unit-value-1.x.json"}},
    },
    "mood-1.0.json": {"$schema": D7, "type": "object"},
}
AT = {"date_time": "2024-05-01T08:30:00+02:00"}


def write_schemas(folder: Path) -> Path:
    (folder / "omh").mkdir(parents=True)
    for name, schema in SCHEMAS.items():
        (folder / "omh" / name).write_bytes(orjson.dumps(schema))
    return folder


def point(
    name: str, body: dict[str, Any], version: str = "1.0", user: str | None = "u1", **header: Any
) -> Any:
    head = {
        "id": f"dp-{name}",
        "creation_date_time": "2024-05-02T00:00:00Z",
        "schema_id": {"namespace": "omh", "name": name, "version": version},
        "acquisition_provenance": {"source_name": "Acme Watch", "modality": "sensed"},
        **header,
    }
    if user is not None:
        head["user_id"] = user
    return {"header": head, "body": body}


def hr(bpm: float = 61, frame: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    return {"heart_rate": {"value": bpm, "unit": "beats/min"}, "effective_time_frame": frame or AT, **body}


def ndjson(path: Path, items: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in items))
    return path


@pytest.fixture
def schemas(tmp_path: Path) -> Path:
    return write_schemas(tmp_path / "schema")


def source(path: Path, schemas: Path, **extra: Any) -> OpenMHealthSource:
    return OpenMHealthSource(
        name="omh",
        kind="openmhealth",
        path=path,
        schemas=schemas,
        **{"patients": {"u1": "p1", "u2": "p2"}, **extra},
    )


def pull(src: OpenMHealthSource, since: dict[str, Any] | None = None) -> list[Batch]:
    return list(OpenMHealthConnector(src).pull(since))


def samples_of(batches: list[Batch]) -> list[dict[str, Any]]:
    return pa.concat_tables([b.samples for b in batches if b.samples is not None]).to_pylist()


def reasons(batches: list[Batch]) -> list[str]:
    return [r for b in batches for r in b.problems.column("reason").to_pylist()]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_one_data_point_an_array_or_ndjson_per_file_become_samples(tmp_path: Path, schemas: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "one.json").write_bytes(orjson.dumps(point("heart-rate", hr(61)), option=orjson.OPT_INDENT_2))
    pressure = {
        "systolic_blood_pressure": {"value": 120, "unit": "mmHg"},
        "diastolic_blood_pressure": {"value": 80, "unit": "mmHg"},
        "effective_time_frame": {"date_time": "2024-05-01T07:00:00Z"},
    }
    hour = {"start_date_time": "2024-05-01T09:00:00-07:00", "end_date_time": "2024-05-01T10:00:00-07:00"}
    steps = {"step_count": 800, "effective_time_frame": {"time_interval": hour}}
    many = [point("blood-pressure", pressure, user="u2"), point("step-count", steps)]
    (data / "many.json").write_bytes(orjson.dumps(many))
    with gzip.open(data / "lines.ndjson.gz", "wb") as fh:
        fh.write(orjson.dumps(point("heart-rate", hr(70), user=None)) + b"\n\n")
        fh.write(orjson.dumps(point("heart-rate", hr(72), user="u9")) + b"\n")

    batches = pull(source(data, schemas, patient="p0"))

    assert reasons(batches) == []
    assert batches[-1].samples is not None and batches[-1].samples.schema == SAMPLE_SCHEMA
    got = sorted(samples_of(batches), key=lambda s: (s["origin"], s["metric"]))
    base = {"device": "Acme Watch (sensed)", "end_time": None, "unit": "beats/min", "metric": "heart_rate"}
    hr_at, offset = utc(AT["date_time"]), 120
    assert got == [
        {
            **base,
            "patient_id": "p0",
            "start_time": hr_at,
            "utc_offset_minutes": offset,
            "value": 70.0,
            "origin": f"{data}/lines.ndjson.gz:line 1",
        },
        {
            **base,
            "patient_id": "p0",
            "start_time": hr_at,
            "utc_offset_minutes": offset,
            "value": 72.0,
            "origin": f"{data}/lines.ndjson.gz:line 3",
        },  # u9 is not in `patients`: the default patient
        {
            **base,
            "patient_id": "p2",
            "metric": "diastolic_blood_pressure",
            "unit": "mmHg",
            "value": 80.0,
            "start_time": utc("2024-05-01T07:00:00+00:00"),
            "utc_offset_minutes": 0,
            "origin": f"{data}/many.json:item 1",
        },
        {
            **base,
            "patient_id": "p2",
            "metric": "systolic_blood_pressure",
            "unit": "mmHg",
            "value": 120.0,
            "start_time": utc("2024-05-01T07:00:00+00:00"),
            "utc_offset_minutes": 0,
            "origin": f"{data}/many.json:item 1",
        },
        {
            **base,
            "patient_id": "p1",
            "metric": "steps",
            "unit": "steps",
            "value": 800.0,
            "start_time": utc("2024-05-01T16:00:00+00:00"),
            "end_time": utc("2024-05-01T17:00:00+00:00"),
            "utc_offset_minutes": -420,
            "origin": f"{data}/many.json:item 2",
        },
        {
            **base,
            "patient_id": "p1",
            "start_time": hr_at,
            "utc_offset_minutes": offset,
            "value": 61.0,
            "origin": f"{data}/one.json",
        },
    ]
    assert batches[-1].stats["samples"] == 6


def test_a_json_file_may_hold_json_lines_and_one_that_is_not_json_is_one_problem(
    tmp_path: Path, schemas: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = b"\xef\xbb\xbf" + orjson.dumps(point("heart-rate", hr(60))) + b"\r\n"
    (data / "lines.json").write_bytes(lines + b"[1, 2\r\n" + orjson.dumps(point("heart-rate", hr(62))))
    (data / "broken.json").write_bytes(b'{\n  "header": {\n')
    batches = pull(source(data, schemas))
    assert [(s["origin"], s["value"]) for s in samples_of(batches)] == [
        (f"{data}/lines.json:line 1", 60.0),
        (f"{data}/lines.json:line 3", 62.0),
    ]
    problems = pa.concat_tables([b.problems for b in batches]).to_pylist()
    assert [(p["file"], p["line_no"], p["reason"].split(" (")[0], p["raw"]) for p in problems] == [
        (str(data / "broken.json"), 1, "the file: not JSON", '{\n  "header": {'),
        (str(data / "lines.json"), 2, "line 2: not JSON", "[1, 2"),
    ]


BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("frame", "start", "end", "offset"),
    [
        ({"date_time": "2024-01-05T23:30:00.250-05:00"}, "2024-01-06T04:30:00.250+00:00", None, -300),
        (
            {
                "time_interval": {
                    "start_date_time": "2024-01-05T22:00:00+01:00",
                    "end_date_time": "2024-01-06T06:30:00Z",
                }
            },
            "2024-01-05T21:00:00+00:00",
            "2024-01-06T06:30:00+00:00",
            60,
        ),
        (
            {
                "time_interval": {
                    "start_date_time": "2024-01-05T22:00:00+01:00",
                    "duration": {"value": 7.5, "unit": "h"},
                }
            },
            "2024-01-05T21:00:00+00:00",
            "2024-01-06T04:30:00+00:00",
            60,
        ),
        (
            {
                "time_interval": {
                    "end_date_time": "2024-01-06T06:00:00+05:30",
                    "duration": {"value": 90, "unit": "min"},
                }
            },
            "2024-01-05T23:00:00+00:00",
            "2024-01-06T00:30:00+00:00",
            330,
        ),
        # no offset: read in the source's time zone; the night the clocks go forward lasts 5 hours
        (
            {"time_interval": {"date": "2024-03-31", "part_of_day": "night"}},
            "2024-03-30T23:00:00+00:00",
            "2024-03-31T04:00:00+00:00",
            60,
        ),
        (
            {"time_interval": {"date": "2024-07-01", "part_of_day": "evening"}},
            "2024-07-01T16:00:00+00:00",
            "2024-07-01T22:00:00+00:00",
            120,
        ),
    ],
)
def test_time_frames_become_utc_instants_with_the_written_offset(
    frame: dict[str, Any], start: str, end: str | None, offset: int
) -> None:
    assert time_frame(frame, BERLIN) == (utc(start), end and utc(end), offset)


def test_part_of_day_intervals_are_read_in_the_source_timezone(tmp_path: Path, schemas: Path) -> None:
    frame = {"time_interval": {"date": "2024-07-01", "part_of_day": "morning"}}
    path = ndjson(tmp_path / "d.ndjson", [point("heart-rate", hr(frame=frame))])
    (sample,) = samples_of(pull(source(path, schemas, timezone="America/New_York")))
    assert (sample["start_time"], sample["end_time"], sample["utc_offset_minutes"]) == (
        utc("2024-07-01T10:00:00+00:00"),
        utc("2024-07-01T16:00:00+00:00"),
        -240,
    )


def test_invalid_data_points_are_quarantined_with_the_schema_error_and_valid_ones_land(
    tmp_path: Path, schemas: Path
) -> None:
    path = ndjson(
        tmp_path / "d.ndjson",
        [
            point("heart-rate", hr(60)),
            point("heart-rate", {**hr(), "heart_rate": {"value": 60, "unit": "beat/min"}}),
            point("heart-rate", hr(frame={"date_time": "2024-05-01 08:30"})),
            point("heart-rate", hr(frame={"time_interval": {"start_date_time": "2024-05-01T08:30:00Z"}})),
            point(
                "blood-pressure", {"systolic_blood_pressure": {"value": 120, "unit": ""}}
            ),  # 1.1: minLength
            point("step-count", {"step_count": "6000"}),
            point("heart-rate", hr(62), creation_date_time="yesterday"),
            point("heart-rate", hr(63), acquisition_provenance={"modality": "sensed"}),
        ],
    )
    batches = pull(source(path, schemas))
    assert [s["value"] for s in samples_of(batches)] == [60.0]
    assert reasons(batches) == [
        "line 2: body does not match schema omh:heart-rate:1.0 at $.heart_rate.unit: "
        "'beat/min' is not one of ['beats/min']",
        "line 3: body does not match schema omh:heart-rate:1.0 at $.effective_time_frame.date_time: "
        "'2024-05-01 08:30' is not a 'date-time'",
        "line 4: body does not match schema omh:heart-rate:1.0 at $.effective_time_frame.time_interval: "
        "{'start_date_time': '2024-05-01T08:30:00Z'} is not valid under any of the given schemas",
        "line 5: body does not match schema omh:blood-pressure:1.0 at $.systolic_blood_pressure.unit: "
        "'' should be non-empty",
        "line 6: body does not match schema omh:step-count:1.0 at $.step_count: "
        "'6000' is not of type 'number'",
        "line 7: header does not match schema omh:header:1.x at $.creation_date_time: "
        "'yesterday' is not a 'date-time'",
        "line 8: header does not match schema omh:header:1.x at $.acquisition_provenance: "
        "'source_name' is a required property",
    ]
    problems = pa.concat_tables([b.problems for b in batches]).to_pylist()
    assert [p["line_no"] for p in problems] == [2, 3, 4, 5, 6, 7, 8]
    assert orjson.loads(problems[0]["raw"])["body"]["heart_rate"]["unit"] == "beat/min"
    assert sum(b.stats["schema_invalid"] for b in batches) == 7


def test_what_cannot_become_a_sample_is_a_problem_naming_why(tmp_path: Path, schemas: Path) -> None:
    a_day = {
        "time_interval": {"start_date_time": "2024-05-01T00:00:00Z", "duration": {"value": 1, "unit": "d"}}
    }
    backwards = {
        "time_interval": {"start_date_time": "2024-05-02T00:00:00Z", "end_date_time": "2024-05-01T00:00:00Z"}
    }
    path = ndjson(
        tmp_path / "d.ndjson",
        [
            point("heart-rate", hr(55, descriptive_statistic="minimum", frame=a_day)),
            point("step-count", {"step_count": 6000}),
            point("heart-rate", hr(frame=backwards)),
            point("heart-rate", hr(), user="u9"),
            point("heart-rate", hr(), user=None),
            point("walk-speed", {"speed": 3}),
            point("mood", {"mood": "fine"}),
            point("blood-glucose", {"blood_glucose": {"value": 90, "unit": "mg/dL"}}, version="9.0"),
            point("blood-pressure", {"effective_time_frame": AT}),
            {"header": {"id": "x"}},
            "{not json",
            point("heart-rate", hr(), schema_id={"namespace": "omh", "name": "heart-rate"}),
        ],
    )
    path.write_bytes(path.read_bytes().replace(b'"{not json"', b"{not json"))  # a line that is not JSON
    batches = pull(source(path, schemas))
    assert samples_of(batches) == []
    got = reasons(batches)
    expected = [
        "line 1: omh:heart-rate:1.0 body is the minimum over 1 d from 2024-05-01T00:00:00Z, a summary, "
        "not a measurement: twinhub lands measurements and derives daily statistics itself",
        "line 2: omh:step-count:1.0 body has no effective_time_frame, so it is not known when it was "
        "measured (header.creation_date_time is when the data point was made); add one to the body",
        "line 3: its time interval ends (2024-05-01T00:00:00+00:00) before it starts "
        "(2024-05-02T00:00:00+00:00)",
        "line 4: no patient for user_id 'u9': add it to sources.omh.patients or set sources.omh.patient",
        "line 5: the data point has no header.user_id and sources.omh.patient is not set",
        f"line 6: schema omh:walk-speed:1.0 is not in the schemas folder '{schemas}'; add "
        "omh/walk-speed-1.0.json there or fix header.schema_id",
        "line 7: schema omh:mood:1.0 is valid but not one twinhub maps to samples (it maps omh:heart-rate, ",
        "line 8: body cannot be checked against schema omh:blood-glucose:9.0: omh/blood-glucose-9.0.json "
        f"refers to 'omh/glucose-unit-value-1.x.json', which is not in the schemas folder '{schemas}'; "
        "add that schema there",
        "line 9: omh:blood-pressure:1.0 body has none of systolic_blood_pressure, diastolic_blood_pressure, "
        "so it makes no sample",
        "line 10: not an Open mHealth data point: it needs a `header` and a `body` object",
        "line 11: not JSON (",
        "line 12: header.schema_id must name the body's schema: namespace, name and version",
    ]
    assert len(got) == len(expected)
    for reason, start in zip(got, expected, strict=True):
        assert reason.startswith(start), reason
        assert "\n" not in reason


def test_a_newer_minor_version_validates_an_older_data_point_and_no_major_does(
    tmp_path: Path, schemas: Path
) -> None:
    path = ndjson(
        tmp_path / "d.ndjson",
        [
            point("heart-rate", hr(), version="1.0"),
            point("heart-rate", hr(), version="2.0"),
            point("heart-rate", hr(), version="1.x"),
        ],
    )
    (schemas / "omh" / "heart-rate-1.0.json").rename(schemas / "omh" / "heart-rate-1.2.json")
    batches = pull(source(path, schemas))
    assert len(samples_of(batches)) == 1
    assert [r.split(" is not")[0] for r in reasons(batches)] == [
        "line 2: schema omh:heart-rate:2.0",
        "line 3: schema omh:heart-rate:1.x",
    ]


def test_ieee_1752_refs_stand_in_as_their_open_mhealth_namesakes_without_part_of_day(
    tmp_path: Path, schemas: Path
) -> None:
    def weight(frame: dict[str, Any]) -> Any:
        body = {"body_weight": {"value": 70, "unit": "kg"}, "effective_time_frame": frame}
        return point("body-weight", body, version="9.0")

    an_hour = {"value": 1, "unit": "h"}
    path = ndjson(
        tmp_path / "d.ndjson",
        [
            weight(AT),
            weight({"time_interval": {"start_date_time": "2024-05-01T08:00:00Z", "duration": an_hour}}),
            weight({"time_interval": {"date": "2024-05-01", "part_of_day": "morning"}}),
            weight({"date_time": "soon"}),
        ],
    )
    batches = pull(source(path, schemas))
    assert [(s["metric"], s["unit"], s["value"]) for s in samples_of(batches)] == [
        ("body_weight", "kg", 70.0)
    ] * 2
    assert reasons(batches) == [
        "line 3: body does not match schema omh:body-weight:9.0 at $.effective_time_frame.time_interval: "
        "{'date': '2024-05-01', 'part_of_day': 'morning'} should not be valid under "
        "{'required': ['part_of_day']}",
        "line 4: body does not match schema omh:body-weight:9.0 at $.effective_time_frame.date_time: "
        "'soon' is not a 'date-time'",
    ]


def test_unchanged_files_are_not_read_again_and_changed_ones_are(tmp_path: Path, schemas: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = ndjson(data / "a.ndjson", [point("heart-rate", hr(60))])
    ndjson(data / "b.ndjson", [point("heart-rate", hr(61))])
    src = source(data, schemas)
    batches = pull(src)
    assert len(samples_of(batches)) == 2
    watermark = batches[-1].watermark
    assert sorted(watermark["files"]) == [str(data / "a.ndjson"), str(data / "b.ndjson")]

    again = pull(src, watermark)
    assert samples_of(again) == [] and again[-1].watermark == watermark

    ndjson(first, [point("heart-rate", hr(60)), point("heart-rate", hr(65))])
    os.utime(first, ns=(1, 10**18))
    changed = pull(src, watermark)
    assert [s["value"] for s in samples_of(changed)] == [60.0, 65.0]
    assert changed[-1].watermark["files"][str(first)]["mtime_ns"] == 10**18


def test_batches_are_bounded_and_a_file_counts_as_read_with_its_last_batch(
    tmp_path: Path, schemas: Path
) -> None:
    path = ndjson(tmp_path / "d.ndjson", [point("heart-rate", hr(60 + n)) for n in range(5)])
    batches = pull(source(path, schemas, batch_samples=2))
    assert [b.samples.num_rows for b in batches if b.samples is not None] == [2, 2, 1]
    assert [str(path) in b.watermark["files"] for b in batches] == [False, False, True]
    assert Counter(s["value"] for s in samples_of(batches)) == Counter(60.0 + n for n in range(5))


def test_a_missing_or_empty_schemas_folder_is_a_source_error_naming_the_fix(
    tmp_path: Path, schemas: Path
) -> None:
    path = ndjson(tmp_path / "d.ndjson", [point("heart-rate", hr())])
    (tmp_path / "empty").mkdir()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "heart-rate-1.0.json").write_text("{}")
    for folder, says in [
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "empty", "holds no schemas"),
        (loose, "holds no schemas (its JSON files lie directly in it: point at their parent)"),
    ]:
        with pytest.raises(SourceError) as caught:
            OpenMHealthConnector(source(path, folder)).check()
        assert f"source 'omh': schemas folder '{folder}' {says}" in str(caught.value)
        assert "point sources.schemas at the Open mHealth schemas' schema/ folder" in str(caught.value)
    (schemas / "omh" / "broken-1.0.json").write_text("{")
    with pytest.raises(SourceError, match=r"broken-1\.0\.json' cannot be read as JSON"):
        pull(source(path, schemas))


def test_the_config_names_a_patient_and_builds_the_connector(tmp_path: Path, schemas: Path) -> None:
    from flows.config import load_settings  # flows import Prefect: slow, so only here
    from flows.sync import build_connector

    head = f'[[sources]]\nname = "watch"\nkind = "openmhealth"\npath = "data"\nschemas = "{schemas}"\n'
    config = tmp_path / "twinhub.toml"
    config.write_text(head + '[sources.patients]\n"user-1" = "p1"\n')
    settings = load_settings(config)
    built = build_connector(settings, settings.sources[0])
    assert isinstance(built, OpenMHealthConnector)
    assert built.source.path == tmp_path / "data" and built.source.patients == {"user-1": "p1"}
    for extra, message in [
        ("", 'names no patient; set `patient = "<Patient id>"` or a [sources.patients] table'),
        ('patient = "p1"\ntimezone = "Mars/Olympus"\n', "timezone 'Mars/Olympus' is not an IANA time zone"),
    ]:
        config.write_text(head + extra)
        with pytest.raises(ConfigError, match="config sources") as caught:
            load_settings(config)
        assert message in str(caught.value)


# The unit spellings the Open mHealth schemas allow for each mapped field (their `unit` enums)
OMH_UNITS = {
    "heart_rate": ["beats/min"],
    "steps": ["steps"],
    "systolic_blood_pressure": ["mmHg"],
    "diastolic_blood_pressure": ["mmHg"],
    "body_weight": ["mg", "g", "kg", "oz", "lb"],
    "oxygen_saturation": ["%"],
    "sleep_asleep": ["sec", "min", "h"],
    "blood_glucose": ["mg/dL", "mmol/L"],
    "body_temperature": ["C", "F", "K"],
    "respiratory_rate": ["breaths/min"],
    "body_height": ["mm", "cm", "m", "in", "ft"],
    "body_mass_index": ["kg/m2", "kg/m^2"],
    "body_fat_percentage": ["%"],
    "calories": ["kcal"],
}


def test_the_wearable_catalogue_takes_every_mapped_metric_in_every_spelling_open_mhealth_uses() -> None:
    """Downstream, a sample whose metric or unit the catalogue lacks is quarantined."""
    from harmonize.wearables.metrics import normalize_samples

    mapped = {f["metric"] for fields in rules()["measures"]["omh"].values() for f in fields.values()}
    assert mapped == set(OMH_UNITS)
    rows = [(metric, unit) for metric, units in OMH_UNITS.items() for unit in units]
    at = datetime(2024, 5, 1, tzinfo=UTC)
    samples = pa.table(
        {
            "patient_id": ["p1"] * len(rows),
            "device": [None] * len(rows),
            "metric": [m for m, _ in rows],
            "start_time": [at] * len(rows),
            "end_time": [None] * len(rows),
            "utc_offset_minutes": [0] * len(rows),
            "value": [310.15] * len(rows),
            "unit": [u for _, u in rows],
            "origin": ["f"] * len(rows),
        },
        schema=SAMPLE_SCHEMA,
    )
    normalized, problems = normalize_samples(samples)
    # 310.15 of every metric (37 Cel in K) is out of some metrics' plausible range, but no
    # metric or spelling is unknown
    assert [p["reason"] for p in problems.to_pylist() if "plausible range" not in p["reason"]] == []
    kelvin = normalized.filter(pc.equal(normalized["metric"], "body_temperature")).to_pylist()[-1]
    assert (kelvin["value"], kelvin["unit"]) == (pytest.approx(37.0), "Cel")


# Acceptance (issue 6, point 3): upstream's own samples, read in place from the shared copy.

OMH = SHARED / "wearables" / "openmhealth"
REQUIRED = (
    "heart-rate",
    "step-count",
    "blood-pressure",
    "body-weight",
    "oxygen-saturation",
    "sleep-duration",
    "blood-glucose",
    "body-temperature",
)
MAPPED = tuple(rules()["measures"]["omh"])
SAMPLES = sorted(p for name in MAPPED for p in (OMH / "test-data" / "omh" / name).glob("*/should*/*.json"))
CASES = (
    [pytest.param(p, id=str(p.relative_to(OMH / "test-data" / "omh"))) for p in SAMPLES]
    if OMH.is_dir()
    else [pytest.param(None, marks=pytest.mark.skip(reason=f"shared Open mHealth data not found at {OMH}"))]
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[dict[str, Any]], list[str]]]:
    """Every sample wrapped in a data point naming its schema and version, one file each, pulled
    in one go: file -> (its samples, its problems' reasons)."""
    folder = tmp_path_factory.mktemp("omh-upstream")
    for n, sample in enumerate(SAMPLES):
        name, version = sample.parts[-4], sample.parts[-3]
        wrapped = point(name, orjson.loads(sample.read_bytes()), version=version)
        (folder / f"{n:04d}.json").write_bytes(orjson.dumps(wrapped))
    batches = pull(source(folder, OMH / "schema"))
    found: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for n, sample in enumerate(SAMPLES):
        file = str(folder / f"{n:04d}.json")
        got = [s for s in samples_of(batches) if s["origin"].startswith(file)]
        problems = [p["reason"] for b in batches for p in b.problems.to_pylist() if p["file"] == file]
        found[str(sample)] = (got, problems)
    return found


@pytest.mark.shared
@pytest.mark.parametrize("sample", CASES)
def test_upstream_samples_pass_and_fail_as_upstream_says(
    sample: Path, upstream: dict[str, tuple[list[dict[str, Any]], list[str]]]
) -> None:
    name, version, verdict = sample.parts[-4], sample.parts[-3], sample.parts[-2]
    body = orjson.loads(sample.read_bytes())
    samples, problems = upstream[str(sample)]
    schema_error = f"body does not match schema omh:{name}:{version} at $"
    if verdict == "shouldFail":
        assert samples == [] and len(problems) == 1 and problems[0].startswith(f"the file: {schema_error}")
        return
    assert not any(schema_error in p or "cannot be checked" in p for p in problems), problems
    frame = body.get("effective_time_frame")
    if frame is None or "descriptive_statistic" in body or _backwards(frame):
        # a summary, no time or an interval that ends first: quarantined, saying which
        assert samples == [] and len(problems) == 1
        assert ("a summary, not a measurement" in problems[0]) == ("descriptive_statistic" in body)
        return
    expected = []
    for field, rule in rules()["measures"]["omh"][name].items():
        if (measured := body.get(field)) is not None:
            value = measured["value"] if isinstance(measured, dict) else measured
            expected.append(
                (
                    rule["metric"],
                    float(value),
                    measured.get("unit") if isinstance(measured, dict) else rule["unit"],
                )
            )
    assert problems == []
    assert sorted((s["metric"], s["value"], s["unit"]) for s in samples) == sorted(expected)


def _backwards(frame: dict[str, Any]) -> bool:
    interval = frame.get("time_interval", {})
    if not {"start_date_time", "end_date_time"} <= interval.keys():
        return False
    return bool(utc(interval["end_date_time"]) < utc(interval["start_date_time"]))


@pytest.mark.shared
def test_every_required_schema_version_has_upstream_samples_of_both_verdicts() -> None:
    if not OMH.is_dir():
        pytest.skip(f"shared Open mHealth data not found at {OMH}")
    versions = {p.stem.rsplit("-", 1)[1] for p in (OMH / "schema" / "omh").glob("heart-rate-*.json")}
    assert versions == {"1.0", "1.1", "2.0"}
    for name in REQUIRED:
        verdicts = Counter(p.parts[-2] for p in SAMPLES if p.parts[-4] == name)
        assert verdicts["shouldPass"] and verdicts["shouldFail"], name


def test_a_gzip_file_cut_short_lands_its_data_points_before_the_cut_and_the_other_files(
    tmp_path: Path, schemas: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    ndjson(data / "a.ndjson", [point("heart-rate", hr(60))])
    lines = b"".join(orjson.dumps(point("heart-rate", hr(61 + n % 50))) + b"\n" for n in range(20_000))
    packed = gzip.compress(lines)
    (data / "b.ndjson.gz").write_bytes(packed[: len(packed) // 2])
    ndjson(data / "c.ndjson", [point("heart-rate", hr(62))])
    batches = pull(source(data, schemas))
    by_file = Counter(s["origin"].split(":")[0] for s in samples_of(batches))
    assert by_file[str(data / "a.ndjson")] == by_file[str(data / "c.ndjson")] == 1
    landed = by_file[str(data / "b.ndjson.gz")]
    assert 0 < landed < 20_000
    [problem] = [p for b in batches for p in b.problems.to_pylist()]
    assert (problem["file"], problem["line_no"]) == (str(data / "b.ndjson.gz"), landed + 1)
    assert problem["reason"].startswith(f"file damaged after line {landed:,}: EOFError")
    assert problem["reason"].endswith("the data points before it landed; replace the file and sync again")
    assert str(data / "b.ndjson.gz") in batches[-1].watermark["files"], "read: a replaced file is read again"


def test_a_date_no_calendar_has_is_a_problem_and_the_rest_lands(tmp_path: Path, schemas: Path) -> None:
    """The schemas do not check formats: a date like 2024-02-30 reached the parser and stopped the pull."""
    path = ndjson(
        tmp_path / "points.ndjson",
        [
            point("heart-rate", hr(60, {"time_interval": {"date": "2024-02-30", "part_of_day": "night"}})),
            point("heart-rate", hr(61)),
        ],
    )
    batches = pull(source(path, schemas))
    assert [s["value"] for s in samples_of(batches)] == [61.0]
    [problem] = [p for b in batches for p in b.problems.to_pylist()]
    assert problem["line_no"] == 1
    assert problem["reason"] == "line 1: cannot become samples (day is out of range for month)"
