from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from connectors.errors import SourceError
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from tests.support.data import write_ndjson


def connector(path: Path, batch_mb: int = 32) -> FhirNdjsonConnector:
    return FhirNdjsonConnector(FhirNdjsonSource(name="t", kind="fhir-ndjson", path=path, batch_mb=batch_mb))


def patients(n: int, pad: int = 0) -> list[dict[str, object]]:
    return [{"resourceType": "Patient", "id": f"p{i}", "note": "x" * pad} for i in range(n)]


def rows(batches: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    return [(Path(r["file"]).name, r["line_no"]) for b in batches for r in b.records.to_pylist()]


def test_reads_plain_and_gzip_with_line_numbers(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "Patient.ndjson", patients(3))
    plain = (tmp_path / "Patient.ndjson").read_bytes()
    (tmp_path / "More.ndjson.gz").write_bytes(gzip.compress(plain))
    batches = list(connector(tmp_path).pull(None))
    assert rows(batches) == [("More.ndjson.gz", i) for i in (1, 2, 3)] + [
        ("Patient.ndjson", i) for i in (1, 2, 3)
    ]
    assert batches[-1].watermark["files"][str(tmp_path / "Patient.ndjson")]["complete"]


def test_batches_are_bounded_by_size(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "Patient.ndjson", patients(3000, pad=1000))  # ~3 MB
    batches = list(connector(tmp_path, batch_mb=1).pull(None))
    assert len(batches) >= 3
    assert all(b.records["raw"].nbytes < 6 << 20 for b in batches)
    assert sum(len(b) for b in batches) == 3000


def test_unchanged_files_are_skipped_and_cut_files_resume(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "Patient.ndjson", patients(3000, pad=1000))
    first = list(connector(tmp_path, batch_mb=1).pull(None))
    assert list(connector(tmp_path).pull(first[-1].watermark)) == []
    resumed = list(connector(tmp_path, batch_mb=1).pull(first[0].watermark))
    assert rows(first[:1]) + rows(resumed) == rows(first)


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = write_ndjson(tmp_path / "Patient.ndjson", patients(2))
    mark = list(connector(tmp_path).pull(None))[-1].watermark
    write_ndjson(path, patients(3))
    assert len(rows(list(connector(tmp_path).pull(mark)))) == 3


def test_invalid_utf8_is_flagged_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "Patient.ndjson").write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    records = next(iter(connector(tmp_path).pull(None))).records.to_pylist()
    assert [r["bad_utf8"] for r in records] == [False, True]


def test_missing_path_names_the_source_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"source 't': path .* does not exist; point sources.path"):
        list(connector(tmp_path / "nope").pull(None))
