"""SQL-on-FHIR v2 ViewDefinitions compiled to one DuckDB query.

Each `select` compiles to an expression of type JSON[]: the rows it yields, one JSON object per
row, for one focus. `forEach` maps over a collection, `unionAll` concatenates, sibling parts
multiply; the query unnests the rows of every resource and reads the columns out, each as its
type. Pure: a view in, SQL text out. The query reads a relation `resources(resource_type,
resource)`, the resource as JSON text (VARCHAR, as the store keeps it, or JSON).
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
    path_type,
    single_path,
)
from harmonize.sql_on_fhir.schema import resource_model, unknown_resource

REPEAT_DEPTH = 8
"""How deep `repeat` follows its paths (FHIR Questionnaire items rarely nest past 4)."""
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ViewError(TwinhubError):
    """A ViewDefinition that cannot be compiled; the message names the element and the fix."""


SQL_TYPES = {
    "boolean": "BOOLEAN",
    "decimal": "DECIMAL(38, 12)",
    **dict.fromkeys(["integer", "positiveInt", "unsignedInt"], "INTEGER"),
    "integer64": "BIGINT",
    "instant": "TIMESTAMPTZ",
    "base64Binary": "BLOB",
}
"""The SQL-on-FHIR default type mappings (https://sql-on-fhir.org/ig/latest, "Default Type
Mappings"), but decimals exact and numeric (DECIMAL, 12 places) rather than text; every other
primitive (code, string, date, dateTime, time: partial dates stay as written) is VARCHAR, and a
complex type (HumanName) or a collection is JSON."""


@dataclass(frozen=True, kw_only=True)
class Column:
    name: str
    type: str | None
    """The column's FHIR type: its `type`, else what the schema and the path say (None: unknown)."""
    collection: bool

    @property
    def sql_type(self) -> str:
        fhir_type = (self.type or "").rsplit("/", 1)[-1]  # a StructureDefinition URL names it too
        if self.collection or fhir_type[:1].isupper():
            return "JSON"
        return SQL_TYPES.get(fhir_type, "VARCHAR")


@dataclass(frozen=True, kw_only=True)
class CompiledView:
    """The view's query: each column of its `sql_type`, read straight from the resources."""

    name: str
    resource: str
    columns: list[Column]
    sql: str
    where: str
    """The view-level `where` as an SQL boolean over `resource` ("true" without one)."""


def _from_text(text: str, column: Column) -> str:
    """A value read as text (a JSON string unquoted, any other JSON as written) as the column's
    type; a value that is not of that type reads as NULL (the raw resource still holds it)."""
    target = column.sql_type
    if target == "VARCHAR":
        return text
    if target == "BLOB":
        return f"try(from_base64({text}))"
    return f"TRY_CAST({text} AS {target})"


def _from_json(value: str, column: Column) -> str:
    """A JSON `value` as the column's type (JSON null as NULL, but for a collection's `[]`)."""
    if column.sql_type != "JSON":
        return _from_text(f"json_extract_string({value}, '$')", column)
    return value if column.collection else f"nullif({value}, 'null'::JSON)"


def _row_value(column: Column) -> str:
    return f"json_extract(row, {_quote('$.' + column.name)})"


def compile_view(view: dict[str, Any], *, name: str | None = None) -> CompiledView:
    """The query for `view` (known as `name`, else by its own `name`); raises ViewError naming
    the view and what is wrong."""
    name = name or view.get("name") or str(view.get("resource", "view")).lower()
    try:
        return _compile(view, name)
    except ViewError as e:
        raise ViewError(f"view {name!r}: {e}") from None


def _compile(view: dict[str, Any], name: str) -> CompiledView:
    resource = view.get("resource")
    if not isinstance(resource, str) or not resource:
        raise ViewError("the view has no `resource`; name the FHIR resource type it reads, e.g. Patient")
    if problem := unknown_resource(resource):
        raise ViewError(f"resource {problem}")
    if not view.get("select"):
        raise ViewError("the view has no `select`; give it at least one column")
    _check_shape(view, "view")
    constants = {c["name"]: _constant(c) for c in view.get("constant", [])}
    scope = Scope(
        focus="[resource::JSON]",
        resource_type=resource,
        constants={key: sql for key, (sql, _) in constants.items()},
        constant_types={key: fhir_type for key, (_, fhir_type) in constants.items()},
        single="resource",
        model=resource_model(resource),
    )
    try:
        columns = _columns(view, scope)
        where = [_where(w["path"], scope) for w in view.get("where", [])]
        filters = " AND ".join([f"resource_type = {_quote(resource)}", *where])
        if parts := _flat_parts(view):  # columns straight from the resource, or one forEach's items
            sql = _projection(columns, parts, scope, filters)
        else:
            rows = _rows(view, scope)
            reads = ", ".join(f"{_from_json(_row_value(c), c)} AS {_ident(c.name)}" for c in columns)
            sql = f"SELECT {reads} FROM (SELECT unnest({rows}) AS row FROM resources WHERE {filters})"
    except FhirPathError as e:
        raise ViewError(str(e)) from None
    return CompiledView(
        name=name, resource=resource, columns=columns, sql=sql, where=" AND ".join(where) or "true"
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


def _constant(constant: dict[str, Any]) -> tuple[str, str]:
    """The constant as a JSON SQL literal, and its FHIR type (valueCode: code)."""
    values = [(k, v) for k, v in constant.items() if k.startswith("value")]
    if len(values) != 1:
        raise ViewError(f"constant {constant.get('name')!r} needs exactly one value[x]")
    key, value = values[0]
    return f"{_quote(json.dumps(value))}::JSON", key[5:6].lower() + key[6:]


def _columns(select: dict[str, Any], scope: Scope) -> list[Column]:
    """The view's columns in order: a select's own, then its nested selects', then its unionAll's
    (whose branches must agree), each typed as the scope it reads says."""
    scope = _item_scope(select, scope)
    out = []
    for column in select.get("column", []):
        name = column.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ViewError(
                f"column name {name!r} must start with a letter and hold only letters, digits and _"
            )
        try:
            inferred = path_type(column["path"], scope)
        except FhirPathError as e:
            raise FhirPathError(f"column {name}: {e}") from None
        declared = column.get("type")
        out.append(
            Column(
                name=name,
                type=declared if isinstance(declared, str) and declared else inferred,
                collection=bool(column.get("collection")),
            )
        )
    for nested in select.get("select", []):
        out += _columns(nested, scope)
    if branches := select.get("unionAll"):
        typed = [_columns(branch, scope) for branch in branches]
        first = [c.name for c in typed[0]]
        if any([c.name for c in branch] != first for branch in typed[1:]):
            raise ViewError(f"unionAll branches must have the same columns in the same order; {first} differ")
        for i, column in enumerate(typed[0]):  # a branch's `true` says what the others' paths do not
            known = next((branch[i].type for branch in typed if branch[i].type), None)
            out.append(Column(name=column.name, type=known, collection=column.collection))
    names = [c.name for c in out]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ViewError(f"column names must be unique; {', '.join(dupes)} appear twice")
    return out


def _item_scope(select: dict[str, Any], scope: Scope) -> Scope:
    """The scope a select's columns read: the items of its forEach (of unknown model under a
    repeat, whose items may be of several levels)."""
    for key in ("forEach", "forEachOrNull"):
        if key in select:
            return scope.with_focus(scope.focus, model=element_model(select[key], scope))
    return scope.with_focus(scope.focus) if "repeat" in select else scope


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
    items = (  # repeat's paths read nodes of every level: no one model checks them
        _repeat(select["repeat"], scope.with_focus(scope.focus, single=scope.single), REPEAT_DEPTH)
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
) -> str:
    """One row per resource, or per item of its one `forEach` (`parts` pairs each group of
    columns with the forEach path it reads from, None for the resource). Columns that are single
    values at a path are read with one multi-path extraction per resource or item (one parse for
    all of them), as text cast straight to the column's type."""
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
            read = None if column.collection else single_path(spec["path"], focus)
            if read:
                shared[root].append(read[0])
                value = f"_{root}[{len(shared[root])}]"
                value = _from_text(read[1].sql(value) if read[1] else value, column)
            else:
                value = _from_json(_value(spec, focus), column)
            values.append(f"{value} AS {_ident(column.name)}")
    extract = {
        root: f", json_extract_string({root}, [{', '.join(map(_quote, paths))}]) AS _{root}" if paths else ""
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
