"""Lab result codes and units normalized the same way for every lab source (CSV rows, HL7 v2).

- **Codes**: a local code the source's ConceptMap maps gets the LOINC coding added before its own
  (the original coding stays); a LOINC code stays as it is; any other code stays too, and the
  Observation is tagged `urn:twinhub:tag|unmapped-code`. Of a ConceptMap's targets only those
  whose equivalence says the LOINC concept holds for the result apply: `equivalent`, `equal`,
  `wider` and `subsumes` (R5 maps: `equivalent`, `source-is-narrower-than-target`); `narrower`,
  `specializes`, `inexact`, `relatedto`, `unmatched` and `disjoint` never do.
- **Units** become UCUM (`system` http://unitsofmeasure.org, `code`): a spelling listed in
  `lab_units.toml` maps to its UCUM code, else a unit that parses as UCUM (ucumvert) is its own
  code. `unit` keeps the text the source sent. A unit that is neither keeps its text, has no code,
  and the Observation is tagged `urn:twinhub:tag|unknown-unit`.
- **Values** are converted only for the LOINC codes `lab_units.toml` lists, to the unit it names
  (with the analyte's molar mass between mass and substance concentrations), and the reference
  range with them. The converted value keeps as many significant digits as the sent one (at
  least 3); the quantity keeps what was sent in the extension `urn:twinhub:extension:original-quantity`.

Pure: the data files beside this module are read once per process; a ConceptMap comes in as
bytes (the flow reads the file).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
TAGS = "urn:twinhub:tag"
UNMAPPED_CODE = {"system": TAGS, "code": "unmapped-code", "display": "Code not mapped to LOINC"}
UNKNOWN_UNIT = {"system": TAGS, "code": "unknown-unit", "display": "Unit not UCUM"}
ORIGINAL_QUANTITY = "urn:twinhub:extension:original-quantity"
APPLIES = frozenset({"equivalent", "equal", "wider", "subsumes", "source-is-narrower-than-target"})
"""ConceptMap equivalences (R4) and relationships (R5) under which the target code is true of
the result: the same concept, or a broader one."""
EQUIVALENCES = (
    "relatedto",
    "equivalent",
    "equal",
    "wider",
    "subsumes",
    "narrower",
    "specializes",
    "inexact",
    "unmatched",
    "disjoint",
)
RELATIONSHIPS = (
    "related-to",
    "equivalent",
    "source-is-narrower-than-target",
    "source-is-broader-than-target",
    "not-related-to",
)
UNITS_FILE = Path(__file__).with_name("lab_units.toml")
MIN_DIGITS = 3

# The run's stats keys (`twinhub sync` prints them).
CODES_MAPPED = "codes mapped"
CODES_UNMAPPED = "codes unmapped"
UNITS_UNKNOWN = "units not UCUM"
VALUES_CONVERTED = "values converted"


@dataclass(frozen=True, kw_only=True)
class CodeMap:
    """A source's local codes -> the LOINC (or other target) codings that apply to them."""

    targets: Mapping[tuple[str | None, str], tuple[dict[str, str], ...]]
    """(source system, code) -> target codings; system None: a group that names no source,
    which matches the code in any system."""

    def lookup(self, system: str | None, code: str) -> tuple[dict[str, str], ...]:
        return self.targets.get((system, code)) or self.targets.get((None, code)) or ()


