"""The FHIRPath subset SQL-on-FHIR v2 needs, parsed and compiled to DuckDB SQL.

Every expression compiles to a DuckDB `JSON[]`: a FHIRPath collection of JSON values, so empty
collections, repeats and nulls behave as FHIRPath says. The macros in `MACROS_SQL` are the
small vocabulary the generated SQL uses. Pure: text in, SQL text out.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any

from connectors.errors import TwinhubError
from harmonize.sql_on_fhir.schema import (
    choice_element,
    choice_types,
    complex_model,
    element,
    type_name,
    unknown_element,
    unknown_type,
)

MACROS_SQL = """
CREATE OR REPLACE TEMP MACRO fp_items(j) AS
    CASE WHEN j IS NULL OR json_type(j) = 'NULL' THEN []::JSON[]
         WHEN json_type(j) = 'ARRAY' THEN CAST(j AS JSON[]) ELSE [j] END;
CREATE OR REPLACE TEMP MACRO fp_child(c, k) AS
    flatten(list_transform(c, lambda x: fp_items(json_extract(x, k))));
CREATE OR REPLACE TEMP MACRO fp_bool(c) AS
    CASE WHEN len(c) = 0 THEN NULL::BOOLEAN
         WHEN len(c) > 1 THEN error('a boolean was expected, several values were found')
         WHEN json_type(c[1]) = 'BOOLEAN' THEN c[1]::BOOLEAN
         ELSE true END;
CREATE OR REPLACE TEMP MACRO fp_of_single(s) AS CASE WHEN s IS NULL THEN []::JSON[] ELSE [s] END;
CREATE OR REPLACE TEMP MACRO fp_of_bool(b) AS CASE WHEN b IS NULL THEN []::JSON[] ELSE [to_json(b)] END;
CREATE OR REPLACE TEMP MACRO fp_is_number(x) AS json_type(x) IN ('BIGINT', 'UBIGINT', 'DOUBLE');
CREATE OR REPLACE TEMP MACRO fp_eq(x, y) AS
    CASE WHEN fp_is_number(x) AND fp_is_number(y) THEN x::DOUBLE = y::DOUBLE
         ELSE json_extract_string(x, '$') = json_extract_string(y, '$') END;
CREATE OR REPLACE TEMP MACRO fp_cmp(x, y) AS
    CASE WHEN fp_is_number(x) AND fp_is_number(y) THEN sign(x::DOUBLE - y::DOUBLE)
         WHEN json_extract_string(x, '$') < json_extract_string(y, '$') THEN -1
         WHEN json_extract_string(x, '$') > json_extract_string(y, '$') THEN 1 ELSE 0 END;
CREATE OR REPLACE TEMP MACRO fp_equal(a, b) AS
    CASE WHEN len(a) = 0 OR len(b) = 0 THEN NULL::BOOLEAN
         WHEN len(a) <> len(b) THEN false
         ELSE list_bool_and(list_transform(range(len(a)), lambda i: fp_eq(a[i + 1], b[i + 1]))) END;
CREATE OR REPLACE TEMP MACRO fp_one(c) AS
    CASE WHEN len(c) > 1 THEN error('a single value was expected, several were found') ELSE c[1] END;
CREATE OR REPLACE TEMP MACRO fp_single(c, message) AS CASE WHEN len(c) > 1 THEN error(message) ELSE c[1] END;
CREATE OR REPLACE TEMP MACRO fp_compare(a, b) AS
    CASE WHEN len(a) = 0 OR len(b) = 0 THEN NULL ELSE fp_cmp(fp_one(a), fp_one(b)) END;
CREATE OR REPLACE TEMP MACRO fp_int(x) AS json_type(x) IN ('BIGINT', 'UBIGINT');
CREATE OR REPLACE TEMP MACRO fp_arith(a, b, op) AS
    CASE WHEN len(a) = 0 OR len(b) = 0 THEN []::JSON[]
         WHEN op = '/' THEN [to_json(fp_one(a)::DOUBLE / fp_one(b)::DOUBLE)]
         WHEN fp_int(fp_one(a)) AND fp_int(fp_one(b)) THEN [to_json(CASE op
             WHEN '+' THEN fp_one(a)::BIGINT + fp_one(b)::BIGINT
             WHEN '-' THEN fp_one(a)::BIGINT - fp_one(b)::BIGINT
             ELSE fp_one(a)::BIGINT * fp_one(b)::BIGINT END)]
         ELSE [to_json(CASE op
             WHEN '+' THEN fp_one(a)::DOUBLE + fp_one(b)::DOUBLE
             WHEN '-' THEN fp_one(a)::DOUBLE - fp_one(b)::DOUBLE
             ELSE fp_one(a)::DOUBLE * fp_one(b)::DOUBLE END)] END;
