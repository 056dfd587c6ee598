from __future__ import annotations

import gzip
import subprocess
import sys
import zlib
from pathlib import Path

import orjson
import pytest

from connectors.errors import SourceError
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from tests.support.data import ROOT, write_ndjson


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


def test_a_line_over_max_line_mb_is_quarantined_with_its_start_and_the_rest_lands(tmp_path: Path) -> None:
    big = '{"resourceType": "Binary", "id": "b", "data": "' + "A" * (3 << 20) + '"}'
    write_ndjson(tmp_path / "Binary.ndjson", [*patients(2), big, *patients(1)])
    batches = list(
        FhirNdjsonConnector(
            FhirNdjsonSource(name="t", kind="fhir-ndjson", path=tmp_path, max_line_mb=1)
        ).pull(None)
    )
    assert [n for _, n in rows(batches)] == [1, 2, 4]
    (problem,) = [p for b in batches for p in b.problems.to_pylist()]
    assert (problem["line_no"], len(problem["raw"])) == (3, 64 << 10)
    assert big.startswith(problem["raw"])
    assert problem["reason"] == (
        "line 3 is 3.0 MB, over the source's max_line_mb = 1; its first 64 KiB are kept; "
        "raise max_line_mb to land it"
    )
    assert batches[-1].watermark["files"][str(tmp_path / "Binary.ndjson")]["lines"] == 4


def test_a_cut_gzip_file_yields_every_whole_line_before_the_cut_and_resumes_no_further(
    tmp_path: Path,
) -> None:
    lines = [orjson.dumps(p) for p in patients(20_000)]
    data = gzip.compress(b"\n".join(lines) + b"\n")
    (tmp_path / "Patient.ndjson.gz").write_bytes(data[: len(data) // 2])
    whole = zlib.decompressobj(wbits=31).decompress(data[: len(data) // 2]).count(b"\n")
    batches = list(connector(tmp_path, batch_mb=1).pull(None))
    got = [r["raw"].encode() for b in batches for r in b.records.to_pylist()]
    assert got == lines[:whole]
    (problem,) = [p for b in batches for p in b.problems.to_pylist()]
    assert problem["line_no"] == whole + 1
    assert problem["reason"].startswith(f"file damaged after line {whole:,} (byte ")
    assert lines[whole].startswith(problem["raw"].encode())
    mark = batches[-1].watermark
    assert mark["files"][str(tmp_path / "Patient.ndjson.gz")]["complete"], "damaged: not read again"
    assert list(connector(tmp_path).pull(mark)) == []


MEASURE = """
import json, sys
from pathlib import Path
from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource

source = FhirNdjsonSource(name="big", kind="fhir-ndjson", path=Path(sys.argv[1]))
counted = {"records": 0, "problems": 0}
for batch in FhirNdjsonConnector(source).pull(None):
    counted["records"] += batch.records.num_rows
    counted["problems"] += batch.problems.num_rows
status = Path("/proc/self/status").read_text().splitlines()  # this process's own peak
counted["max_rss_mb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
print(json.dumps(counted))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["big.ndjson", "big.ndjson.gz"])
def test_a_200_mb_line_is_quarantined_in_bounded_memory(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    chunk = b"A" * (1 << 20)
    with gzip.open(path, "wb", compresslevel=1) if name.endswith(".gz") else path.open("wb") as fh:
        fh.write(b'{"resourceType": "Patient", "id": "a"}\n{"resourceType": "Binary", "data": "')
        for _ in range(200):
            fh.write(chunk)
        fh.write(b'"}\n{"resourceType": "Patient", "id": "b"}\n')
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    counted = orjson.loads(done.stdout)
    assert (counted["records"], counted["problems"]) == (2, 1)
    assert counted["max_rss_mb"] < 1024, counted
    print(f"{name}: peak RSS {counted['max_rss_mb']:.0f} MB")
