"""The Open mHealth JSON schemas of a folder laid out as the openmhealth/schemas repository's
`schema/` (`omh/heart-rate-2.0.json`, `granola/...`), validated against with jsonschema (each
schema's own draft) over one referencing Registry built when the folder is read.

A shared copy of that folder lacks what upstream resolves elsewhere, so two kinds of refs are
resolved here:
- `unit-value-1.x.json`: the `-N.x.json` aliases were symlinks upstream; the alias is the highest
  `-N.y.json` present (as upstream's own validator does; a stray alias file is ignored).
- `https://w3id.org/ieee/ieee-1752-schema/...`: the IEEE 1752.1 schemas, not in the folder (see
  `[ieee]` in openmhealth.toml for what stands in for them).
A ref that resolves neither way is reported when a data point needs it, naming the ref. The
`date-time` format is checked as the mapping reads it (RFC 3339, offset required) and `uri` as an
absolute URI, whatever format packages are installed. Each schema's refs are inlined once, when
it is first used: jsonschema resolving every ref anew for every data point took most of the time.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import orjson
from jsonschema import FormatChecker
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT4, DRAFT7, specification_with

from connectors.errors import SourceError

RULES_FILE = Path(__file__).with_name("openmhealth.toml")
OMH_BASE = "https://w3id.org/openmhealth/schemas/"
IEEE_BASE = "https://w3id.org/ieee/ieee-1752-schema/"
DRAFT4_ID = "http://json-schema.org/draft-04/schema#"
VERSIONED = re.compile(r"(?P<name>[A-Za-z0-9_-]+)-(?P<major>\d+)\.(?P<minor>\d+)\.json")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]*\Z")
MAX_MESSAGE = 300


@functools.cache
def rules() -> dict[str, Any]:
    """openmhealth.toml: measures, duration units, parts of day, IEEE stand-ins."""
    return tomllib.loads(RULES_FILE.read_text())


def parse_instant(text: str) -> datetime:
    """An RFC 3339 date-time (the offset required, as the schemas' `date-time` format says)."""
    if not RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 date-time with an offset")
    if text[17:19] == "60":  # a leap second: read as the second after it, as POSIX clocks do
        return datetime.fromisoformat(f"{text[:17]}59{text[19:]}".upper()) + timedelta(seconds=1)
    return datetime.fromisoformat(text.upper())


def _is_instant(value: object) -> bool:
    """The `date-time` format as the mapping reads it, so whatever passes can be read."""
    return not isinstance(value, str) or isinstance(parse_instant(value), datetime)


def _is_uri(value: object) -> bool:
    """The `uri` format (jsonschema checks it only with rfc3987 installed): an absolute URI."""
    return not isinstance(value, str) or URI.match(value) is not None


@dataclass(frozen=True, kw_only=True)
class SchemaId:
    namespace: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.name}:{self.version}"


class SchemaMismatchError(ValueError):
    """An instance breaks its schema; the message is the validator's, one line, with the path."""


class SchemaGapError(ValueError):
    """The schema refers to one the folder does not hold (and that nothing stands in for)."""


class SchemaFolder:
    """Every schema of the folder, registered under its upstream URI
    (https://w3id.org/openmhealth/schemas/<namespace>/<file>), with validators made on first use."""

    def __init__(self, source: str, folder: Path) -> None:
        self.folder = folder
        files = _schema_files(source, folder)
        self.versions: dict[tuple[str, str, int], dict[int, str]] = {}
        resources: dict[str, Resource[Any]] = {}
        for path in files:
            namespace, match = path.parent.name, VERSIONED.fullmatch(path.name)
            if match is None:
                continue  # an alias file (`-1.x.json`) or a stray: aliases are computed below
            uri = f"{OMH_BASE}{namespace}/{path.name}"
            resources[uri] = _resource(source, path, uri)
            key = (namespace, match["name"], int(match["major"]))
            self.versions.setdefault(key, {})[int(match["minor"])] = uri
        aliases = {
            f"{OMH_BASE}{namespace}/{name}-{major}.x.json": resources[minors[max(minors)]]
            for (namespace, name, major), minors in self.versions.items()
        }
        resources |= aliases
        resources |= _ieee_stand_ins(resources)
        self.registry: Registry[Any] = Registry().with_resources(resources.items())
        self.format_checker = FormatChecker()
        self.format_checker.checks("date-time", raises=ValueError)(_is_instant)
        self.format_checker.checks("uri")(_is_uri)
        self._validators: dict[str, Validator] = {}

    def find(self, schema: SchemaId) -> str | None:
        """The URI of the schema a data point names: that version, else the highest later minor
        version of the same major one (minor versions only add), else None."""
        major, _, minor = schema.version.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            return None
        minors = self.versions.get((schema.namespace, schema.name, int(major)), {})
        later = [m for m in minors if m >= int(minor)]
        return minors[int(minor) if int(minor) in minors else max(later)] if later else None

    def alias(self, namespace: str, name: str, major: int) -> str | None:
        """The URI of `<name>-<major>.x.json`, if the folder has any such version."""
        return (
            f"{OMH_BASE}{namespace}/{name}-{major}.x.json"
            if (namespace, name, major) in self.versions
            else None
        )

    def check(self, uri: str, instance: Any) -> None:
        """Raise SchemaMismatchError (the validator's best error: its JSON path and message) or
        SchemaGapError (a ref that does not resolve)."""
        validator = self._validators.get(uri)
        if validator is None:
            contents = _inlined(self.registry, uri)
            cls = validator_for(contents)
            validator = cls(contents, registry=self.registry, format_checker=self.format_checker)
            self._validators[uri] = validator
        try:
            error = best_match(validator.iter_errors(instance))
        except Unresolvable as e:
            raise SchemaGapError(
                f"{_name(uri)} refers to {_name(e.ref)!r}, which is not in the schemas folder "
                f"{str(self.folder)!r}; add that schema there"
            ) from None
        if error is not None:
            message = " ".join(error.message.split())
            if len(message) > MAX_MESSAGE:
                message = message[: MAX_MESSAGE - 1] + "…"
            raise SchemaMismatchError(f"at {error.json_path}: {message}")