CREATE OR REPLACE TEMP MACRO fp_join(c, sep) AS
    CASE WHEN len(c) = 0 THEN []::JSON[]
         ELSE [to_json(list_reduce(list_transform(c, lambda x: json_extract_string(x, '$')),
                                   lambda x, y: x || sep || y))] END;
CREATE OR REPLACE TEMP MACRO fp_where(c, message) AS
    CASE WHEN len(c) = 0 THEN false
         WHEN len(c) > 1 OR json_type(c[1]) <> 'BOOLEAN' THEN error(message)
         ELSE c[1]::BOOLEAN END;
CREATE OR REPLACE TEMP MACRO fp_low_date(s) AS
    CASE length(s) WHEN 4 THEN s || '-01-01' WHEN 7 THEN s || '-01' ELSE s END;
CREATE OR REPLACE TEMP MACRO fp_high_date(s) AS
    CASE length(s) WHEN 4 THEN s || '-12-31'
         WHEN 7 THEN strftime(last_day((s || '-01')::DATE), '%Y-%m-%d') ELSE s END;
CREATE OR REPLACE TEMP MACRO fp_low_time(t) AS t || substr('00:00:00.000', length(t) + 1);
CREATE OR REPLACE TEMP MACRO fp_high_time(t) AS t || substr('23:59:59.999', length(t) + 1);
CREATE OR REPLACE TEMP MACRO fp_zone(s) AS regexp_extract(s, '(Z|[+-][0-9]{2}:[0-9]{2})$');
CREATE OR REPLACE TEMP MACRO fp_clock(s) AS
    regexp_replace(split_part(s, 'T', 2), '(Z|[+-][0-9]{2}:[0-9]{2})$', '');
CREATE OR REPLACE TEMP MACRO fp_low_datetime(s) AS
    fp_low_date(split_part(s, 'T', 1)) || 'T' || fp_low_time(fp_clock(s))
    || CASE WHEN fp_zone(s) = '' THEN '+14:00' ELSE fp_zone(s) END;
CREATE OR REPLACE TEMP MACRO fp_high_datetime(s) AS
    fp_high_date(split_part(s, 'T', 1)) || 'T' || fp_high_time(fp_clock(s))
    || CASE WHEN fp_zone(s) = '' THEN '-12:00' ELSE fp_zone(s) END;
CREATE OR REPLACE TEMP MACRO fp_places(x) AS
    CASE WHEN contains(x::VARCHAR, '.') THEN length(split_part(x::VARCHAR, '.', 2)) ELSE 0 END;
CREATE OR REPLACE TEMP MACRO fp_boundary(x, kind, low) AS
    CASE WHEN fp_is_number(x) THEN to_json(x::VARCHAR::DECIMAL(38, 12)
              + (CASE WHEN low THEN -0.5 ELSE 0.5 END) * pow(10, -fp_places(x))::DECIMAL(38, 12))
         WHEN json_type(x) <> 'VARCHAR' THEN NULL
         WHEN kind = 'time' OR regexp_matches(x ->> '$', '^[0-9]{2}:') THEN
              to_json(CASE WHEN low THEN fp_low_time(x ->> '$') ELSE fp_high_time(x ->> '$') END)
         WHEN kind = 'date' THEN
              to_json(CASE WHEN low THEN fp_low_date(x ->> '$') ELSE fp_high_date(x ->> '$') END)
         ELSE to_json(CASE WHEN low THEN fp_low_datetime(x ->> '$') ELSE fp_high_datetime(x ->> '$') END) END;
CREATE OR REPLACE TEMP MACRO fp_key(id, source) AS coalesce(source || '/' || id, id);
CREATE OR REPLACE TEMP MACRO fp_ref_id(reference, t) AS
    nullif(regexp_extract(reference, '(^|/)' || t || '/([^/]+)(/_history/[^/]+)?$', 2), '');
CREATE OR REPLACE TEMP MACRO fp_ref_key(reference, t, source) AS coalesce(
    CASE WHEN source IS NULL THEN NULL
         WHEN starts_with(reference, 'https://twinhub.invalid/sources/')
              AND split_part(reference, '/', 5) <> '' AND split_part(reference, '/', 6) = t
         THEN split_part(reference, '/', 5) ELSE source END || '/', '') || fp_ref_id(reference, t);
