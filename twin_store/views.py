"""SQL-on-FHIR ViewDefinitions over the store: the standard library shipped in `view_library/`
(materialized as store tables after each batch), a user's own folder beside it, and running any
of them on a connection (a read-only analyst one too: the helpers are temporary)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson

from connectors.errors import TwinhubError
from harmonize.sql_on_fhir.fhirpath import MACROS_SQL
from harmonize.sql_on_fhir.view_definition import compile_view

LIBRARY = Path(__file__).with_name("view_library")


@dataclass(frozen=True, kw_only=True)
class MaterializedView:
    """A library view kept as the store table of the same name, one row per resource, keyed by
    its first column `id` (the resource id): the store rewrites only the rows of resources that
    changed."""

    name: str
    resource_type: str
    sql: str
    """The typed query over a relation `resources(resource_type, resource)`."""
    comment: str
    """The table's comment: the view's title and a hash of its query, so a changed definition
    is noticed (and the table rebuilt from the raw resources)."""
    column_comments: dict[str, str]
    subset_of: str | None = None
    """A view with the same columns and no `where` (lab_result: observation): this one's rows
    are those of the resources that pass `where`, so they need not be computed twice."""
    where: str = "true"


@functools.cache
def standard_views() -> tuple[MaterializedView, ...]:
    """The library views, those that others are a subset of first."""
    library = {name: load_view(str(path)) for name, path in view_files().items()}

    def shape(view: dict[str, Any]) -> bytes:
        return orjson.dumps([view["resource"], view["select"], view.get("constant")])

    supersets = {shape(view): name for name, view in library.items() if "where" not in view}
    views = []
    for name, view in library.items():
        compiled = compile_view(view)
        if (compiled.columns[0].name, view["select"][0]["column"][0]["path"]) != ("id", "getResourceKey()"):
            raise TwinhubError(f"library view {name}.json must start with `id`: getResourceKey() (its key)")
        digest = hashlib.sha256(compiled.sql.encode()).hexdigest()[:16]
        views.append(
            MaterializedView(
                name=name,
                resource_type=compiled.resource,
                sql=compiled.sql,
                comment=f"{view.get('title', name)} (view definition {digest})",
                column_comments={
                    c.name: str(_column_spec(view, c.name).get("description", "")) for c in compiled.columns
                },
                subset_of=supersets.get(shape(view)) if "where" in view else None,
                where=compiled.where,
            )
        )
    return tuple(sorted(views, key=lambda v: v.subset_of is not None))


def view_files(user_folder: Path | None = None) -> dict[str, Path]:
    """Every named view: the standard library, then the user's folder (same name: theirs)."""
    folders = [LIBRARY, *([user_folder] if user_folder else [])]
    return {path.stem: path for folder in folders for path in sorted(folder.glob("*.json"))}


def load_view(name_or_file: str, user_folder: Path | None = None) -> dict[str, Any]:
    """A view by name (see `view_files`) or from a JSON file; errors name the fix."""
    path = view_files(user_folder).get(name_or_file) or Path(name_or_file)
    try:
        view = orjson.loads(path.read_bytes())
    except OSError:
        known = ", ".join(view_files(user_folder)) or "none"
        raise TwinhubError(
            f"no view {name_or_file!r}: not a file, nor a view name (known: {known})"
        ) from None
    except orjson.JSONDecodeError as e:
        raise TwinhubError(f"view {str(path)!r} is not valid JSON ({e}); fix the file") from None
    if not isinstance(view, dict):
        raise TwinhubError(f"view {str(path)!r} must hold one ViewDefinition object")
    return view


STORE_RESOURCES = "SELECT resource_type, resource FROM twin.fhir_resource"


def view_sql(view: dict[str, Any]) -> str:
    """The view's query over the store, as `twinhub sql` runs it: it names the store's tables
    and the macros every store connection has (`connect`), nothing else."""
    return f"WITH resources AS ({STORE_RESOURCES})\n{compile_view(view).sql}"


def view_relation(con: duckdb.DuckDBPyConnection, view: dict[str, Any]) -> duckdb.DuckDBPyRelation:
    """The view's rows, typed, as a lazy relation (write it to a file, a frame or a table): the
    query `view_sql` prints, on any connection with the store attached as `twin`."""
    con.execute(MACROS_SQL)
    return con.sql(view_sql(view))


def views_read(con: duckdb.DuckDBPyConnection, relation: str) -> None:
    """Point the compiled views at `relation` (a query of `resource_type, resource`): they read
    the temporary view `resources`, which this replaces."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW resources AS {relation}")


def schema_doc(user_folder: Path | None = None) -> str:
    """Markdown: every view, then one line per column (name, type, description)."""
    lines = ["# Views", "", "Generated by `twinhub views doc`; one section per ViewDefinition.", ""]
    for name, path in view_files(user_folder).items():
        view = load_view(str(path))
        lines += [f"## `{name}`", "", f"{view.get('title', '')} (from `{view['resource']}`).", ""]
        lines += ["| column | type | description |", "|---|---|---|"]
        for column in compile_view(view).columns:
            spec = _column_spec(view, column.name)
            kind = (column.type or "") + (" (list)" if column.collection else "")
            description = str(spec.get("description", "")).replace("|", "\\|")
            lines.append(f"| `{column.name}` | {kind} | {description} |")
        lines.append("")
    return "\n".join(lines)


def _column_spec(select: dict[str, Any], name: str) -> dict[str, Any]:
    for column in select.get("column", []):
        if column.get("name") == name:
            return dict(column)
    for nested in [*select.get("select", []), *select.get("unionAll", [])]:
        if found := _column_spec(nested, name):
            return found
    return {}
