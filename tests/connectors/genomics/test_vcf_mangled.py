"""Property tests: mangled VCF files (noise in fields, cut lines, wrong column counts, broken
headers, damaged gzip) go through the real connector and the real store. A broken header
quarantines the file whole; otherwise what can be read lands (with warnings for what breaks the
spec) and the records htslib cannot read, or damage, are quarantined with a reason. Never an
exception, and the run's counts match what the store holds."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connectors.genomics.vcf import VcfConnector, VcfSource
from flows.sync import land_batches
from tests.support.vcf import HEADER, RECORDS
from twin_store import TwinStore

CLEAN = (HEADER + "\n".join(RECORDS) + "\n").encode()
NOISE = st.binary(max_size=10) | st.text(
    alphabet=st.sampled_from(list("\t\n;:,=<>[]./|*-+0123456789ACGTNacgtn#\"' \x00é")), max_size=10
).map(str.encode)
NAMES = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for all examples (opening one costs more than an example); each example lands
    as its own source so its counts can be compared with what the store holds for it."""
    return tmp_path_factory.mktemp("vcf-mangled")


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    data = CLEAN
    for _ in range(draw(st.integers(1, 5))):
        lines = data.split(b"\n")
        body = len(HEADER) if draw(st.integers(0, 3)) else 0  # mostly in the records
        at = draw(st.integers(min(body, len(data)), len(data)))
        match draw(st.sampled_from(["noise", "cut", "line", "truncate", "column"])):
            case "noise":  # random bytes in some field
                data = data[:at] + draw(NOISE) + data[at + draw(st.integers(0, 6)) :]
            case "cut":  # part of a line (or of two) missing
                data = data[:at] + data[at + draw(st.integers(1, 40)) :]
            case "line":  # a line repeated or dropped
                n = draw(st.integers(0, len(lines) - 1))
                twice = draw(st.booleans())
                lines[n : n + 1] = [lines[n], lines[n]] if twice else []
                data = b"\n".join(lines)
            case "truncate":  # the file ends early
                data = data[:at]
            case "column":  # a column too many or too few
                n = draw(st.integers(0, len(lines) - 1))
                columns = lines[n].split(b"\t")
                del columns[draw(st.integers(0, len(columns) - 1))]
                lines[n] = b"\t".join(columns * draw(st.integers(1, 2)))
                data = b"\n".join(lines)
    return data


@st.composite
def files(draw: st.DrawFn) -> tuple[str, bytes]:
    data = draw(mangled())
    if not draw(st.booleans()):
        return "calls.vcf", data
    packed = bytearray(gzip.compress(data))
    for _ in range(draw(st.integers(0, 1))):  # damage: flipped bytes, or the end cut off
        at = draw(st.integers(0, len(packed) - 1))
        packed[at] ^= draw(st.integers(1, 255))
    return "calls.vcf.gz", bytes(
        packed[: draw(st.integers(1, len(packed)))] if draw(st.booleans()) else packed
    )


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_a_mangled_vcf_lands_what_it_can_and_quarantines_the_rest(
    folder: Path, file: tuple[str, bytes]
) -> None:
    name, data = file
    source_name = f"s{next(NAMES)}"
    path = folder / "in" / source_name / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    source = VcfSource(name=source_name, kind="vcf", path=path, samples={"S1": "p1"})
    with TwinStore(folder / "store") as store:
        run = store.begin_run(source_name, "sync")
        land_batches(store, run, VcfConnector(source).pull(None))
        store.finish_run(run, "succeeded")
        held = store.con.execute(
            """SELECT (SELECT count(*) FROM twin.genomic_variant WHERE source = $s),
                      (SELECT count(*) FROM twin.quarantine WHERE source = $s),
                      (SELECT count(*) FROM twin.ingest_warning WHERE source = $s),
                      (SELECT count(*) FROM twin.quarantine WHERE source = $s AND reason = '')""",
            {"s": source_name},
        ).fetchone()
    assert held is not None
    variants, quarantined, warned, without_reason = held
    assert (variants, quarantined, warned) == (
        run.counts["inserted"],
        run.counts["quarantined"],
        run.counts["warnings"],
    )
    assert without_reason == 0
    if quarantined:
        event("nothing landed" if not variants else "landed in part")
    else:
        event("landed with warnings" if warned else "landed clean")
    assert run.counts["updated"] == 0
