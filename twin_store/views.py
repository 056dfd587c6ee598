"""SQL-on-FHIR ViewDefinitions run over the store's resources, on any connection (a read-only
analyst one too: the helpers are temporary)."""

from __future__ import annotations

from typing import Any

import duckdb

from harmonize.fhirpath import MACROS_SQL
from harmonize.view_definition import CompiledView, compile_view

RESOURCES_SQL = (
    "CREATE OR REPLACE TEMP VIEW resources AS "
    "SELECT resource_type, resource::JSON AS resource FROM twin.fhir_resource"
)


def view_relation(con: duckdb.DuckDBPyConnection, view: dict[str, Any]) -> duckdb.DuckDBPyRelation:
    """The view's rows, typed, as a lazy relation (write it to a file, a frame or a table)."""
    compiled: CompiledView = compile_view(view)
    con.execute(MACROS_SQL)
    con.execute(RESOURCES_SQL)
    return con.sql(compiled.typed_sql)
