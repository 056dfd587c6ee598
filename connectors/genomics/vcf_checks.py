"""VCF 4.1-4.5 spec checks, on the file's text, before htslib reads it.

A broken header (no `##fileformat=VCFv4.x` first, a meta line that does not parse, a
declaration with a bad ID, Number, Type or Description, a wrong `#CHROM` line) makes the file
unreadable as VCF: `check_header` raises `VcfSpecError` naming the line and the rule, and the
connector quarantines the file whole. Everything a record breaks (its CHROM, POS, ID, REF, ALT,
QUAL, FILTER, INFO, FORMAT and sample columns, duplicates and sort order) is a warning: the
record still lands, and `check_text` says which line broke which rule.

Record rules (`RECORD_RULES`) are SQL predicates run by DuckDB over a chunk of lines at once,
all in one query: per line (POS, the column count), per distinct value of a column (CHROM, ID,
REF, ALT, QUAL, FILTER, FORMAT, INFO), per distinct INFO entry, GT and sample value. Values
repeat from line to line, so each is judged once and only from a failing one the way back to
its lines is taken. A sample column that fully matches the regex made for its shape (FORMAT,
number of ALT alleles, ploidy) from the declared Types and Numbers breaks no value rule, so only
the others are split into values. No Python loop per record. Sort order and duplicates are
checked within a chunk (500,000 lines).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from connectors.base import PROBLEM_SCHEMA

VERSIONS = ("VCFv4.1", "VCFv4.2", "VCFv4.3", "VCFv4.4", "VCFv4.5")
BAD_POS = " is not a positive integer"
COLUMNS_RULE = " tab-separated columns, not "
"""Part of the reason for a record with too few or too many columns."""
"""The reason's end for a record whose POS is negative or not a number: the connector quarantines
it. POS 0 is valid (a telomere, VCF 4.3 section 1.6.1), as the conformance suite's passed files say."""
COLUMNS = ("#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO")
TYPES = {"Integer", "Float", "Flag", "Character", "String"}
ALT_TYPES = ("DEL", "INS", "DUP", "INV", "CNV", "BND", "CNV:TR")

# Reserved keys and the (Number, Type) the spec (4.3, section 1.6.1) gives them.
RESERVED_INFO = {
    "AA": ("1", "String"),
    "AC": ("A", "Integer"),
    "AD": ("R", "Integer"),
    "ADF": ("R", "Integer"),
    "ADR": ("R", "Integer"),
    "AF": ("A", "Float"),
    "AN": ("1", "Integer"),
    "BQ": ("1", "Float"),
    "CIGAR": ("A", "String"),
    "DB": ("0", "Flag"),
    "DP": ("1", "Integer"),
    "END": ("1", "Integer"),
    "H2": ("0", "Flag"),
    "H3": ("0", "Flag"),
    "MQ": ("1", "Float"),
    "MQ0": ("1", "Integer"),
    "NS": ("1", "Integer"),
    "SOMATIC": ("0", "Flag"),
    "VALIDATED": ("0", "Flag"),
    "1000G": ("0", "Flag"),
}
RESERVED_FORMAT = {
    "AD": ("R", "Integer"),
    "ADF": ("R", "Integer"),
    "ADR": ("R", "Integer"),
    "DP": ("1", "Integer"),
    "EC": ("A", "Integer"),
    "FT": ("1", "String"),
    "GL": ("G", "Float"),
    "GP": ("G", "Float"),
    "GQ": ("1", "Integer"),
    "GT": ("1", "String"),
    "HQ": ("2", "Integer"),
    "MQ": ("1", "Integer"),
    "PL": ("G", "Integer"),
    "PQ": ("1", "Integer"),
    "PS": ("1", "Integer"),
}

NOT_NEGATIVE = ("AC", "AD", "ADF", "ADR", "AF", "AN", "BQ", "DP", "END", "MQ", "MQ0", "NS")
"""Reserved INFO keys that count or measure something, so are never negative."""
META_KEY = re.compile(r"[A-Za-z_][0-9A-Za-z_.-]*")
KEY = r"[A-Za-z_][0-9A-Za-z_.]*|1000G"
"""INFO and FORMAT keys (and the IDs that declare them)."""
CHROM = r"<[0-9A-Za-z!#$%&+./;=?@^_|~-]+>|[0-9A-Za-z!#$%&+./;?@^_|~-][0-9A-Za-z!#$%&+./;=?@^_|~-]*"
"""Contig names (4.3 on): no whitespace, commas, colons, asterisks or stray angle brackets."""


def contig_pattern(version: str) -> str:
    """4.1 and 4.2 allow an asterisk in contig names."""
    return CHROM if version >= "VCFv4.3" else CHROM.replace("+./", "*+./")