def code_map_from_json(data: bytes) -> CodeMap:
    """A FHIR ConceptMap (R4/R4B, or R5) as a CodeMap; raises ValueError saying what is wrong."""
    from fhir.resources.conceptmap import ConceptMap as ConceptMapR5
    from fhir.resources.R4B.conceptmap import ConceptMap

    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"is not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("resourceType") != "ConceptMap":
        raise ValueError("is not a FHIR ConceptMap (its resourceType must be ConceptMap)")
    targets_of = (t for g in raw.get("group", []) for e in g.get("element", []) for t in e.get("target", []))
    r5 = any("relationship" in t for t in targets_of)
    try:
        (ConceptMapR5 if r5 else ConceptMap).model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(
            f"is not a valid FHIR {'R5' if r5 else 'R4'} ConceptMap: {where}: {first['msg']}"
        ) from None
    targets: dict[tuple[str | None, str], list[dict[str, str]]] = {}
    for g, group in enumerate(raw.get("group", []), start=1):
        target_system = group.get("target")
        if not target_system:
            raise ValueError(f'group {g} names no target system; add "target": "{LOINC}"')
        for element in group.get("element", []):
            for target in element.get("target", []):
                field, known = ("relationship", RELATIONSHIPS) if r5 else ("equivalence", EQUIVALENCES)
                relation = target.get(field)
                if relation not in known:
                    raise ValueError(
                        f"group {g} maps {element.get('code')!r} with {field} {relation!r}; use one of: "
                        f"{', '.join(known)}"
                    )
                if relation not in APPLIES or "code" not in target or "code" not in element:
                    continue
                if target_system == LOINC and not loinc_is_valid(target["code"]):
                    raise ValueError(
                        f"group {g} maps {element['code']!r} to {target['code']!r}, which is not a "
                        "LOINC code (bad form or check digit)"
                    )
                coding = {"system": target_system, "code": target["code"]}
                coding |= {"display": target["display"]} if target.get("display") else {}
                targets.setdefault((group.get("source"), element["code"]), []).append(coding)
    return CodeMap(targets={key: tuple(codings) for key, codings in targets.items()})


def normalize_observation(resource: dict[str, Any], codes: CodeMap | None = None) -> list[str]:
    """Map the Observation's code and normalize its units, in place; returns what it did, as
    the run's stats keys (one entry per event)."""
    notes: list[str] = []
    concept = resource.get("code") or {}
    codings: list[dict[str, Any]] = concept.get("coding") or []
    loinc = [c["code"] for c in codings if c.get("system") == LOINC and c.get("code")]
    if not loinc:
        mapped = [
            target
            for c in codings
            if c.get("code") and codes is not None
            for target in codes.lookup(c.get("system"), c["code"])
        ]
        if mapped:
            concept["coding"] = [*mapped, *codings]
            loinc = [c["code"] for c in mapped if c["system"] == LOINC]
            notes.append(CODES_MAPPED)
        else:
            _tag(resource, UNMAPPED_CODE)
            notes.append(CODES_UNMAPPED)
    conversion = next((conversions()[c] for c in loinc if c in conversions()), None)
    quantities = list(_quantities(resource))
    unknown = False
    for quantity in quantities:
        ucum = ucum_code(quantity.get("code")) or ucum_code(quantity.get("unit"))
        if ucum is None:
            unknown = unknown or bool(quantity.get("unit") or quantity.get("code"))
            if "unit" not in quantity and "code" in quantity:
                quantity["unit"] = quantity["code"]
            quantity.pop("system", None)
            quantity.pop("code", None)
            continue
        quantity |= {"system": UCUM, "code": ucum}
    if unknown:
        _tag(resource, UNKNOWN_UNIT)
        notes.append(UNITS_UNKNOWN)
    if conversion is not None and _convert(resource, quantities, *conversion):
        notes.append(VALUES_CONVERTED)
    return notes


@functools.lru_cache(maxsize=4096)
def ucum_code(unit: str | None) -> str | None:
    """The UCUM code of a unit as a lab writes it, or None: a listed spelling first, then the
    text itself if it is valid UCUM."""
    if not unit or not unit.strip():
        return None
    text = unit.strip()
    exact, folded = spellings()
    if (known := exact.get(text) or folded.get(text.lower())) is not None:
        return known
    from ucumvert import InvalidUcumError, parse_ucum

    try:
        parse_ucum(text, _ucum_parser())
    except InvalidUcumError:
        return None
    except Exception:  # lark's own errors on hostile text
        return None
    return text


@functools.cache
def spellings() -> tuple[dict[str, str], dict[str, str]]:
    """(spelling as written -> UCUM, lower-case spelling -> UCUM for the keys written in lower case)."""
    listed: dict[str, str] = _units_file()["spellings"]
    return listed, {k: v for k, v in listed.items() if k == k.lower()}


@functools.cache
def conversions() -> dict[str, tuple[str, float | None]]:
    """LOINC code -> (UCUM unit to convert to, molar mass in g/mol or None)."""
    return {
        code: (entry["unit"], entry.get("molar_mass")) for code, entry in _units_file()["conversions"].items()
    }


