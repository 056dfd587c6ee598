"""SQL-on-FHIR v2 ViewDefinitions compiled to one DuckDB query.

Each `select` compiles to an expression of type JSON[]: the rows it yields, one JSON object per
row, for one focus. `forEach` maps over a collection, `unionAll` concatenates, sibling parts
multiply; the query unnests the rows of every resource and reads the columns out. Pure: a view
in, SQL text out. The query reads a relation `resources(resource_type, resource)`, the resource
as JSON text (VARCHAR, as the store keeps it, or JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from connectors.errors import TwinhubError
from harmonize.sql_on_fhir.fhirpath import (
    FhirPathError,
    Scope,
    compile_boolean,
    compile_path,
    compile_single,
    element_model,
    resource_model,
    single_path,
)

REPEAT_DEPTH = 8
"""How deep `repeat` follows its paths (FHIR Questionnaire items rarely nest past 4)."""
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ViewError(TwinhubError):
    """A ViewDefinition that cannot be compiled; the message names the element and the fix."""


@dataclass(frozen=True, kw_only=True)
class Column:
    name: str
    type: str | None
    collection: bool


SQL_TYPES = {
    "boolean": "BOOLEAN",
    "decimal": "DOUBLE",
    **dict.fromkeys(["integer", "positiveInt", "unsignedInt", "integer64"], "BIGINT"),
}


@dataclass(frozen=True, kw_only=True)
class CompiledView:
    """`sql` yields every column as JSON (exact, for comparing); `typed_sql` casts each to the
    column's `type` (strings as VARCHAR, collections stay JSON arrays) for analysts and files."""

    name: str
    resource: str
    columns: list[Column]
    sql: str
    typed_sql: str
    where: str
    """The view-level `where` as an SQL boolean over `resource` ("true" without one)."""


def _typed(value: str, column: Column) -> str:
    """A JSON `value` as the column's SQL type."""
    if column.collection:
        return value
    if column.type in SQL_TYPES:
        return f"{value}::{SQL_TYPES[column.type]}"
    return f"json_extract_string({value}, '$')"


def _typed_text(text: str, column: Column) -> str:
    """A value read as text (a JSON string unquoted, any other JSON as written) as the column's type."""
    return f"{text}::{SQL_TYPES[column.type]}" if column.type in SQL_TYPES else text


def compile_view(view: dict[str, Any]) -> CompiledView:
    """The query for `view`; raises ViewError naming what is wrong."""
    resource = view.get("resource")
    if not isinstance(resource, str) or not resource:
        raise ViewError("the view has no `resource`; name the FHIR resource type it reads, e.g. Patient")
    if not view.get("select"):
        raise ViewError("the view has no `select`; give it at least one column")
    _check_shape(view, "view")
    constants = {c["name"]: _constant(c) for c in view.get("constant", [])}
    model = resource_model(resource)
    scope = Scope(
        focus="[resource::JSON]", resource_type=resource, constants=constants, single="resource", model=model
    )
    try:
        columns = _columns(view)
        where = [_where(w["path"], scope) for w in view.get("where", [])]
        filters = " AND ".join([f"resource_type = {_quote(resource)}", *where])
        if parts := _flat_parts(view):  # columns straight from the resource, or one forEach's items
            sql = _projection(columns, parts, scope, filters, typed=False)
            typed_sql = _projection(columns, parts, scope, filters, typed=True)
        else:
            rows = _rows(view, scope)
            reads = ", ".join(
                f"json_extract(row, {_quote('$.' + c.name)}) AS {_ident(c.name)}" for c in columns
            )
            sql = f"SELECT {reads} FROM (SELECT unnest({rows}) AS row FROM resources WHERE {filters})"
            typed = ", ".join(f"{_typed(_ident(c.name), c)} AS {_ident(c.name)}" for c in columns)
            typed_sql = f"SELECT {typed} FROM ({sql})"
    except FhirPathError as e:
        raise ViewError(str(e)) from None
    name = view.get("name", resource.lower())
    return CompiledView(
        name=name,
        resource=resource,
        columns=columns,
        sql=sql,
        typed_sql=typed_sql,
        where=" AND ".join(where) or "true",
    )