NAME = re.compile(r"[0-9A-Za-z!#$%&+./;=?@^_|~-]+")
"""Sample and pedigree names in meta lines."""
URL = re.compile(
    r"<[^<>]+>|[a-z]+://([^\s/@]+@)?([0-9]+(\.[0-9]+){3}|[A-Za-z0-9-]*[A-Za-z][A-Za-z0-9.-]*)(:[0-9]+)?(/\S*)?"
)
ID_VALUE = re.compile(r"[^\s,<>]+")
INTEGER = r"[+-]?[0-9]+"
FLOAT = r"[+-]?([0-9]+\.?[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?|(?i:inf|infinity|nan))"
BASES = r"[ACGTNacgtn]+"
ALLELE = (
    rf"{BASES}|\*|<[^<>\s,]+>|\.{BASES}|{BASES}\."
    rf"|{BASES}[\[\]][^\[\]\s,]+:[0-9]+[\[\]]|[\[\]][^\[\]\s,]+:[0-9]+[\[\]]{BASES}"
)
"""An ALT allele: bases, `*`, a symbolic <ID>, a single or a paired breakend."""
GENOTYPE = r"[/|]?(\.|[0-9]+)([/|](\.|[0-9]+))*"
INT_MIN, INT_MAX = -(2**31) + 8, 2**31 - 1
"""htslib reserves the eight smallest 32-bit integers for missing and end-of-vector values."""


class VcfSpecError(Exception):
    """The file is not VCF the spec describes: where and why."""

    def __init__(self, line_no: int, reason: str, raw: str = "") -> None:
        super().__init__(f"line {line_no}: {reason}")
        self.line_no, self.reason, self.raw = line_no, reason, raw


@dataclass(kw_only=True)
class Header:
    version: str
    lines: int
    """How many header lines (with the #CHROM line): data line k is file line `lines + k`."""
    samples: list[str]
    info: dict[str, tuple[str, str]] = field(default_factory=dict)
    format: dict[str, tuple[str, str]] = field(default_factory=dict)
    warnings: list[tuple[int, str, str]] = field(default_factory=list)
    """Header lines that break a rule without making the file unreadable: (line, reason, raw)."""


def check_header(lines: list[str]) -> Header:
    """Parse and check the header lines (the `##` lines and the `#CHROM` line)."""
    if not lines or not lines[0].startswith("##fileformat="):
        raise VcfSpecError(1, "the first line must be ##fileformat=VCFv4.x", lines[0] if lines else "")
    version = lines[0].removeprefix("##fileformat=")
    if version not in VERSIONS:
        raise VcfSpecError(
            1, f"unknown fileformat {version!r} (expected one of {', '.join(VERSIONS)})", lines[0]
        )
    header = Header(version=version, lines=len(lines), samples=[])
    for n, line in enumerate(lines[1:-1], start=2):
        _check_meta(header, n, line)
    _check_columns(header, len(lines), lines[-1])
    return header


def _check_meta(header: Header, n: int, line: str) -> None:
    if not line.startswith("##"):
        raise VcfSpecError(n, "a header line must start with ## (or be the #CHROM line, last)", line)
    key, eq, value = line[2:].partition("=")
    if not eq or not META_KEY.fullmatch(key):
        raise VcfSpecError(n, "a meta line must be ##key=value with a key of letters, digits, _ . -", line)
    if not value:
        raise VcfSpecError(n, f"meta line {key} has an empty value", line)
    if key in ("assembly", "pedigreeDB") and not URL.fullmatch(value):
        raise VcfSpecError(n, f"##{key} must be a URL (or <ID=...>)", line)
    structured = ("INFO", "FORMAT", "FILTER", "ALT", "contig", "SAMPLE", "PEDIGREE", "META")
    if not value.startswith("<") and key not in structured:
        return
    if not (value.startswith("<") and value.endswith(">")):
        raise VcfSpecError(n, f"structured meta line {key} is not closed with >", line)
    if key not in structured:
        return
    fields = _fields(n, line, value[1:-1])
    names = [name for name, _, _ in fields]
    attrs = {name: (text, quoted) for name, text, quoted in fields}
    if (
        key in structured[:6] or key == "META" or (key == "PEDIGREE" and header.version >= "VCFv4.3")
    ) and "ID" not in attrs:
        raise VcfSpecError(n, f"{key} line has no ID", line)
    ident = attrs.get("ID", ("", False))[0]
    if key in ("INFO", "FORMAT"):
        _check_declaration(header, n, line, key, names, attrs)
    elif key == "ALT":
        if names[:1] != ["ID"] or ("Description" in attrs and names[1] != "Description"):
            raise VcfSpecError(n, "ALT fields must come in the order ID, Description", line)
        if not ID_VALUE.fullmatch(ident) or (":" in ident and not ident.startswith(ALT_TYPES)):
            types = ", ".join(ALT_TYPES)
            raise VcfSpecError(
                n,
                f"ALT ID {ident!r} must start with one of {types} when it has a ':' "
                "and hold no whitespace, commas or angle brackets",
                line,
            )
        _check_number_type(n, line, "ALT", attrs)
    elif key == "contig" and not re.fullmatch(contig_pattern(header.version), ident):
        raise VcfSpecError(n, f"contig ID {ident!r} is not a valid contig name", line)
    elif (
        key == "SAMPLE"
        and header.version < "VCFv4.3"
        and not (
            {"Genomes", "Mixture", "Description"} <= set(attrs)
            and all(quoted == (name == "Description") for name, (_, quoted) in attrs.items())
        )
    ):
        raise VcfSpecError(
            n,
            "a 4.1/4.2 SAMPLE line needs Genomes, Mixture and a quoted Description, "
            "and only the Description quoted",
            line,
        )
    elif key in ("SAMPLE", "PEDIGREE"):
        bad = [
            text
            for name, (text, quoted) in attrs.items()
            if not quoted and not NAME.fullmatch(text) and not (key == "SAMPLE" and name not in ("ID",))
        ]
        if bad:
            raise VcfSpecError(n, f"{key} value {bad[0]!r} holds characters a sample name cannot", line)
    elif key == "META":
        if names[:3] != ["ID", "Number", "Type"]:
            raise VcfSpecError(n, "META fields must come in the order ID, Number, Type, Values", line)
        _check_number_type(n, line, "META", attrs)
        values = attrs.get("Values", ("", False))[0]
        if not (values.startswith("[") and values.endswith("]")):
            raise VcfSpecError(n, "META Values must be a [list]", line)