"""
SOURCE = "source"
"""The column of the `resources` relation that names each resource's source (NULL where none
is known): keys are `<source>/<id>` (getResourceKey, getReferenceKey), so two sources' ids never
meet. A reference on the base `SOURCE_BASE` (`https://twinhub.invalid/sources/S/Type/id`) names
source S's resource; any other reference, relative or absolute, names one of the resource's own
source. Without a source the key is the plain id, as the SQL-on-FHIR specification has it."""
SOURCE_BASE = "https://twinhub.invalid/sources/"
"""The base of references that name another source's resource (a valid absolute FHIR reference
on a host that never exists, RFC 2606): the linker's subjects, a wearable's or a model's Patient."""

FUNCTIONS = {
    "where",
    "exists",
    "empty",
    "first",
    "last",
    "not",
    "count",
    "join",
    "extension",
    "ofType",
    "getResourceKey",
    "getReferenceKey",
    "lowBoundary",
    "highBoundary",
    "toString",
    "single",
}


_FUNCTION_TYPES = {
    **dict.fromkeys(["exists", "empty", "not"], "boolean"),
    **dict.fromkeys(["join", "toString", "getResourceKey", "getReferenceKey"], "string"),
    "count": "integer",
}
"""The FHIR type of what a function yields, where that does not depend on its input."""
_BOOLEAN_OPERATORS = {
    "=",
    "!=",
    "~",
    "!~",
    "<",
    ">",
    "<=",
    ">=",
    "and",
    "or",
    "xor",
    "implies",
    "in",
    "contains",
    "is",
}


class FhirPathError(TwinhubError):
    """An expression twinhub cannot compile; the message names the expression and the problem."""


# -- parsing ----------------------------------------------------------------------------------

TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^'\\]|\\.)*')
    | (?P<datetime>@T?[0-9][0-9:T.+\-Z]*)
    | (?P<number>[0-9]+(?:\.[0-9]+)?)
    | (?P<const>%(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]*`))
    | (?P<special>\$(?:this|index|total))
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*|`[^`]*`)
    | (?P<op><=|>=|!=|!~|[-+*/&|=<>~(),.\[\]{}])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Node:
    kind: str
    value: Any = None
    args: tuple[Node, ...] = field(default_factory=tuple)


@functools.cache
def parse(text: str) -> Node:
    tokens = _tokenize(text)
    parser = _Parser(text, tokens)
    node = parser.expression(0)
    if parser.pos != len(tokens):
        raise FhirPathError(f"unexpected {tokens[parser.pos][1]!r} in FHIRPath {text!r}")
    return node


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FhirPathError(f"cannot read FHIRPath {text!r} at {text[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


BINARY = {  # precedence, lowest first
    "implies": 1,
    "or": 2,
    "xor": 2,
    "and": 3,
    "in": 4,
    "contains": 4,
    "=": 5,
    "!=": 5,
    "~": 5,
    "!~": 5,
    "<": 6,
    ">": 6,
    "<=": 6,
    ">=": 6,
    "|": 7,
    "is": 8,
    "as": 8,
    "+": 9,
    "-": 9,
    "&": 9,
    "*": 10,
    "/": 10,
    "div": 10,
    "mod": 10,
}


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str]]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            found = token[1] if token else "the end"
            raise FhirPathError(f"expected {value or 'more'} but found {found!r} in FHIRPath {self.text!r}")
        self.pos += 1
        return token

    def expression(self, min_prec: int) -> Node:
        left = self.unary()
        while (token := self.peek()) and token[1] in BINARY and BINARY[token[1]] > min_prec:
            op = self.take()[1]
            right = self.expression(BINARY[op])
            left = Node("binary", op, (left, right))
        return left

    def unary(self) -> Node:
        token = self.peek()
        if token and token[1] in ("-", "+") and token[0] == "op":
            self.take()
            return Node("negate" if token[1] == "-" else "plus", None, (self.unary(),))
        return self.postfix(self.term())

    def postfix(self, node: Node) -> Node:
        while (token := self.peek()) and token[1] in (".", "["):
            self.take()
            if token[1] == "[":
                index = self.expression(0)
                self.take("]")
                node = Node("index", None, (node, index))
            else:
                node = self.invocation(node)
        return node

    def invocation(self, base: Node | None) -> Node:
        kind, name = self.take()
        if kind != "ident":
            raise FhirPathError(f"expected a name, found {name!r} in FHIRPath {self.text!r}")
        name = name.strip("`")
        if (token := self.peek()) and token[1] == "(":
            self.take()
            args: list[Node] = []
            while (token := self.peek()) and token[1] != ")":
                args.append(self.expression(0))
                if (token := self.peek()) and token[1] == ",":
                    self.take()
            self.take(")")
            return Node("call", name, (base or Node("this"), *args))
        return Node("member", name, (base or Node("this"),))

    def term(self) -> Node:
        token = self.peek()
        if token is None:
            raise FhirPathError(f"FHIRPath {self.text!r} ends too early")
        kind, value = token
        if kind == "string":
            self.take()
            return Node("literal", _unescape(value[1:-1]))
        if kind == "number":
            self.take()
            return Node("number", value)
        if kind == "datetime":
            self.take()
            return Node("literal", value[1:])
        if kind == "const":
            self.take()
            return Node("const", value[1:].strip("`"))
        if kind == "special":
            self.take()
            return Node("this" if value == "$this" else "special", value)
        if value == "(":
            self.take()
            node = self.expression(0)
            self.take(")")
            return node
        if value == "{":
            self.take()
            self.take("}")
            return Node("empty")
        if kind == "ident" and value in ("true", "false"):
            self.take()
            return Node("boolean", value == "true")
        return self.invocation(None)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), text)


