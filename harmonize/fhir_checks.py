"""Cheap structural checks on raw FHIR resources, vectorized in an in-memory DuckDB.

Per-resource pydantic validation runs at a few thousand resources a second; these checks run at
hundreds of thousands, so every bulk resource gets them. Pure: records in, checked rows and
problems out; the in-memory engine does no I/O.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import pairwise

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from xxhash import xxh3_64_intdigest

# FHIR R4 datatype regexes (http://hl7.org/fhir/R4/datatypes.html), anchored by the functions.
ID = r"[A-Za-z0-9\-\.]{1,64}"
INSTANT = (
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
TYPE = r"[A-Z][A-Za-z]{1,63}"
REFERENCE = (
    rf"#.*|urn:uuid:[0-9a-fA-F]{{8}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{12}}"
    rf"|urn:oid:[0-2](\.(0|[1-9][0-9]*))+"
    rf"|(https?://[^\s/]+(/[^\s/]+)*/)?{TYPE}/{ID}(/_history/{ID})?"
)
REFERENCE_VALUE = r'"reference"\s*:\s*"((?:[^"\\]|\\.)*)"'
# Matches wherever a reference value is not plainly `Type/id"`. Lines without such a match (nearly
# all) skip the exact check: one scan instead of extracting and matching every reference.
UNUSUAL_REFERENCE = (
    r'"reference"\s*:\s*"(?:[^A-Z]|[A-Z](?:/|[A-Za-z]{64}|[A-Za-z]*(?:[^A-Za-z/]'
    r'|/(?:[^A-Za-z0-9.\-]|[A-Za-z0-9.\-]{65}|[A-Za-z0-9.\-]{1,64}[^A-Za-z0-9.\-"]))))'
)
UNQUOTED_ID = r'"id"\s*:\s*[^"\s]'
"""Matches where some `id` (maybe a nested one) is not a JSON string: only those lines (nearly
none) have the type of their `$.id` looked up; json_extract_string would take 123 or true as
the id "123" or "true"."""
FILE_TYPE = rf"(?:^|[/\\.])({TYPE})(?:\.[0-9]+)?\.ndjson(?:\.gz)?$"

# The date a resource is "about" when meta.lastUpdated is absent: first present wins.
CLINICAL_DATES = [
    "$.effectiveDateTime",
    "$.effectivePeriod.start",
    "$.effectiveInstant",
    "$.period.start",
    "$.authoredOn",
    "$.recordedDate",
    "$.occurrenceDateTime",
    "$.occurrencePeriod.start",
    "$.performedDateTime",
    "$.performedPeriod.start",
    "$.onsetDateTime",
    "$.issued",
    "$.billablePeriod.start",
    "$.created",
    "$.started",
    "$.birthDate",
]
FIELDS = ["$.resourceType", "$.id", "$.meta.lastUpdated", "$.meta.versionId"]


def _facts_sql(paths: list[str]) -> str:
    """Pass 1 reads each raw line once; everything after works on the small facts it leaves.
    Only a line starting with whitespace (rare) is scanned for its first non-blank character:
    trim() would copy every line."""
    return f"""
    SELECT bad_utf8,
           CASE WHEN left(raw, 1) IN ('', ' ', chr(9)) THEN NOT regexp_matches(raw, '\\S')
                ELSE false END AS empty,
           CASE WHEN left(raw, 1) IN (' ', chr(9)) THEN regexp_matches(raw, '^\\s*[{{]')
                ELSE left(raw, 1) = '{{' END AS is_object,
           file_type,
           try(json_extract_string(raw, {paths!r})) AS f,
           CASE WHEN f[1] = 'OperationOutcome' THEN coalesce(
                json_extract_string(raw, '$.issue[0].diagnostics'),
                json_extract_string(raw, '$.issue[0].details.text'),
                json_extract_string(raw, '$.issue[0].code'), 'no details') END AS outcome,
           CASE WHEN regexp_matches(raw, '{UNQUOTED_ID}') THEN try(json_type(raw, '$.id'))
                ELSE 'VARCHAR' END AS id_type,
           CASE WHEN regexp_matches(raw, '{UNUSUAL_REFERENCE}')
                THEN list_filter(regexp_extract_all(raw, '{REFERENCE_VALUE}', 1),
                                 r -> NOT regexp_full_match(r, '{REFERENCE}'))
                ELSE [] END AS bad_refs
    FROM records
    """


REASON_SQL = f"""
WITH fields AS (
    SELECT *, f[1] AS resource_type, f[2] AS id, f[3] AS last_updated_text,
           f[4] AS meta_version_id,
           coalesce({", ".join(f"f[{i}]" for i in range(5, 5 + len(CLINICAL_DATES)))}) AS clinical_text
    FROM facts
)
SELECT
    CASE
        WHEN bad_utf8 THEN 'line is not valid UTF-8'
        WHEN empty THEN 'empty line'
        WHEN f IS NULL THEN 'invalid JSON'
        WHEN NOT is_object THEN 'not a JSON object'
        WHEN outcome IS NOT NULL THEN 'the server reported an error (OperationOutcome): ' || outcome
        ELSE nullif(concat_ws('; ',
            CASE WHEN resource_type IS NULL THEN 'missing resourceType'
                 WHEN NOT regexp_full_match(resource_type, '{TYPE}')
                 THEN 'invalid resourceType ' || to_json(resource_type) END,
            CASE WHEN id IS NULL THEN 'missing id'
                 WHEN id_type IS DISTINCT FROM 'VARCHAR'
                 THEN 'id ' || id || ' is a JSON ' || CASE id_type WHEN 'BOOLEAN' THEN 'boolean'
                      WHEN 'OBJECT' THEN 'object' WHEN 'ARRAY' THEN 'array' ELSE 'number' END
                      || ', not a string (FHIR ids are strings: write it in quotes)'
                 WHEN NOT regexp_full_match(id, '{ID}')
                 THEN 'invalid id ' || to_json(id) || ' (FHIR ids are 1-64 of A-Z a-z 0-9 - .)' END,
            CASE WHEN file_type <> '' AND resource_type <> file_type
                 THEN 'resourceType ' || to_json(resource_type)
                      || ' does not match the file, which holds ' || file_type END,
            CASE WHEN last_updated_text IS NOT NULL AND (
                    NOT regexp_full_match(last_updated_text, '{INSTANT}')
                    OR try_cast(last_updated_text AS TIMESTAMPTZ) IS NULL)
                 THEN 'meta.lastUpdated ' || to_json(last_updated_text)
                      || ' is not a FHIR instant' END,
            CASE WHEN len(bad_refs) > 0
                 THEN 'malformed reference ' || to_json(bad_refs[1])
                      || CASE WHEN len(bad_refs) > 1
                              THEN ' (and ' || (len(bad_refs) - 1) || ' more)' ELSE '' END END
        ), '')
    END AS reason,
    resource_type, id, meta_version_id,
    try_cast(last_updated_text AS TIMESTAMPTZ) AS last_updated,
    coalesce(try_cast(last_updated_text AS TIMESTAMPTZ), try_cast(clinical_text AS TIMESTAMPTZ))
        AS window_time