def _check_declaration(
    header: Header, n: int, line: str, key: str, names: list[str], attrs: dict[str, tuple[str, bool]]
) -> None:
    ident = attrs["ID"][0]
    if names[:4] != ["ID", "Number", "Type", "Description"]:
        raise VcfSpecError(
            n, f"{key} fields must come first in the order ID, Number, Type, Description", line
        )
    if not re.fullmatch(KEY, ident):
        raise VcfSpecError(n, f"{key} ID {ident!r} must be letters, digits, _ and . (not first)", line)
    number, kind = _check_number_type(n, line, key, attrs)
    if key == "FORMAT" and kind == "Flag":
        raise VcfSpecError(n, "a FORMAT field cannot be of Type Flag", line)
    if not attrs["Description"][1]:
        raise VcfSpecError(n, f"{key} Description must be in double quotes", line)
    reserved = (RESERVED_INFO if key == "INFO" else RESERVED_FORMAT).get(ident)
    if reserved and reserved != (number, kind):
        header.warnings.append(
            (n, f"reserved {key} {ident} must be Number={reserved[0]}, Type={reserved[1]}", line)
        )
    (header.info if key == "INFO" else header.format)[ident] = (number, kind)


def _check_number_type(n: int, line: str, key: str, attrs: dict[str, tuple[str, bool]]) -> tuple[str, str]:
    number, kind = attrs.get("Number", (".", False))[0], attrs.get("Type", ("String", False))[0]
    if not re.fullmatch(r"[0-9]+|[ARG.]|LA|LR|LG|P|M", number):
        raise VcfSpecError(n, f"{key} Number {number!r} must be an integer, A, R, G or .", line)
    if kind not in TYPES:
        raise VcfSpecError(n, f"{key} Type {kind!r} must be one of {', '.join(sorted(TYPES))}", line)
    return number, kind


def _fields(n: int, line: str, text: str) -> list[tuple[str, str, bool]]:
    """The key=value fields of a <...> meta line: (key, value, was quoted)."""
    fields, at = [], 0
    while at < len(text):
        eq = text.find("=", at)
        if eq < 0:
            raise VcfSpecError(n, f"field {text[at:]!r} is not key=value", line)
        name = text[at:eq]
        if not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_.-]*", name):
            raise VcfSpecError(n, f"field {name!r} is not key=value", line)
        if text.startswith('"', eq + 1):
            match = re.compile(r'"((?:[^"\\]|\\.)*)"(,|$)').match(text, eq + 1)
            if not match:
                raise VcfSpecError(
                    n, f"the quoted value of {name} is not closed, or has an unescaped quote", line
                )
            fields.append((name, match.group(1), True))
            at = match.end()
        else:
            end = text.find(",", eq + 1) if not text.startswith("[", eq + 1) else text.find("]", eq) + 1
            end = len(text) if end <= 0 else end
            value = text[eq + 1 : end]
            if not value or (re.search(r"\s", value) and not value.startswith("[")):
                raise VcfSpecError(
                    n, f"the value of {name} must be quoted (it is empty or holds spaces)", line
                )
            fields.append((name, value, False))
            at = end + 1 if text.startswith(",", end) else end
    return fields