# -- compiling --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Scope:
    """What an expression is evaluated against: the focus collection, the view's resource type,
    its constants (as JSON SQL literals) and the current row index; `names` numbers lambda
    variables so nested ones never clash."""

    focus: str
    resource_type: str
    constants: dict[str, str]
    constant_types: dict[str, str] = field(default_factory=dict)
    """The FHIR type of each constant: valueCode is "code"."""
    row_index: str = "0"
    names: count[int] = field(default_factory=count)
    single: str | None = None
    """The focus as one JSON value, when it is one element (the resource, a forEach item)."""
    model: Any = None
    """The focus's model (see `schema`), when known: it says which elements exist and which
    repeat, so misspelled ones fail and single-valued paths compile to plain JSON extraction."""

    def with_focus(
        self, focus: str, row_index: str | None = None, *, single: str | None = None, model: Any = None
    ) -> Scope:
        return replace(
            self,
            focus=focus,
            row_index=self.row_index if row_index is None else row_index,
            single=single,
            model=model,
        )

    def variable(self) -> str:
        return f"v{next(self.names)}"


def compile_path(text: str, scope: Scope) -> str:
    """FHIRPath `text` as a DuckDB expression of type JSON[]."""
    compiler, node = _checked(text, scope)
    return compiler.sql(node, scope)


def compile_single(text: str, scope: Scope) -> str | None:
    """FHIRPath `text` as one JSON value (NULL when empty), when the schema proves it can never
    hold more than one; else None. Plain JSON extraction: the fast path for columns."""
    compiler, node = _checked(text, scope)
    single = compiler.single(node, scope)
    return single.sql if single else None


def compile_boolean(text: str, scope: Scope) -> str | None:
    """FHIRPath `text` as an SQL BOOLEAN when its form is boolean by construction (a comparison,
    `exists()`, `and`/`or` of those); else None (evaluate it as a collection)."""
    compiler, node = _checked(text, scope)
    if (node.kind == "binary" and node.value in ("=", "!=", "and", "or")) or (
        node.kind == "call" and node.value == "exists"
    ):
        return compiler.boolean(node, scope)
    return None


def single_path(text: str, scope: Scope) -> tuple[str, TextCall | None] | None:
    """The JSONPath into the focus (e.g. `$."valueQuantity"."value"`) and the function applied
    to the text read there, when `text` is a single value read straight from the focus: such
    columns share one parse of the resource."""
    compiler, node = _checked(text, scope)
    single = compiler.single(node, scope)
    if single and single.root == scope.single and single.path != "$":
        return single.path, single.call
    return None


def element_model(text: str, scope: Scope) -> Any:
    """The model of the elements `text` yields (None when unknown)."""
    compiler, node = _checked(text, scope)
    return compiler.model(node, scope)


def path_type(text: str, scope: Scope) -> str | None:
    """The FHIR type of what `text` yields ("boolean", "decimal", "HumanName"), from the schema
    and the functions it ends in; None when neither says."""
    compiler, node = _checked(text, scope)
    return compiler.type_of(node, scope)