def loinc_is_valid(code: str) -> bool:
    """LOINC's mod-10 check digit: the odd digits from the right, doubled, after the even ones;
    their digits summed; the check is what brings the sum to a multiple of 10."""
    found = re.fullmatch(r"(\d{1,7})-(\d)", code)
    if not found:
        return False
    digits = found[1][::-1]
    odd, even = digits[0::2][::-1], digits[1::2][::-1]
    total = sum(int(d) for d in even + str(int(odd) * 2))
    return (10 - total % 10) % 10 == int(found[2])


def _convert(
    resource: dict[str, Any], quantities: list[dict[str, Any]], target: str, molar_mass: float | None
) -> bool:
    """Convert the value and reference range quantities to `target` where they are in another
    UCUM unit that converts; True if any did."""
    converted: list[dict[str, Any]] = []
    for quantity in quantities:
        source, value = quantity.get("code"), quantity.get("value")
        if quantity.get("system") != UCUM or source == target or source is None or value is None:
            continue
        factor = _factor(source, target, molar_mass)
        if factor is None:
            continue
        try:
            scaled = _scaled(orjson.dumps(value).decode(), factor)
        except ArithmeticError:  # beyond what a decimal holds (1e999999): left as sent
            continue
        original = {
            k: quantity[k] for k in ("value", "comparator", "unit", "system", "code") if k in quantity
        }
        quantity |= {"value": orjson.Fragment(scaled), "unit": target, "code": target}
        quantity["extension"] = [
            *quantity.get("extension", []),
            {"url": ORIGINAL_QUANTITY, "valueQuantity": original},
        ]
        converted.append(quantity)
    done = {id(q) for q in converted}
    for bounds in resource.get("referenceRange", []):
        if "text" in bounds and any(id(bounds.get(side)) in done for side in ("low", "high")):
            bounds["text"] = _range_text(bounds)
    return bool(converted)


@functools.lru_cache(maxsize=256)
def _factor(source: str, target: str, molar_mass: float | None) -> Decimal | None:
    """How many `target` one `source` is (via the molar mass between mass and substance)."""
    from pint.errors import PintError

    registry = _registry()
    try:
        one, goal = registry.from_ucum(source), registry.from_ucum(target)
        candidates = [one]
        if molar_mass is not None:
            mass = registry.from_ucum("g/mol") * molar_mass
            candidates += [one / mass, one * mass]
    except Exception:  # units pint cannot hold, or not multiply (bel, degrees Celsius)
        return None
    for candidate in candidates:
        try:
            return Decimal(repr(float(candidate.to(goal).magnitude / goal.magnitude)))
        except PintError:
            continue
    return None


def _scaled(written: str, factor: Decimal) -> str:
    """`written` times `factor`, to as many significant digits as written (at least 3)."""
    value = Decimal(written)
    digits = max(len(value.as_tuple().digits) if value else 1, MIN_DIGITS)
    result = value * factor
    if not result:
        return "0"
    exponent = result.adjusted() - digits + 1
    rounded = result.quantize(Decimal(1).scaleb(exponent))
    return f"{rounded:f}" if exponent < 0 else f"{rounded.quantize(Decimal(1)):f}"


def _range_text(bounds: dict[str, Any]) -> str:
    low, high = (orjson.dumps(bounds[s]["value"]).decode() if s in bounds else None for s in ("low", "high"))
    unit = (bounds.get("low") or bounds.get("high") or {}).get("unit", "")
    text = f"{low}-{high}" if low and high else f"<{high}" if high else f">{low}"
    return f"{text} {unit}".strip()


def _quantities(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "valueQuantity" in resource:
        yield resource["valueQuantity"]
    for bounds in resource.get("referenceRange", []):
        yield from (bounds[side] for side in ("low", "high") if side in bounds)


def _tag(resource: dict[str, Any], tag: dict[str, str]) -> None:
    meta = resource.setdefault("meta", {})
    if tag not in meta.get("tag", []):
        meta["tag"] = [*meta.get("tag", []), tag]


@functools.cache
def _units_file() -> dict[str, Any]:
    with UNITS_FILE.open("rb") as fh:
        return tomllib.load(fh)


@functools.cache
def _ucum_parser() -> Any:
    from ucumvert import get_ucum_parser

    return get_ucum_parser()


@functools.cache
def _registry() -> Any:
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()