def _check_columns(header: Header, n: int, line: str) -> None:
    columns = line.split("\t")
    if not line.startswith("#CHROM") or tuple(columns[:8]) != COLUMNS:
        raise VcfSpecError(
            n, "the header must end with a tab-separated #CHROM POS ID REF ALT QUAL FILTER INFO line", line
        )
    if len(columns) > 8 and columns[8] != "FORMAT":
        raise VcfSpecError(n, "the column after INFO must be FORMAT", line)
    if len(columns) == 9:
        raise VcfSpecError(n, "a FORMAT column needs at least one sample column after it", line)
    header.samples = columns[9:]
    if len(set(header.samples)) != len(header.samples) or not all(header.samples):
        raise VcfSpecError(n, "sample names must be unique and not empty", line)


# -- records ----------------------------------------------------------------------------------

# Which count a Number asks for, given n_alt alternate alleles and a ploidy.
EXPECTED = """CASE WHEN number = '.' OR n_alt = 0 AND number IN ('A', 'R', 'G') THEN NULL
    ELSE CASE number WHEN 'A' THEN n_alt WHEN 'R' THEN n_alt + 1
    WHEN 'G' THEN CAST(round(exp(lgamma(n_alt + ploidy + 1) - lgamma(ploidy + 1) - lgamma(n_alt + 1)))
        AS BIGINT)
    ELSE TRY_CAST(number AS BIGINT) END END"""
COUNT = "(length(val) - length(replace(val, ',', '')) + 1)"
"""How many comma-separated values a value holds."""


SPLIT = """
CREATE OR REPLACE TEMP TABLE rec AS
SELECT *, len(alts) AS n_alt, TRY_CAST(pos AS BIGINT) AS position FROM (
    SELECT line_no, f[1] AS chrom, f[2] AS pos, f[3] AS id, f[4] AS ref, f[5] AS alt, f[6] AS qual,
           f[7] AS filter, f[8] AS info, f[9] AS format, f[10:] AS samples, len(f) AS n_fields,
           CASE WHEN f[5] = '.' THEN [] ELSE string_split(f[5], ',') END AS alts
    FROM (SELECT line_no, string_split(line, chr(9)) AS f FROM body));
CREATE OR REPLACE TEMP TABLE info_line AS  -- each distinct INFO once: many lines share one
SELECT row_number() OVER () AS info_line, info, n_alt
FROM (SELECT DISTINCT info, n_alt FROM rec WHERE info <> '.' AND n_fields >= 8);
CREATE OR REPLACE TEMP TABLE info_entry AS
SELECT info_line, n_alt, entry, split_part(entry, '=', 1) AS key
FROM (SELECT info_line, n_alt, unnest(string_split(info, ';')) AS entry FROM info_line);
CREATE OR REPLACE TEMP TABLE info AS  -- each distinct entry once
SELECT i.*, d.number, d.kind, 2 AS ploidy FROM (
    SELECT entry, n_alt, key, CASE WHEN contains(entry, '=') THEN entry[strpos(entry, '=') + 1:] END AS val
    FROM (SELECT DISTINCT entry, n_alt, key FROM info_entry)) i
LEFT JOIN info_decl d USING (key);
CREATE OR REPLACE TEMP TABLE sample_at AS
SELECT *, CASE WHEN gt IS NULL THEN 2 ELSE strlen(gt) - strlen(replace(replace(gt, '/', ''), '|', '')) + 1
          END AS ploidy
FROM (SELECT line_no, n_alt, format, sample, s,
             CASE WHEN split_part(format, ':', 1) = 'GT' THEN split_part(sample, ':', 1) END AS gt
      FROM (SELECT line_no, n_alt, format, unnest(samples) AS sample, unnest(range(1, len(samples) + 1)) AS s
            FROM rec WHERE n_fields >= 10));
CREATE OR REPLACE TEMP TABLE gt AS  -- each distinct GT once
SELECT gt, n_alt,
       list_transform(regexp_split_to_array(gt, '[/|]'), a -> TRY_CAST(a AS INTEGER)) AS alleles
FROM (SELECT DISTINCT gt, n_alt FROM sample_at WHERE gt IS NOT NULL);
CREATE OR REPLACE TEMP TABLE shape AS  -- each distinct (FORMAT, n_alt, ploidy) of a sample column
SELECT row_number() OVER (ORDER BY count(*) DESC, format, n_alt, ploidy) AS shape, format, n_alt, ploidy
FROM sample_at GROUP BY format, n_alt, ploidy;
"""
SHAPE_KEYS = f"""
SELECT shape, key, kind, number, {EXPECTED.replace("ploidy", "coalesce(ploidy, 2)")} AS expected FROM (
    SELECT shape, n_alt, ploidy, unnest(string_split(format, ':')) AS key,
           unnest(range(1, len(string_split(format, ':')) + 1)) AS position
    FROM shape WHERE shape <= $shapes) LEFT JOIN format_decl USING (key)
ORDER BY shape, position
"""
"""The keys of the commonest shapes, with what their values must be."""
CELLS = """
CREATE OR REPLACE TEMP TABLE cell AS  -- each distinct sample column that needs a closer look, once
SELECT row_number() OVER () AS cell, format, n_alt, sample, ploidy, string_split(format, ':') AS keys,
       string_split(sample, ':') AS vals
FROM (SELECT DISTINCT format, n_alt, sample, ploidy FROM sample_at JOIN shape USING (format, n_alt, ploidy)
      WHERE NOT ($clean));
"""
VALUES = """
CREATE OR REPLACE TEMP TABLE cell_value AS  -- only the values a declared Type or Number constrains
SELECT c.* FROM (
    SELECT cell, n_alt, ploidy, unnest(keys[:len(vals)]) AS key, unnest(vals[:len(keys)]) AS val FROM cell) c
SEMI JOIN (SELECT key FROM format_decl WHERE kind <> 'String' OR number <> '.') USING (key)
WHERE c.key <> 'GT';
CREATE OR REPLACE TEMP TABLE value AS  -- each distinct value once
SELECT v.*, d.number, d.kind FROM (SELECT DISTINCT key, val, n_alt, ploidy FROM cell_value) v
JOIN format_decl d USING (key);
"""
CLEAN_ITEMS = {"Integer": "[+-]?[0-9]{1,9}", "Float": FLOAT, "Character": "[^,:]", "String": "[^,:]*"}
"""Values of each Type that surely pass its rules (an Integer of at most 9 digits is in range)."""
MAX_SHAPES = MAX_KEYS = MAX_COUNT = 64
"""Regexes for at most this many shapes of a chunk, of at most this many keys and values each."""