def _checked(text: str, scope: Scope) -> tuple[_Compiler, Node]:
    """`text` parsed, once every element it names is known to the schema: a misspelled one
    would read nothing, so it fails here naming the closest one."""
    compiler, node = _Compiler(text), parse(text)
    compiler.check(node, scope)
    return compiler, node


@dataclass(frozen=True)
class _Single:
    """A singleton: `json_extract(root, path)` (kept apart so steps merge into one path),
    or a function of the text read there (`call`)."""

    root: str
    path: str
    model: Any
    call: TextCall | None = None

    @property
    def sql(self) -> str:
        if self.call:
            return f"to_json({self.call.sql(f'json_extract_string({self.root}, {_quote(self.path)})')})"
        return self.root if self.path == "$" else f"json_extract({self.root}, {_quote(self.path)})"

    def child(self, name: str, model: Any) -> _Single:
        assert self.call is None, "a computed value has no children"
        return _Single(self.root, f'{self.path}."{name}"', model)


@dataclass(frozen=True)
class TextCall:
    """An SQL macro of a text value and constant arguments, e.g. `fp_ref_key(text, 'Patient')`."""

    macro: str
    args: tuple[str, ...]

    def sql(self, text: str) -> str:
        return f"{self.macro}({', '.join((text, *self.args))})"


@dataclass(frozen=True)
class _Many:
    """A collection reached by member steps the schema knows: one `json_extract` with `[*]` at
    each repeating step, which yields exactly the FHIRPath collection (missing values skipped)."""

    root: str
    path: str
    model: Any

    @property
    def sql(self) -> str:
        return f"json_extract({self.root}, {_quote(self.path)})"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_path(name: str) -> str:
    return _quote('$."' + name.replace('"', '\\"') + '"')


