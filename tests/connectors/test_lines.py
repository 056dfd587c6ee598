"""`connectors._lines`: whatever the bytes, the chunk sizes, the limit and the lines skipped,
the lines come out as `bytes.split` gives them, and each line over the limit is one problem."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors import _lines
from connectors._lines import FileLines

Lines = list[tuple[int, bytes]]


def expected(data: bytes, max_line: int, skip: int) -> tuple[Lines, list[int]]:
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    kept = [(n, line) for n, line in enumerate(parts, 1) if n > skip]
    return [(n, line) for n, line in kept if len(line) <= max_line], [
        n for n, line in kept if len(line) > max_line
    ]


def read(path: Path, max_line: int, skip: int, hint: int) -> tuple[Lines, list[int]]:
    lines: Lines = []
    over: list[int] = []
    for first, chunk, problem in FileLines(path, max_line=max_line).chunks(skip=skip, hint=hint):
        lines += enumerate(chunk, first)
        if problem:
            over.append(problem[1])
    return lines, over


@settings(max_examples=300, deadline=None)
@given(
    # Text (bytes that start a gzip stream make a file gzip, whatever its name)
    lines=st.lists(st.text('ab{}"é\r\t ', max_size=40).map(str.encode), max_size=30),
    final_newline=st.booleans(),
    read_size=st.sampled_from([1, 3, 16, 100, 1 << 20]),
    max_line=st.sampled_from([1, 5, 20, 1 << 20]),
    skip=st.integers(0, 12),
    hint=st.sampled_from([1, 50, 1 << 20]),
    gzipped=st.booleans(),
)
def test_lines_match_a_plain_split(
    lines: list[bytes],
    final_newline: bool,
    read_size: int,
    max_line: int,
    skip: int,
    hint: int,
    gzipped: bool,
) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as folder:
        # Chunks of every size against every limit: the path that takes whole lines at once
        # (a chunk no longer than the limit) and the one that looks at each.
        patch.setattr(_lines, "READ_SIZE", read_size)
        path = Path(folder) / ("f.ndjson.gz" if gzipped else "f.ndjson")
        path.write_bytes(gzip.compress(data) if gzipped else data)
        assert read(path, max_line, skip, hint) == expected(data, max_line, skip)