def _check_shape(select: dict[str, Any], at: str) -> None:
    """Types the compiler relies on, each failure naming the element, e.g. select[0].forEach."""
    for key in ("forEach", "forEachOrNull"):
        if key in select and not isinstance(select[key], str):
            raise ViewError(f"{at}.{key} must be a FHIRPath string, not {select[key]!r}")
    if "repeat" in select and not (
        isinstance(select["repeat"], list)
        and select["repeat"]
        and all(isinstance(p, str) for p in select["repeat"])
    ):
        raise ViewError(f"{at}.repeat must be a list of FHIRPath strings")
    for i, column in enumerate(select.get("column", [])):
        if not isinstance(column, dict) or not isinstance(column.get("path"), str):
            raise ViewError(f"{at}.column[{i}] needs a `path` (a FHIRPath string) and a `name`")
    for i, where in enumerate(select.get("where", []) if at == "view" else []):
        if not isinstance(where, dict) or not isinstance(where.get("path"), str):
            raise ViewError(f"view.where[{i}] needs a `path` (a FHIRPath string)")
    for key in ("select", "unionAll"):
        for i, nested in enumerate(select.get(key, [])):
            if not isinstance(nested, dict):
                raise ViewError(f"{at}.{key}[{i}] must be an object")
            _check_shape(nested, f"{at}.{key}[{i}]")


def _where(path: str, scope: Scope) -> str:
    if boolean := compile_boolean(path, scope):
        return f"coalesce({boolean}, false)"
    message = f"where path {path!r} gave something other than true or false"
    return f"fp_where({compile_path(path, scope)}, {_quote(message)})"


def _constant(constant: dict[str, Any]) -> str:
    values = [(k, v) for k, v in constant.items() if k.startswith("value")]
    if len(values) != 1:
        raise ViewError(f"constant {constant.get('name')!r} needs exactly one value[x]")
    return f"{_quote(json.dumps(values[0][1]))}::JSON"


def _columns(select: dict[str, Any]) -> list[Column]:
    """The view's columns in order: a select's own, then its nested selects', then its unionAll's
    (whose branches must agree)."""
    out = []
    for column in select.get("column", []):
        name = column.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ViewError(
                f"column name {name!r} must start with a letter and hold only letters, digits and _"
            )
        out.append(Column(name=name, type=column.get("type"), collection=bool(column.get("collection"))))
    for nested in select.get("select", []):
        out += _columns(nested)
    if branches := select.get("unionAll"):
        first = [c.name for c in _columns(branches[0])]
        for branch in branches[1:]:
            if [c.name for c in _columns(branch)] != first:
                raise ViewError(
                    f"unionAll branches must have the same columns in the same order; {first} differ"
                )
        out += _columns(branches[0])
    names = [c.name for c in out]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ViewError(f"column names must be unique; {', '.join(dupes)} appear twice")
    return out


def _rows(select: dict[str, Any], scope: Scope) -> str:
    """The rows of one select for the focus in `scope`, as JSON[] of row objects."""
    iterators = [k for k in ("forEach", "forEachOrNull", "repeat") if k in select]
    if len(iterators) > 1:
        raise ViewError(
            f"a select may have only one of forEach, forEachOrNull and repeat; it has {iterators}"
        )
    if not iterators:
        return _product(select, scope)
    kind = iterators[0]
    items = (
        _repeat(select["repeat"], scope, REPEAT_DEPTH)
        if kind == "repeat"
        else compile_path(select[kind], scope)
    )
    v, i = scope.variable(), scope.variable()
    model = None if kind == "repeat" else element_model(select[kind], scope)
    each = _product(select, scope.with_focus(f"[{v}]", row_index=f"({i} - 1)", single=v, model=model))
    rows = f"flatten(list_transform({items}, lambda {v}, {i}: {each}))"
    if kind == "forEachOrNull":  # no items: the select's rows for an empty focus, or one empty row
        empty = _product(select, scope.with_focus("[]::JSON[]", row_index="0"))
        return (
            f"CASE WHEN len({items}) > 0 THEN {rows} WHEN len({empty}) > 0 THEN {empty} "
            "ELSE ['{}'::JSON] END"
        )
    return rows