def _clean_cells(keys: list[tuple[int, str, str | None, str | None, int | None]]) -> str:
    """SQL: true for a sample column that surely breaks no sample or value rule, because it fully
    matches a regex made for its shape from each key's Type and count. The rest (and shapes
    with no regex) are judged value by value; most columns of a file share a few shapes."""
    shapes: dict[int, list[str | None]] = {}
    for shape, key, kind, number, expected in keys:
        shapes.setdefault(shape, []).append(_clean_value(key, kind, number, expected))
    cases = []
    for shape, values in shapes.items():
        if len(values) <= MAX_KEYS and all(values):
            pattern = ""
            for value in reversed(values[1:]):  # a column may end before its last keys
                pattern = f"(:({value}){pattern})?"
            cases.append(f"WHEN {shape} THEN regexp_full_match(sample, '({values[0]}){pattern}')")
    return f"CASE shape {' '.join(cases)} ELSE false END" if cases else "false"


def _clean_value(key: str, kind: str | None, number: str | None, expected: int | None) -> str | None:
    """A regex for the values of `key` that pass the value rules, or None when there is none."""
    if key == "GT" or kind is None or (kind == "String" and number == "."):
        return "[^:]*"  # not judged as a value (GT has rules of its own)
    if kind not in CLEAN_ITEMS or (expected is not None and expected > MAX_COUNT):
        return None
    item = f"(({CLEAN_ITEMS[kind]})|\\.)?"
    if expected is None:
        return f"{item}(,{item})*"
    return "\\." if expected == 0 else f"\\.|{item}(,{item}){{{expected - 1}}}"


def _listed(pattern: str) -> str:
    """A comma-separated list of values matching `pattern`, each possibly missing (. or empty)."""
    return f"(({pattern})|\\.)?(,(({pattern})|\\.)?)*"


def _typed(kind: str) -> str:
    """SQL: true when `val` holds a value that is not of the declared type (or out of range)."""
    return f"""CASE {kind}
        WHEN 'Integer' THEN NOT regexp_full_match(val, '{_listed(INTEGER)}')
            OR regexp_matches(val, '[0-9]{{10}}') AND list_bool_or(list_transform(string_split(val, ','),
                v -> NOT coalesce(TRY_CAST(v AS HUGEINT) BETWEEN {INT_MIN} AND {INT_MAX}, true)))
        WHEN 'Float' THEN NOT regexp_full_match(val, '{_listed(FLOAT)}')
        WHEN 'Character' THEN NOT regexp_full_match(val, '{_listed("[^,]")}')
        ELSE false END"""


