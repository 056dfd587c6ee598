"""How fast a compiled ViewDefinition runs, beside hand-written DuckDB SQL over the same data.

100,000 generated resources (10,000 Patients, 90,000 Observations) in an in-memory table; the
view of the SQL-on-FHIR issue (6 columns of Observation) is materialized with CREATE TABLE AS.
Runs interleave, each measured `--repeat` times; medians and the ratio are printed.

    .venv/bin/python bench/view_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import duckdb
import orjson

from harmonize.sql_on_fhir.fhirpath import MACROS_SQL
from harmonize.sql_on_fhir.view_definition import compile_view

VIEW = {
    "resource": "Observation",
    "select": [
        {
            "column": [
                {"name": "id", "path": "id"},
                {"name": "patient_id", "path": "subject.getReferenceKey(Patient)"},
                {"name": "loinc", "path": "code.coding.where(system='http://loinc.org').code.first()"},
                {"name": "value", "path": "value.ofType(Quantity).value"},
                {"name": "unit", "path": "value.ofType(Quantity).unit"},
                {"name": "effective", "path": "effective.ofType(dateTime)"},
            ]
        }
    ],
}
BASELINE = """
SELECT resource ->> '$.id' AS id,
       regexp_extract(resource ->> '$.subject.reference', 'Patient/([^/]+)$', 1) AS patient_id,
       list_filter(CAST(resource -> '$.code.coding' AS JSON[]),
                   lambda c: c ->> '$.system' = 'http://loinc.org')[1] ->> '$.code' AS loinc,
       resource -> '$.valueQuantity.value' AS value,
       resource ->> '$.valueQuantity.unit' AS unit,
       resource ->> '$.effectiveDateTime' AS effective
FROM resources WHERE resource_type = 'Observation'
"""


def resources(patients: int, observations: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    rows = [
        ("Patient", orjson.dumps({"resourceType": "Patient", "id": f"p{i}", "gender": "female"}).decode())
        for i in range(patients)
    ]
    for i in range(observations):
        obs = {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "code": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "1"},
                    {"system": "http://loinc.org", "code": rng.choice(["8867-4", "2339-0"])},
                ]
            },
            "subject": {"reference": f"Patient/p{rng.randrange(patients)}"},
            "effectiveDateTime": f"2020-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00+01:00",
            "valueQuantity": {
                "value": round(rng.uniform(40, 180), 1),
                "unit": "/min",
                "system": "http://unitsofmeasure.org",
                "code": "/min",
            },
        }
        rows.append(("Observation", orjson.dumps(obs).decode()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    con = duckdb.connect()
    con.execute(MACROS_SQL)
    data = resources(10_000, 90_000)
    con.execute("CREATE TABLE raw (resource_type VARCHAR, resource VARCHAR)")
    con.executemany("INSERT INTO raw VALUES (?, ?)", data)
    con.execute(
        "CREATE TABLE resources AS "
        "SELECT resource_type, resource::JSON AS resource, 'bench' AS source FROM raw"
    )
    compiled = compile_view(VIEW).sql
    times: dict[str, list[float]] = {"twinhub": [], "baseline": []}
    counts = {}
    for _ in range(args.repeat):
        for name, sql in (("twinhub", compiled), ("baseline", BASELINE)):
            con.execute("DROP TABLE IF EXISTS out")
            started = time.perf_counter()
            con.execute(f"CREATE TABLE out AS {sql}")
            times[name].append(time.perf_counter() - started)
            counts[name] = con.execute(
                "SELECT count(*), count(patient_id), count(loinc), count(value) FROM out"
            ).fetchone()
    total = len(data)
    for name, runs in times.items():
        median = statistics.median(runs)
        runs_text = ", ".join(f"{t:.3f}" for t in runs)
        print(f"{name:9} median {median:.3f} s = {total / median:,.0f} resources/s", end="")
        print(f"  rows/non-null {counts[name]}  (runs: {runs_text})")
    ratio = statistics.median(times["baseline"]) / statistics.median(times["twinhub"])
    print(f"ratio twinhub/baseline speed: {ratio:.2f}")


if __name__ == "__main__":
    main()
