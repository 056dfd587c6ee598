"""SQL-on-FHIR ViewDefinitions over the store: the standard library shipped in `view_library/`
(materialized as store tables after each batch), a user's own folder beside it, and running any
of them on a connection (a read-only analyst one too: the helpers are temporary). Views are known
by their `name` (a file without one by its stem); a file that holds no view is reported, not
fatal."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
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
    library = {}
    for file in view_catalog():
        if file.view is None:
            raise TwinhubError(f"library view {file.path.name} {file.problem}")
        library[file.name] = file.view

    def shape(view: dict[str, Any]) -> bytes:
        return orjson.dumps([view["resource"], view["select"], view.get("constant")])

    supersets = {shape(view): name for name, view in library.items() if "where" not in view}
    views = []
    for name, view in library.items():
        compiled = compile_view(view, name=name)
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


@dataclass(frozen=True, kw_only=True)
class ViewFile:
    """One file of the library or of the user's folder: the view it holds, named by its `name`
    (else the file's stem), or the one-line reason it holds none."""

    name: str
    path: Path
    view: dict[str, Any] | None = None
    problem: str | None = None


def view_catalog(user_folder: Path | None = None) -> list[ViewFile]:
    """Every file of the library, then of the user's folder, each folder in file order. Two files
    of one folder that hold views of the same name both get a problem naming the other."""
    found = []
    for folder in [LIBRARY, *([user_folder] if user_folder else [])]:
        files = [_read_view_file(path) for path in sorted(folder.glob("*.json"))]
        for file in files:
            others = [
                f.path.name for f in files if f.view is not None and f.name == file.name and f is not file
            ]
            if file.view is not None and others:
                problem = (
                    f"holds the view {file.name!r}, as does {', '.join(others)}; give one another `name`"
                )
                file = replace(file, view=None, problem=problem)
            found.append(file)
    return found


def named_views(user_folder: Path | None = None) -> dict[str, ViewFile]:
    """Every view that can be run, by name: the library's, then the user's (same name: theirs)."""
    return {f.name: f for f in view_catalog(user_folder) if f.view is not None}


def view_files(user_folder: Path | None = None) -> dict[str, Path]:
    """Every view's file, by name (see `named_views`)."""
    return {name: f.path for name, f in named_views(user_folder).items()}


def load_view(name_or_file: str, user_folder: Path | None = None) -> dict[str, Any]:
    """A view by name (see `view_catalog`) or from a JSON file; errors name the fix."""
    named = [f for f in view_catalog(user_folder) if f.name == name_or_file]
    if named:
        file = named[-1]  # the user's, where they have one
    elif Path(name_or_file).is_file():
        file = _read_view_file(Path(name_or_file))
    else:
        known = ", ".join(view_files(user_folder)) or "none"
        raise TwinhubError(f"no view {name_or_file!r}: not a file, nor a view name (known: {known})")
    if file.problem or file.view is None:
        raise TwinhubError(f"view {str(file.path)!r}: {file.problem}")
    return {"name": file.name, **file.view}


def _read_view_file(path: Path) -> ViewFile:
    try:
        view = orjson.loads(path.read_bytes())
    except OSError as e:
        return ViewFile(name=path.stem, path=path, problem=f"cannot be read ({e.strerror or e})")
    except orjson.JSONDecodeError as e:
        return ViewFile(name=path.stem, path=path, problem=f"is not valid JSON ({e}); fix the file")
    if not isinstance(view, dict):
        return ViewFile(name=path.stem, path=path, problem="must hold one ViewDefinition object")
    if not isinstance(view.get("resource"), str) or not isinstance(view.get("select"), list):
        return ViewFile(
            name=path.stem,
            path=path,
            problem="is not a ViewDefinition: it needs a `resource` (e.g. Patient) and a `select` list",
        )
    name = view.get("name")
    return ViewFile(name=name if isinstance(name, str) and name else path.stem, path=path, view=view)


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
    for name, file in named_views(user_folder).items():
        view = file.view or {}
        lines += [f"## `{name}`", "", f"{view.get('title', '')} (from `{view['resource']}`).", ""]
        lines += ["| column | type | description |", "|---|---|---|"]
        for column in compile_view(view, name=name).columns:
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