def _inlined(registry: Registry[Any], uri: str) -> dict[str, Any]:
    """The schema with every `$ref` replaced by what it refers to (a ref's siblings are ignored,
    as drafts 4 and 7 say), so validating walks plain dicts: jsonschema resolving each ref anew
    for every data point took most of the time. A ref that does not resolve, or that refers to a
    schema it is inside of, stays (absolute) for the validator to resolve or report."""

    def inline(node: Any, base: str, inside: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, base, inside) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return {k: inline(v, base, inside) for k, v in node.items() if k not in ("id", "$id")}
        target = urljoin(base, ref)
        if target in inside:
            return {"$ref": target}
        try:
            contents = registry.resolver(base_uri=base).lookup(ref).contents
        except Unresolvable:
            return {"$ref": target}
        return inline(contents, target.partition("#")[0], (*inside, target))

    root = registry[uri].contents
    inlined: dict[str, Any] = inline(root, uri, (uri,))
    return {"$schema": root.get("$schema", DRAFT4_ID), **inlined}


def _name(uri: str) -> str:
    return uri.removeprefix(OMH_BASE).removeprefix(IEEE_BASE)


def _schema_files(source: str, folder: Path) -> list[Path]:
    fix = (
        "point sources.schemas at the Open mHealth schemas' schema/ folder (omh/<name>-<version>.json "
        "files, e.g. a checkout of github.com/openmhealth/schemas)"
    )
    if not folder.is_dir():
        raise SourceError(source, f"schemas folder {str(folder)!r} does not exist; {fix}")
    files = sorted(folder.glob("*/*.json"))
    if not files:
        loose = (
            " (its JSON files lie directly in it: point at their parent)"
            if any(folder.glob("*.json"))
            else ""
        )
        raise SourceError(source, f"schemas folder {str(folder)!r} holds no schemas{loose}; {fix}")
    return files


def _resource(source: str, path: Path, uri: str) -> Resource[Any]:
    """The schema with its URI as its id (upstream's own `$id`s are not always their file's:
    body-weight-3.0.json says it is body-weight-2.0.json)."""
    try:
        contents = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise SourceError(
            source, f"schema {str(path)!r} cannot be read as JSON ({e}); fix or remove it"
        ) from None
    if not isinstance(contents, dict):
        raise SourceError(source, f"schema {str(path)!r} is not a JSON object; fix or remove it")
    specification = specification_with(str(contents.get("$schema", "")), default=DRAFT4)
    contents = {k: v for k, v in contents.items() if k not in ("id", "$id")}
    contents["id" if specification is DRAFT4 else "$id"] = uri
    return specification.create_resource(contents)


def _ieee_stand_ins(resources: dict[str, Resource[Any]]) -> dict[str, Resource[Any]]:
    """A resource for every IEEE 1752.1 URI the schemas (and stand-ins) refer to: its stand-in
    in openmhealth.toml, else the Open mHealth schema of the same name and major version."""
    written = rules()["ieee"]
    found: dict[str, Resource[Any]] = {}
    pending = [r.contents for r in resources.values()]
    while pending:
        for ref in _refs(pending.pop()):
            uri = ref.partition("#")[0]
            match = VERSIONED.fullmatch(uri.removeprefix(IEEE_BASE))
            if not uri.startswith(IEEE_BASE) or uri in found or match is None:
                continue
            key = f"{match['name']}-{match['major']}"
            if key in written:
                contents = {"$schema": "http://json-schema.org/draft-07/schema#", "$id": uri, **written[key]}
            elif (namesake := f"{OMH_BASE}omh/{key}.x.json") in resources:
                contents = {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "$id": uri,
                    "$ref": namesake,
                }
            else:
                continue
            found[uri] = DRAFT7.create_resource(contents)
            pending.append(contents)
    return found


def _refs(schema: dict[str, Any]) -> Iterator[str]:
    """Every `$ref` in a schema, made absolute against the schema's id."""
    base = str(schema.get("$id", schema.get("id", "")))
    stack: list[Any] = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str):
                yield urljoin(base, ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