RECORD_RULES: list[tuple[str, str, str]] = [
    # (table, reason: a SQL text expression, the condition that breaks the rule)
    (
        "rec",
        f"'a data line must have ' || $n_columns || '{COLUMNS_RULE}' || n_fields",
        "n_fields <> $n_columns",
    ),
    ("chrom", "'CHROM ' || chrom || ' is not a valid contig name'", "NOT regexp_full_match(chrom, $chrom)"),
    ("rec", f"'POS ' || pos || '{BAD_POS}'", "coalesce(position < 0, true)"),
    (
        "id",
        "'ID ' || id || ' must be . or ;-separated names without whitespace'",
        r"id <> '.' AND NOT regexp_full_match(id, '[^\s;]+(;[^\s;]+)*')",
    ),
    (
        "id",
        "'ID ' || id || ' names one identifier twice'",
        "id <> '.' AND len(list_distinct(string_split(id, ';'))) <> len(string_split(id, ';'))",
    ),
    ("ref", "'REF ' || ref || ' must be bases (A, C, G, T, N)'", f"NOT regexp_full_match(ref, '{BASES}')"),
    (
        "alt",
        "'ALT ' || alt || ' is not a list of alleles (bases, *, <ID> or breakends)'",
        f"alt <> '.' AND NOT list_bool_and(list_transform(string_split(alt, ','),"
        f" a -> regexp_full_match(a, '{ALLELE}')))",
    ),
    (
        "qual",
        "'QUAL ' || qual || ' must be . or a number >= 0'",
        f"qual <> '.' AND (NOT regexp_full_match(qual, '{FLOAT}') OR TRY_CAST(qual AS DOUBLE) < 0)",
    ),
    (
        "filter",
        "'FILTER ' || filter || ' must be PASS, . or ;-separated filter names'",
        r"filter <> '.' AND (NOT regexp_full_match(filter, '[^\s;]+(;[^\s;]+)*') OR contains(filter, ';.')"
        r" OR filter LIKE '.;%' OR list_contains(string_split(filter, ';'), '0')"
        " OR len(list_distinct(string_split(filter, ';'))) <> len(string_split(filter, ';')))",
    ),
    (
        "format",
        "'FORMAT ' || format || ' must be :-separated keys, GT first, each once'",
        "(NOT list_bool_and(list_transform(keys, k -> regexp_full_match(k, $format_key)))"
        " OR (list_contains(keys, 'GT') AND keys[1] <> 'GT') OR len(list_distinct(keys)) <> len(keys))",
    ),
    (
        "info",
        "'INFO ' || entry || ' is not key or key=value with a valid key'",
        rf"NOT regexp_full_match(key, '{KEY}') OR regexp_matches(entry, '\s')",
    ),
    ("info_line", "'INFO ' || info || ' names a key more than once'", "repeats > 1"),
    (
        "info",
        "'INFO ' || entry || ': ' || key || ' is a Flag and takes no value'",
        "kind = 'Flag' AND val IS NOT NULL AND val NOT IN ('0', '1')",
    ),
    ("info", "'INFO ' || entry || ': ' || key || ' needs a value'", "val IS NULL AND kind <> 'Flag'"),
    ("info", "'INFO ' || entry || ' is not of Type ' || kind", f"val IS NOT NULL AND {_typed('kind')}"),
    (
        "info",
        "'INFO ' || entry || ' does not have the number of values its Number says'",
        "val IS NOT NULL AND val <> '.' AND kind <> 'Flag' AND number <> 'G'"
        f" AND NOT (kind = 'String' AND starts_with(val, '\"')) AND {COUNT} <> ({EXPECTED})",
    ),
    (
        "info",
        "'INFO ' || entry || ': ' || key || ' cannot be negative'",
        f"list_contains({list(NOT_NEGATIVE)}, key) AND contains(val, '-')"
        " AND list_bool_or(list_transform(string_split(val, ','), v -> TRY_CAST(v AS DOUBLE) < 0))",
    ),
    (
        "info",
        "'INFO ' || entry || ' is not a CIGAR string'",
        f"key = 'CIGAR' AND NOT regexp_full_match(val, '{_listed('([0-9]+[MIDNSHPX=])+')}')",
    ),
    ("cell", "'sample ' || s || ' has more fields than FORMAT has keys'", "len(vals) > len(keys)"),
    (
        "gt",
        "'sample ' || s || ' genotype ' || gt || ' is not a valid GT'",
        f"NOT regexp_full_match(gt, '{GENOTYPE}')",
    ),
    (
        "gt",
        "'sample ' || s || ' genotype ' || gt || ' names an allele ALT does not have'",
        f"regexp_full_match(gt, '{GENOTYPE}') AND n_alt > 0 AND list_max(alleles) > n_alt",
    ),
    ("value", "'sample ' || s || ' ' || key || '=' || val || ' is not of Type ' || kind", _typed("kind")),
    (
        "value",
        "'sample ' || s || ' ' || key || '=' || val || ' does not have the number of values '"
        " || 'its Number says'",
        f"val <> '.' AND {COUNT} <> ({EXPECTED.replace('ploidy', 'coalesce(ploidy, 2)')})",
    ),
]
"""The rules' tables: `rec` has a row per data line; the others hold each distinct value once
(`JUDGED_ONCE`)."""