class _Compiler:
    def __init__(self, text: str) -> None:
        self.text = text

    def error(self, message: str) -> FhirPathError:
        return FhirPathError(f"{message} in FHIRPath {self.text!r}")

    def single(self, node: Node, scope: Scope) -> _Single | None:
        """`node` as a singleton, where the schema proves it is one (see `compile_single`)."""
        if node.kind == "literal":
            return _Single(f"to_json({_quote(node.value)})", "$", None)
        if node.kind in ("number", "boolean"):
            return _Single(f"'{str(node.value).lower()}'::JSON", "$", None)
        if node.kind == "this":
            return _Single(scope.single, "$", scope.model) if scope.single else None
        if node.kind == "member":
            (base,) = node.args
            if base.kind == "this" and node.value == scope.resource_type:
                return self.single(base, scope)
            parent = self.single(base, scope)
            found = element(parent.model, node.value) if parent else None
            if parent is None or found is None or found[0]:
                return None
            return parent.child(node.value, found[1])
        if node.kind == "call":
            base, *args = node.args
            if choice := self.choice(node, scope):
                return self.single(choice, scope)
            if node.value == "first" and not args:
                parent = self.single(base, scope)
                if parent is not None:
                    return parent
                if base.kind == "member" and (owner := self.single(base.args[0], scope)):
                    found = element(owner.model, base.value)
                    if found:  # a repeating element of a single one: its first is index 0
                        return _Single(owner.root, f'{owner.path}."{base.value}"[0]', found[1])
                model = self.model(base, scope)
                return _Single(f"{self.sql(base, scope)}[1]", "$", model)
            parent = self.single(base, scope)
            if parent is None or parent.call:
                return None
            if node.value == "getReferenceKey":
                resource_type = args[0].value if args and args[0].kind == "member" else "[A-Za-z]+"
                reference = parent.child("reference", None)
                return replace(reference, call=TextCall("fp_ref_key", (_quote(resource_type), SOURCE)))
            if node.value == "getResourceKey" and not args:
                return replace(parent.child("id", None), call=TextCall("fp_key", (SOURCE,)))
        return None

    def many(self, node: Node, scope: Scope) -> _Many | None:
        """`node` as one wildcard extraction, where every member step is known to the schema."""
        if node.kind == "member":
            (base,) = node.args
            if base.kind == "this" and node.value == scope.resource_type:
                return None
            start = self.single(base, scope) or self.many(base, scope)
            found = element(start.model, node.value) if start else None
            if start is None or found is None or (isinstance(start, _Single) and not found[0]):
                return None
            return _Many(start.root, f'{start.path}."{node.value}"' + ("[*]" if found[0] else ""), found[1])
        if choice := self.choice(node, scope):
            return self.many(choice, scope)
        return None

    def boolean(self, node: Node, scope: Scope) -> str:
        """`node` as an SQL BOOLEAN (NULL for empty): comparisons of singletons and logic on
        them skip the collection form; anything else goes through it."""
        if node.kind == "binary" and node.value in ("and", "or"):
            a, b = (self.boolean(arg, scope) for arg in node.args)
            return f"({a} {node.value.upper()} {b})"
        if node.kind == "call" and node.value == "exists" and (found := self.contains(node, scope)):
            return found
        if node.kind == "call" and node.value == "exists" and len(node.args) == 1:
            if many := self.many(node.args[0], scope):
                return f"(len({many.sql}) > 0)"
            if single := self.single(node.args[0], scope):
                return f"({single.sql} IS NOT NULL)"
        if node.kind == "binary" and node.value in ("=", "!="):
            left, right = (self.single(arg, scope) for arg in node.args)
            if left and right:
                equal = f"fp_eq({left.sql}, {right.sql})"
                return equal if node.value == "=" else f"(NOT {equal})"
        return f"fp_bool({self.sql(node, scope)})"

    def filter(self, base: str, base_node: Node, criterion: Node, scope: Scope) -> str:
        """The items of `base` for which `criterion`, evaluated on each, is true."""
        v = scope.variable()
        item = scope.with_focus(f"[{v}]", single=v, model=self.model(base_node, scope))
        return f"list_filter({base}, lambda {v}: coalesce({self.boolean(criterion, item)}, false))"

    def contains(self, node: Node, scope: Scope) -> str | None:
        """`X.where(F = 'text').exists()` (or `X.exists(F = 'text')`) over a chain the schema
        knows, as one `list_contains` on a wildcard extraction: the usual category filter."""
        base, *args = node.args
        if args:
            collection, criterion = base, args[0]
        elif base.kind == "call" and base.value == "where" and len(base.args) == 2:
            collection, criterion = base.args
        else:
            return None
        if criterion.kind != "binary" or criterion.value != "=":
            return None
        field, literal = criterion.args
        if field.kind != "member" or field.args[0].kind != "this" or literal.kind != "literal":
            return None
        many = self.many(Node("member", field.value, (collection,)), scope)
        if many is None:
            return None
        return (
            f"list_contains(json_extract_string({many.root}, {_quote(many.path)}), {_quote(literal.value)})"
        )

    def choice(self, node: Node, scope: Scope) -> Node | None:
        """`X.ofType(T)` as the element it names when X is a choice (value.ofType(Quantity) is
        valueQuantity): X is one of its model's choices, or its model is unknown."""
        if node.kind != "call" or node.value != "ofType" or len(node.args) != 2:
            return None
        base, type_node = node.args
        if base.kind != "member" or type_node.kind != "member":
            return None
        owner = self.model(base.args[0], scope)
        if owner is not None and not choice_types(owner, base.value):
            return None
        return Node("member", choice_element(base.value, type_node.value), base.args)

    def model(self, node: Node, scope: Scope) -> Any:
        """The model of the elements `node` yields (see `schema`), when the steps make it known."""
        if node.kind == "this":
            return scope.model
        if node.kind == "member":
            (base,) = node.args
            if base.kind == "this" and node.value == scope.resource_type:
                return scope.model
            found = element(self.model(base, scope), node.value)
            return found[1] if found else None
        if node.kind == "call" and node.value in ("where", "first", "last", "single") and node.args:
            return self.model(node.args[0], scope)
        if node.kind == "call" and node.value == "extension":
            return complex_model("Extension")
        if choice := self.choice(node, scope):
            return self.model(choice, scope)
        if node.kind == "call" and node.value == "ofType" and node.args[1].kind == "member":
            return complex_model(node.args[1].value)  # contained.ofType(Patient)
        if node.kind == "index":
            return self.model(node.args[0], scope)
        return None

    def check(self, node: Node, scope: Scope) -> None:
        """Raise naming an element the schema does not know, or a type its choice cannot take."""
        if node.kind == "member":
            (base,) = node.args
            if base.kind == "this" and node.value == scope.resource_type:
                return
            self.check(base, scope)
            if problem := unknown_element(self.model(base, scope), node.value):
                raise self.error(problem)
        elif node.kind == "call":
            base, *args = node.args
            self.check(base, scope)
            if node.value == "ofType" and base.kind == "member" and args and args[0].kind == "member":
                owner = self.model(base.args[0], scope)
                if problem := unknown_type(owner, base.value, args[0].value):
                    raise self.error(problem)
            if node.value in ("where", "exists") and args:  # criteria, evaluated on each item
                self.check(args[0], scope.with_focus(scope.focus, model=self.model(base, scope)))
        elif node.kind in ("binary", "negate", "plus"):
            for arg in node.args:
                self.check(arg, scope)
        elif node.kind == "index":
            self.check(node.args[0], scope)

    def type_of(self, node: Node, scope: Scope) -> str | None:
        """The FHIR type of what `node` yields: the schema's for elements, the function's or
        the operator's for the rest (FHIRPath's Boolean is boolean, and so on)."""
        kind, name = node.kind, node.value
        if kind in ("this", "member", "index") or (
            kind == "call" and name in ("where", "first", "last", "single", "ofType", "extension")
        ):
            model = self.model(node, scope)
            if model is None and kind == "call" and name == "ofType" and node.args[1].kind == "member":
                return str(node.args[1].value)  # the type it names, where the schema is silent
            return type_name(model)
        if kind in ("literal", "number", "boolean"):
            return {"literal": "string", "boolean": "boolean"}.get(kind) or (
                "decimal" if "." in name else "integer"
            )
        if kind == "const":
            return "integer" if name == "rowIndex" else scope.constant_types.get(name)
        if kind in ("negate", "plus"):
            return self.type_of(node.args[0], scope)
        if kind == "call":
            if name in ("lowBoundary", "highBoundary"):
                return self.type_of(node.args[0], scope)
            return _FUNCTION_TYPES.get(name)
        if kind == "binary":
            if name in _BOOLEAN_OPERATORS:
                return "boolean"
            if name == "&":
                return "string"
            left, right = (self.type_of(arg, scope) for arg in node.args)
            if name == "|":
                return left if left == right else None
            if {left, right} <= {"integer", "decimal"} and name in ("+", "-", "*", "/"):
                return "integer" if left == right == "integer" and name != "/" else "decimal"
        return None

    def sql(self, node: Node, scope: Scope) -> str:
        kind = node.kind
        if kind == "this":
            return scope.focus
        if kind in ("member", "call") and (single := self.single(node, scope)) is not None:
            return f"fp_of_single({single.sql})"
        if kind in ("member", "call") and (many := self.many(node, scope)) is not None:
            return many.sql
        if kind == "literal":
            return f"[to_json({_quote(node.value)})]"
        if kind == "number":
            return f"['{node.value}'::JSON]"
        if kind == "boolean":
            return f"['{str(node.value).lower()}'::JSON]"
        if kind == "empty":
            return "[]::JSON[]"
        if kind == "const":
            if node.value == "rowIndex":
                return f"[to_json({scope.row_index})]"
            if node.value not in scope.constants:
                raise self.error(f"%{node.value} is not a constant of the view")
            return f"fp_items({scope.constants[node.value]})"
        if kind == "special":
            raise self.error(f"{node.value} is not supported")
        if kind == "member":
            (base,) = node.args
            if base.kind == "this" and node.value == scope.resource_type:
                return scope.focus
            if choices := choice_types(self.model(base, scope), node.value):  # value: any value[x]
                v = scope.variable()
                items = ", ".join(f"fp_items(json_extract({v}, {_json_path(e)}))" for e in choices.values())
                return f"flatten(list_transform({self.sql(base, scope)}, lambda {v}: flatten([{items}])))"
            if parent := self.single(base, scope):  # a repeating element of a single one
                return f"fp_items(json_extract({parent.sql}, {_json_path(node.value)}))"
            return f"fp_child({self.sql(base, scope)}, {_json_path(node.value)})"
        if kind == "index":
            base, index = node.args
            i = f"(fp_one({self.sql(index, scope.with_focus(scope.focus))})::INTEGER + 1)"
            return f"list_slice({self.sql(base, scope)}, {i}, {i})"
        if kind == "negate":
            (inner,) = node.args
            return f"list_transform({self.sql(inner, scope)}, lambda x: to_json(-(x::DOUBLE)))"
        if kind == "plus":
            return self.sql(node.args[0], scope)
        if kind == "binary":
            return self.binary(node, scope)
        if kind == "call":
            return self.call(node, scope)
        raise self.error(f"unsupported expression {kind}")

    def binary(self, node: Node, scope: Scope) -> str:
        op = node.value
        left, right = (self.sql(arg, scope) for arg in node.args)
        if op in ("and", "or"):
            return f"fp_of_bool(fp_bool({left}) {op.upper()} fp_bool({right}))"
        if op == "xor":
            return f"fp_of_bool(fp_bool({left}) <> fp_bool({right}))"
        if op == "implies":
            return f"fp_of_bool(NOT fp_bool({left}) OR fp_bool({right}))"
        if op == "=":
            return f"fp_of_bool(fp_equal({left}, {right}))"
        if op == "!=":
            return f"fp_of_bool(NOT fp_equal({left}, {right}))"
        if op in ("<", ">", "<=", ">="):
            return f"fp_of_bool(fp_compare({left}, {right}) {op} 0)"
        if op in ("+", "-", "*", "/"):
            return f"fp_arith({left}, {right}, '{op}')"
        if op == "&":
            return (
                f"[to_json(coalesce(json_extract_string(fp_one({left}), '$'), '') "
                f"|| coalesce(json_extract_string(fp_one({right}), '$'), ''))]"
            )
        if op == "|":
            return f"list_concat({left}, {right})"
        raise self.error(f"operator {op!r} is not supported")

    def call(self, node: Node, scope: Scope) -> str:
        name = node.value
        base_node, *args = node.args
        if name not in FUNCTIONS:
            raise self.error(f"function {name}() is not supported")
        if name == "ofType":
            if len(args) != 1 or args[0].kind != "member":
                raise self.error("ofType() takes a type name")
            if choice := self.choice(node, scope):  # value.ofType(Quantity) is valueQuantity
                return self.sql(choice, scope)
            is_type = f"json_extract_string(x, '$.resourceType') = {_quote(args[0].value)}"
            return f"list_filter({self.sql(base_node, scope)}, lambda x: {is_type})"
        base = self.sql(base_node, scope)
        if name == "where":
            if len(args) != 1:
                raise self.error("where() takes one criterion")
            return self.filter(base, base_node, args[0], scope)
        if name == "exists":
            if args:
                base = self.filter(base, base_node, args[0], scope)
            return f"[to_json(len({base}) > 0)]"
        if name == "empty":
            return f"[to_json(len({base}) = 0)]"
        if name == "first":
            return f"list_slice({base}, 1, 1)"
        if name == "last":
            return f"list_slice({base}, -1, -1)"
        if name == "single":
            return f"list_slice(fp_items(fp_one({base})), 1, 1)"
        if name == "count":
            return f"[to_json(len({base}))]"
        if name == "not":
            return f"fp_of_bool(NOT fp_bool({base}))"
        if name == "toString":
            return f"list_transform({base}, lambda x: to_json(json_extract_string(x, '$')))"
        if name == "join":
            separator = "''" if not args else f"json_extract_string(fp_one({self.sql(args[0], scope)}), '$')"
            return f"fp_join({base}, {separator})"
        if name == "extension":
            if len(args) != 1:
                raise self.error("extension() takes a url")
            url = f"json_extract_string(fp_one({self.sql(args[0], scope)}), '$')"
            matches = f"json_extract_string(x, '$.url') = {url}"
            return f"list_filter(fp_child({base}, '$.extension'), lambda x: {matches})"
        if name in ("lowBoundary", "highBoundary"):
            kind = _temporal_kind(base_node)
            low = "true" if name == "lowBoundary" else "false"
            return (
                f"list_filter(list_transform({base}, lambda x: fp_boundary(x, '{kind}', {low})), "
                "lambda b: b IS NOT NULL)"
            )
        if name == "getResourceKey":
            key = f"to_json(fp_key(x ->> '$', {SOURCE}))"
            return f"list_transform(fp_child({base}, '$.id'), lambda x: {key})"
        if name == "getReferenceKey":
            resource_type = "[A-Za-z]+"
            if args:
                if args[0].kind != "member":
                    raise self.error("getReferenceKey() takes a resource type")
                resource_type = args[0].value
            key = f"to_json(fp_ref_key(x ->> '$.reference', {_quote(resource_type)}, {SOURCE}))"
            return f"list_filter(list_transform({base}, lambda x: {key}), lambda k: k IS NOT NULL)"
        raise self.error(f"function {name}() is not supported yet")


def _temporal_kind(node: Node) -> str:
    """What a boundary is of, from the element's name: FHIR names a choice by its type
    (valueDateTime) and most dates by their role (birthDate); the value's shape decides the rest."""
    name = node.value if node.kind == "member" else ""
    if node.kind == "call" and node.value == "ofType" and node.args[1].kind == "member":
        name = node.args[1].value
    if name.lower().endswith(("datetime", "instant")):
        return "dateTime"
    if name.lower().endswith("date"):
        return "date"
    if name.lower().endswith("time"):
        return "time"
    return "any"