def _product(select: dict[str, Any], scope: Scope) -> str:
    """A select's parts for one focus: its columns (one row), each nested select, its unionAll;
    every combination of their rows is a row."""
    parts = []
    if columns := select.get("column"):
        pairs = ", ".join(f"{_quote(c['name'])}, {_value(c, scope)}" for c in columns)
        parts.append(f"[json_object({pairs})]")
    parts += [_rows(nested, scope) for nested in select.get("select", [])]
    if branches := select.get("unionAll"):
        parts.append(
            f"list_concat({', '.join(_rows(b, scope) for b in branches)})"
            if len(branches) > 1
            else _rows(branches[0], scope)
        )
    if not parts:
        return "['{}'::JSON]"
    product = parts[0]
    for part in parts[1:]:
        a, b = scope.variable(), scope.variable()
        pairs = f"list_transform({part}, lambda {b}: json_merge_patch({a}, {b}))"
        product = f"flatten(list_transform({product}, lambda {a}: {pairs}))"
    return product


def _projection(
    columns: list[Column],
    parts: list[tuple[str | None, list[dict[str, Any]]]],
    scope: Scope,
    filters: str,
    *,
    typed: bool,
) -> str:
    """One row per resource, or per item of its one `forEach` (`parts` pairs each group of
    columns with the forEach path it reads from, None for the resource). Columns that are single
    values at a path are read with one multi-path extraction per resource or item (one parse for
    all of them): as JSON, or when `typed` as text cast straight to the column's type."""
    values, unnest = [], ""
    shared: dict[str, list[str]] = {"resource": [], "_item": []}
    column_iter = iter(columns)
    for each, specs in parts:
        root, focus = "resource", scope
        if each is not None:
            root = "_item"
            focus = scope.with_focus("[_item]", single="_item", model=element_model(each, scope))
            unnest = f", unnest({compile_path(each, scope)}) AS _item"
        for spec in specs:
            column = next(column_iter)
            read = None if spec.get("collection") else single_path(spec["path"], focus)
            if read:
                shared[root].append(read[0])
                value = f"_{root}[{len(shared[root])}]"
                if call := read[1]:
                    value = call.sql(value if typed else f"({value} ->> '$')")
                    value = value if typed else f"to_json({value})"
                value = _typed_text(value, column) if typed else value
            else:
                value = _value(spec, focus)
                value = _typed(value, column) if typed else value
            values.append(f"{value} AS {_ident(column.name)}")
    extract_fn = "json_extract_string" if typed else "json_extract"
    extract = {
        root: f", {extract_fn}({root}, [{', '.join(map(_quote, paths))}]) AS _{root}" if paths else ""
        for root, paths in shared.items()
    }
    inner = f"SELECT resource{extract['resource']}{unnest} FROM resources WHERE {filters}"
    if extract["_item"]:
        inner = f"SELECT *{extract['_item']} FROM ({inner})"
    return f"SELECT {', '.join(values)} FROM ({inner})"


def _flat_parts(view: dict[str, Any]) -> list[tuple[str | None, list[dict[str, Any]]]] | None:
    """The view as groups of plain columns, each read from the resource or from the items of one
    `forEach`, when it has that shape (no forEachOrNull, repeat, unionAll or %rowIndex, at most
    one forEach, nothing nested below it); else None."""
    if "%rowIndex" in json.dumps(view):
        return None
    parts: list[tuple[str | None, list[dict[str, Any]]]] = []

    def collect(select: dict[str, Any], each: str | None) -> bool:
        if any(k in select for k in ("forEachOrNull", "repeat", "unionAll")):
            return False
        if "forEach" in select:
            if each is not None or select.get("select") or any(p[0] for p in parts):
                return False
            each = select["forEach"]
        parts.append((each, list(select.get("column", []))))
        return all(collect(nested, each) for nested in select.get("select", []))

    return parts if collect(view, None) else None


def _value(column: dict[str, Any], scope: Scope) -> str:
    if not column.get("collection") and (single := compile_single(column["path"], scope)):
        return single
    values = compile_path(column["path"], scope)
    if column.get("collection"):
        return f"to_json({values})"
    message = f"column {column['name']}: several values; set collection = true or pick one, e.g. first()"
    return f"fp_single({values}, {_quote(message)})"


def _repeat(paths: list[str], scope: Scope, depth: int) -> str:
    """Every node reachable through `paths`, depth first: each child, then its descendants."""
    if depth == 0:
        return "[]::JSON[]"
    v = scope.variable()
    children = [compile_path(p, scope) for p in paths]
    below = _repeat(paths, scope.with_focus(f"[{v}]"), depth - 1)
    level = children[0] if len(children) == 1 else f"list_concat({', '.join(children)})"
    return f"flatten(list_transform({level}, lambda {v}: list_concat([{v}], {below})))"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