ORDER_RULES = """
WITH alleles AS (SELECT line_no, chrom, position AS pos, ref, unnest(alts) AS alt FROM rec),
trimmed AS (  -- one spelling per variant: drop the shared last bases, then the shared first ones
    SELECT *, CASE WHEN least(length(r), length(a)) > 1
                   THEN len(list_filter(range(1, least(length(r), length(a))), i -> r[1:i] = a[1:i]))
                   ELSE 0 END AS head
    FROM (SELECT *, ref[:length(ref) - tail] AS r, alt[:length(alt) - tail] AS a FROM (
        SELECT *, CASE WHEN least(length(ref), length(alt)) > 1  -- a SNV or a 1-base REF or ALT: none
                       THEN len(list_filter(range(1, least(length(ref), length(alt))),
                                            i -> ref[-i:] = alt[-i:]))
                       ELSE 0 END AS tail
        FROM alleles WHERE regexp_full_match(alt, '[ACGTNacgtn]+') AND pos IS NOT NULL))),
variant AS MATERIALIZED (
    SELECT line_no, chrom, pos + head AS start, r[head + 1:] AS trimmed_ref, a[head + 1:] AS trimmed_alt
    FROM trimmed),
twice AS (  -- a hash lookup finds the few variants spelled more than once
    SELECT chrom, start, upper(trimmed_ref) AS ref, upper(trimmed_alt) AS alt FROM variant
    GROUP BY ALL HAVING count(*) > 1),
dup AS (
    SELECT line_no, chrom, start, trimmed_ref, trimmed_alt, first_value(line_no) OVER w AS first_line,
           row_number() OVER w AS nth
    FROM variant v SEMI JOIN twice t ON v.chrom = t.chrom AND v.start = t.start
        AND upper(v.trimmed_ref) = t.ref AND upper(v.trimmed_alt) = t.alt
    WINDOW w AS (PARTITION BY chrom, start, upper(trimmed_ref), upper(trimmed_alt) ORDER BY line_no)),
runs AS (
    SELECT line_no, chrom, position AS pos, lag(chrom) OVER (ORDER BY line_no) AS before,
           lag(position) OVER (ORDER BY line_no) AS pos_before
    FROM rec WHERE NOT starts_with(chrom, '<')),
starts AS (  -- the first line of each run of one CHROM, and which run of that CHROM it starts
    SELECT line_no, chrom, row_number() OVER (PARTITION BY chrom ORDER BY line_no) AS nth
    FROM runs WHERE chrom IS DISTINCT FROM before)
SELECT line_no, 'variant ' || chrom || ':' || start || ' ' || trimmed_ref || '>' || trimmed_alt
       || ' is also on line ' || first_line
FROM dup WHERE nth > 1
UNION ALL
SELECT line_no, 'records are not sorted: POS ' || pos || ' comes after ' || pos_before
FROM runs WHERE chrom = before AND pos < pos_before
UNION ALL
SELECT line_no, 'records of ' || chrom || ' are not contiguous (it appeared before)' FROM starts WHERE nth > 1
"""


def _column(name: str) -> tuple[str, list[tuple[str, str]]]:
    """A column of the data lines, each distinct value once."""
    return f"SELECT DISTINCT {name} FROM rec", [(f"SELECT line_no, {name} FROM rec", name)]


LINES_OF_INFO = ("SELECT line_no, info, n_alt FROM rec", "info, n_alt")
LINES_OF_CELL = ("SELECT line_no, s, format, n_alt, sample FROM sample_at", "format, n_alt, sample")
JUDGED_ONCE: dict[str, tuple[str, list[tuple[str, str]]]] = {
    # table: (its distinct values, the way back to the lines (and samples) that hold one)
    "chrom": _column("chrom"),
    "id": _column("id"),
    "ref": _column("ref"),
    "alt": _column("alt"),
    "qual": _column("qual"),
    "filter": _column("filter"),
    "format": (
        "SELECT format, string_split(format, ':') AS keys FROM rec WHERE n_fields > 8 GROUP BY format",
        [("SELECT line_no, format FROM rec", "format")],
    ),
    "info_line": (
        "SELECT info_line, max(n) AS repeats FROM (SELECT info_line, count(*) AS n FROM info_entry"
        " GROUP BY info_line, key) GROUP BY info_line",
        [("FROM info_line", "info_line"), LINES_OF_INFO],
    ),
    "info": (
        "FROM info",
        [
            ("SELECT info_line, entry, n_alt FROM info_entry", "entry, n_alt"),
            ("SELECT info_line, info FROM info_line", "info_line"),
            LINES_OF_INFO,
        ],
    ),
    "cell": ("FROM cell", [LINES_OF_CELL]),
    "gt": ("FROM gt", [("SELECT line_no, s, gt, n_alt FROM sample_at", "gt, n_alt")]),
    "value": (
        "FROM value",
        [
            ("FROM cell_value", "key, val, n_alt, ploidy"),
            ("SELECT cell, format, sample FROM cell", "cell"),
            LINES_OF_CELL,
        ],
    ),
}
"""Values repeat from line to line (a no-call's sample column, PASS, an INFO of no-calls), so
each is judged once, and only from a failing one the way back to its lines is taken (in that
order: the lines are not joined to anything first)."""


