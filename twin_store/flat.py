"""Flat analyst tables: one SQL projection per table over the raw resources of one type.

Each `flat/<table>.sql` is a SELECT over a relation named `resources` (id, resource JSON) that
holds only resources of the table's type. The SQL-on-FHIR work replaces these files with
compiled ViewDefinitions; the store only needs the name, type, key and SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources as package_files

import duckdb
import pyarrow as pa


@dataclass(frozen=True, kw_only=True)
class FlatTable:
    name: str
    resource_type: str
    key: str
    sql: str


def _sql(name: str) -> str:
    return package_files.files(__package__).joinpath("flat", f"{name}.sql").read_text()


MACROS_SQL = _sql("_macros")

FLAT_TABLES = tuple(
    FlatTable(name=name, resource_type=resource_type, key=f"{name}_id", sql=_sql(name))
    for name, resource_type in [
        ("patient", "Patient"),
        ("encounter", "Encounter"),
        ("condition", "Condition"),
        ("observation", "Observation"),
        ("medication_request", "MedicationRequest"),
        ("procedure", "Procedure"),
        ("immunization", "Immunization"),
    ]
)


def derive_flat_rows(resources: pa.Table) -> dict[str, pa.Table]:
    """The flat rows of every resource in `resources` (checked rows with `resource_type`, `id`
    and `resource`), per flat table. Pure: an in-memory DuckDB on one thread, so it can run
    beside the store's writer."""
    types = set(resources["resource_type"].unique().to_pylist())
    rows = {}
    with duckdb.connect(config={"threads": 1}) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(MACROS_SQL)
        con.register("batch", resources)
        for table in FLAT_TABLES:
            if table.resource_type in types:
                con.execute(
                    "CREATE OR REPLACE TEMP VIEW resources AS SELECT id, resource FROM batch "
                    f"WHERE resource_type = '{table.resource_type}'"
                )
                rows[table.name] = con.sql(table.sql).to_arrow_table()
    return rows