FROM fields
"""


def _hashes(text: pa.ChunkedArray) -> pa.Array:
    """xxh3-64 of each UTF-8 text, read from Arrow's buffers without making Python strings."""
    hashes: list[int] = []
    for chunk in text.chunks:
        offsets = memoryview(chunk.buffers()[1]).cast("i")[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(chunk.buffers()[2])
        hashes.extend(xxh3_64_intdigest(data[a:b]) for a, b in pairwise(offsets))
    return pa.array(hashes, pa.uint64())


@dataclass(frozen=True, kw_only=True)
class Checked:
    """Records split into resources that pass and problems that go to quarantine."""

    resources: pa.Table
    problems: pa.Table


_engines = threading.local()


def _engine() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB for the checks, made once (a new one costs ~10 ms a batch).
    One thread: checking batch N+1 runs beside the store landing batch N on the other core."""
    con: duckdb.DuckDBPyConnection | None = getattr(_engines, "con", None)
    if con is None:
        con = _engines.con = duckdb.connect(config={"threads": 1})
        con.execute("SET TimeZone = 'UTC'")
    return con


def check_resources(records: pa.Table, *, clinical_dates: bool = False) -> Checked:
    """Run the structural checks on raw records (see `connectors.base.RECORD_SCHEMA`).

    `window_time` is meta.lastUpdated; with `clinical_dates` (backfills, which filter on it)
    a resource without one falls back to its main clinical date.
    """
    facts_sql = _facts_sql(FIELDS + (CLINICAL_DATES if clinical_dates else []))
    con = _engine()
    try:
        # The type a file name says, worked out once per file rather than once per line.
        files = pc.unique(records["file"])
        con.register("files", pa.table({"file": files}))
        types = con.sql(f"SELECT regexp_extract(file, '{FILE_TYPE}', 1) AS t FROM files").to_arrow_table()
        file_type = types["t"].take(pc.index_in(records["file"], files))
        con.register("records", records.append_column("file_type", file_type))
        con.execute(f"CREATE TEMP TABLE facts AS {facts_sql}")
        checked = con.sql(REASON_SQL).to_arrow_table()
    finally:
        con.execute("DROP TABLE IF EXISTS facts")
        for name in ("files", "records"):
            con.unregister(name)
    ok = pc.is_null(checked["reason"])
    resources = pa.Table.from_arrays(
        [records["file"], records["line_no"], *checked.columns[1:]],
        names=["file", "line_no", *checked.column_names[1:]],
    )
    resources = resources.append_column("content_hash", _hashes(records["raw"]))
    resources = resources.append_column("resource", records["raw"])
    problems = pa.Table.from_arrays(
        [records["file"], records["line_no"], checked["reason"], records["raw"]],
        names=["file", "line_no", "reason", "raw"],
    )
    if checked["reason"].null_count < len(checked):  # keep the common all-good batch copy-free
        resources, problems = resources.filter(ok), problems.filter(pc.invert(ok))
    else:
        problems = problems.slice(0, 0)
    return Checked(resources=resources, problems=problems)