def _rules_sql(table: str, rules: list[tuple[str, str]]) -> str:
    """The lines that break the rules of one table, with the reasons. Each row (each distinct
    value) is judged once against every rule, and a reason is written only for what fails."""
    broken = ", ".join(f"CASE WHEN {condition} THEN {n} END" for n, (_, condition) in enumerate(rules))
    reasons = " ".join(f"WHEN {n} THEN {reason}" for n, (reason, _) in enumerate(rules))
    values, way_back = JUDGED_ONCE.get(table, (f"FROM {table}", []))
    failing = f"SELECT * FROM (SELECT *, unnest([{broken}]) AS rule FROM ({values})) WHERE rule IS NOT NULL"
    for relation, shared in way_back:
        failing = f"SELECT * FROM ({relation}) JOIN ({failing}) USING ({shared})"
    reason = f"coalesce(CASE rule {reasons} END, 'a {table} rule fails')"
    return f"SELECT line_no, {reason} AS reason FROM ({failing})"


def _all_rules_sql(but: tuple[str, ...] = ()) -> str:
    tables: dict[str, list[tuple[str, str]]] = {}
    for table, reason, condition in RECORD_RULES:
        if table not in but:
            tables.setdefault(table, []).append((reason, condition))
    return " UNION ALL ".join(_rules_sql(table, rules) for table, rules in tables.items())


RULES_SQL = _all_rules_sql()
CLEAN_CELLS_RULES_SQL = _all_rules_sql(but=("cell", "value"))
"""When every sample column matched its shape's regex, the rules on sample columns and values
have nothing to judge (and planning them costs more than running them)."""


@functools.cache
def _database() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"threads": 1})


_OPENING = threading.Lock()


class RecordChecker:
    """Runs the record rules over chunks of data lines of one file, on a connection of its own
    (its own temp tables) to the process's one in-memory DuckDB: opening a database costs more
    than checking a small file, a connection to an open one next to nothing."""

    def __init__(self, header: Header) -> None:
        self.header = header
        with _OPENING:
            self.con = _database().cursor()
        info = {**RESERVED_INFO, **header.info}
        fmt = {**RESERVED_FORMAT, **header.format}
        for name, decl in (("info_decl", info), ("format_decl", fmt)):
            numbers, kinds = [number for number, _ in decl.values()], [kind for _, kind in decl.values()]
            self.con.register(name, pa.table({"key": list(decl), "number": numbers, "kind": kinds}))
        self.params = {
            "chrom": contig_pattern(header.version),
            "format_key": KEY,
            "n_columns": 8 + (len(header.samples) + 1 if header.samples else 0),
        }

    def close(self) -> None:
        self.con.close()

    def warnings(self, first_line: int, lines: list[str]) -> list[tuple[int, str, str]]:
        """(line, reason, text) for each rule a line of this chunk breaks; lines count from `first_line`."""
        if not lines:
            return []
        body = pa.table(
            {
                "line_no": pa.array(range(first_line, first_line + len(lines)), pa.int64()),
                "line": pa.array(lines, pa.string()),
            }
        )
        con = self.con
        con.register("body", body)
        try:
            con.execute(SPLIT)
            shapes = con.execute(SHAPE_KEYS, {"shapes": MAX_SHAPES}).fetchall()
            con.execute(CELLS.replace("$clean", _clean_cells(shapes)))
            (looked_at,) = con.execute("SELECT count(*) FROM cell").fetchone() or (0,)
            if looked_at:
                con.execute(VALUES)
            rules = RULES_SQL if looked_at else CLEAN_CELLS_RULES_SQL
            found = con.execute(f"({rules}) UNION ALL ({ORDER_RULES})", self.params).fetchall()
        finally:
            con.unregister("body")
        return [(n, reason, lines[n - first_line]) for n, reason in found]


def file_warnings(file: str, rows: Iterable[tuple[int, str, str]], limit: int = 1000) -> pa.Table:
    """The first `limit` warnings of a file as PROBLEM_SCHEMA rows (and one that counts the rest)."""
    kept: list[tuple[int, str, str]] = []
    more = 0
    for row in rows:
        if len(kept) < limit:
            kept.append(row)
        else:
            more += 1
    if more:
        kept.append((0, f"{more} more spec violations not recorded (only the first {limit} are)", ""))
    return pa.table(
        {
            "file": [file] * len(kept),
            "line_no": [r[0] for r in kept],
            "reason": [r[1] for r in kept],
            "raw": [r[2] for r in kept],
        },
        schema=PROBLEM_SCHEMA,
    )


def check_text(file: str, text: str, *, chunk_lines: int = 500_000) -> pa.Table:
    """The warnings of a whole VCF text; raises `VcfSpecError` when its header is broken."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise VcfSpecError(1, "the file is empty")
    n_header = next((n for n, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header = check_header(lines[:n_header])
    found = list(header.warnings)
    if not text.endswith("\n"):
        found.append((len(lines), "the last line does not end with a newline", lines[-1]))
    checker = RecordChecker(header)
    try:
        for start in range(n_header, len(lines), chunk_lines):
            found += checker.warnings(start + 1, lines[start : start + chunk_lines])
    finally:
        checker.close()
    return file_warnings(file, sorted(found))
