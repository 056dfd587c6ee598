"""Golden files: what a conversion makes from committed inputs, committed beside them as pretty
JSON (keys sorted, numbers exactly as the conversion wrote them), compared as text, rewritten by
`pytest tests/golden --update-golden`."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

UPDATE = ".venv/bin/pytest tests/golden --update-golden"


class Number(str):
    """A JSON number kept as written: 5.50 stays 5.50 (a float would print 5.5), since keeping
    a lab's decimals is part of what the conversions promise."""


def loads(text: str | bytes) -> Any:
    """JSON with its decimals kept as written (see `Number`)."""
    return json.loads(text, parse_float=Number)


def pretty(data: Any) -> str:
    """Indented JSON with sorted keys and a final newline: a change shows as a short line diff."""
    options = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS
    return orjson.dumps(data, default=_number, option=options).decode() + "\n"


def _number(value: Any) -> orjson.Fragment:
    if isinstance(value, Number):
        return orjson.Fragment(str.__str__(value))
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to a golden file")


def check(expected: Path, data: Any, *, update: bool) -> None:
    """Compare `data` with the golden file `expected` (or, with `update`, rewrite the file)."""
    got = pretty(data)
    if update:
        expected.write_text(got)
        return
    if not expected.is_file():
        pytest.fail(f"no golden file {expected}; make it with `{UPDATE}` and review it", pytrace=False)
    want = expected.read_text()
    if got != want:
        diff = list(difflib.unified_diff(want.splitlines(), got.splitlines(), "committed", "made now", n=2))
        shown = "\n".join(line.rstrip("\n") for line in diff[:60])
        more = f"\n... and {len(diff) - 60} more diff lines" if len(diff) > 60 else ""
        pytest.fail(
            f"the conversion's output differs from {expected}:\n{shown}{more}\n"
            f"If the change is intended, run `{UPDATE}` and review `git diff tests/golden`.",
            pytrace=False,
        )
