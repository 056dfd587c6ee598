"""VCF files into the columnar genomic_variant table, through the real pipeline and store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.genomics.vcf import VcfConnector, VcfSource
from flows.sync import land_batches
from tests.support.data import SHARED
from tests.support.vcf import HEADER, RECORDS, write_vcf
from twin_store import RunReport, TwinStore, connect


def sync(store: Path, source: VcfSource) -> RunReport:
    with TwinStore(store) as st:
        run = st.begin_run(source.name, "sync")
        land_batches(st, run, VcfConnector(source).pull(st.watermark(source.name)))
        return st.finish_run(run, "succeeded")


def test_each_carried_allele_of_each_sample_is_a_row(tmp_path: Path) -> None:
    source = VcfSource(
        name="seq", kind="vcf", path=write_vcf(tmp_path / "calls.vcf", RECORDS), samples={"S1": "p1"}
    )
    report = sync(tmp_path / "store", source)
    assert (report.counts["lines_read"], report.counts["inserted"]) == (5, 5)
    rows = (
        connect(tmp_path / "store")
        .sql(
            """SELECT sample, patient_id, assembly, pos, variant_id, alt, genotype, zygosity, phase_set,
                  filter, gene, hgvs_c, hgvs_p, clinvar_significance
           FROM genomic_variant ORDER BY pos, sample, alt"""
        )
        .fetchall()
    )
    assert rows == [
        (
            "S1",
            "seq/p1",  # a plain id names the source's own twin: its key
            "GRCh38",
            112841059,
            "rs459552",
            "A",
            "0|1",
            "heterozygous",
            112841000,
            "PASS",
            "APC",
            "c.5465T>A",
            "p.Val1822Asp",
            "Benign",
        ),
        (
            "S2",
            None,
            "GRCh38",
            112841059,
            "rs459552",
            "A",
            "1/1",
            "homozygous",
            None,
            "PASS",
            "APC",
            "c.5465T>A",
            "p.Val1822Asp",
            "Benign",
        ),
        (
            "S1",
            "seq/p1",
            "GRCh38",
            112841100,
            None,
            "C",
            "1/2",
            "heterozygous",
            None,
            "LowQual",
            None,
            None,
            None,
            None,
        ),
        (
            "S1",
            "seq/p1",
            "GRCh38",
            112841100,
            None,
            "T",
            "1/2",
            "heterozygous",
            None,
            "LowQual",
            None,
            None,
            None,
            None,
        ),
        (
            "S2",
            None,
            "GRCh38",
            112841200,
            None,
            "G",
            "0/1",
            "heterozygous",
            None,
            "PASS",
            None,
            None,
            None,
            None,
        ),
    ]


def test_a_changed_file_replaces_its_rows_and_an_unreadable_one_is_quarantined(tmp_path: Path) -> None:
    folder = tmp_path / "vcfs"
    folder.mkdir()
    write_vcf(folder / "calls.vcf", RECORDS)
    (folder / "broken.vcf").write_text(HEADER + "chr5\t1\t.\tA\tG\t.\t.\t.\tGT\t0/1\n")  # one sample of two
    source = VcfSource(name="seq", kind="vcf", path=folder)
    first = sync(tmp_path / "store", source)
    assert sync(tmp_path / "store", source).counts["lines_read"] == 0, "unchanged files are not read"
    write_vcf(folder / "calls.vcf", RECORDS[:1])
    again = sync(tmp_path / "store", source)
    con = connect(tmp_path / "store")
    assert (first.counts["inserted"], first.counts["quarantined"]) == (5, 1)
    assert (again.counts["inserted"], again.counts["updated"]) == (0, 2)
    (reason,) = con.sql("SELECT reason FROM quarantine").fetchone() or ("",)
    assert reason == "a data line must have 11 tab-separated columns, not 10", "the record, not the file"
    assert con.sql("SELECT count(*), count(DISTINCT (sample, pos, alt)) FROM genomic_variant").fetchone() == (
        5,
        5,
    )


def test_calls_landed_again_by_the_same_writer_replace_the_first(tmp_path: Path) -> None:
    """The writer skips the look for calls to replace only for samples it has no calls of yet;
    a sample landed earlier in the same session (another file, a changed one) is looked at."""
    folder = tmp_path / "vcfs"
    folder.mkdir()
    write_vcf(folder / "a.vcf", RECORDS)
    write_vcf(folder / "b.vcf", RECORDS[:1])  # S1's and S2's calls at 112841059 again
    source = VcfSource(name="seq", kind="vcf", path=folder, batch_variants=2)
    with TwinStore(tmp_path / "store") as store:
        first = store.begin_run("seq", "sync")
        land_batches(store, first, VcfConnector(source).pull(None))
        store.finish_run(first, "succeeded")
        write_vcf(folder / "a.vcf", RECORDS[1:])
        again = store.begin_run("seq", "sync")
        land_batches(store, again, VcfConnector(source).pull(store.watermark("seq")))
        store.finish_run(again, "succeeded")
    assert (first.counts["inserted"], first.counts["updated"]) == (5, 2)
    assert (again.counts["inserted"], again.counts["updated"]) == (0, 3)
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*), count(DISTINCT (sample, pos, alt)) FROM genomic_variant").fetchone() == (
        5,
        5,
    )


def test_an_annotation_key_the_header_does_not_declare_is_still_read(tmp_path: Path) -> None:
    """Records are asked only for the annotation keys the header declares, unless one turns up."""
    undeclared = RECORDS[1].replace("\t.\tGT:PS", "\tALLELEID=15041;GENEINFO=MUTYH:4595\tGT:PS")
    path = write_vcf(tmp_path / "calls.vcf", [RECORDS[0], undeclared])
    sync(tmp_path / "store", VcfSource(name="seq", kind="vcf", path=path))
    rows = connect(tmp_path / "store").sql(
        "SELECT pos, alt, gene, clinvar_allele_id FROM genomic_variant WHERE sample = 'S1' ORDER BY ALL"
    )
    assert rows.fetchall() == [
        (112841059, "A", "APC", None),
        (112841100, "C", "MUTYH", "15041"),
        (112841100, "T", "MUTYH", "15041"),
    ]


def test_a_record_without_genotypes_makes_no_rows(tmp_path: Path) -> None:
    no_gt = "chr5\t112841150\t.\tC\tG\t.\tPASS\t.\tPS\t7\t8"
    report = sync(
        tmp_path / "store",
        VcfSource(
            name="seq", kind="vcf", path=write_vcf(tmp_path / "calls.vcf", [RECORDS[0], no_gt, RECORDS[2]])
        ),
    )
    rows = connect(tmp_path / "store").sql("SELECT pos, sample FROM genomic_variant ORDER BY ALL").fetchall()
    assert (report.counts["inserted"], report.counts["quarantined"]) == (3, 0)
    assert rows == [(112841059, "S1"), (112841059, "S2"), (112841200, "S2")]


def test_a_record_that_breaks_the_spec_lands_with_a_warning_kept_once(tmp_path: Path) -> None:
    bad = RECORDS[1].replace("\t50\t", "\t-50\t")  # QUAL cannot be negative
    path = write_vcf(tmp_path / "calls.vcf", [RECORDS[0], bad, RECORDS[2]])
    source = VcfSource(name="seq", kind="vcf", path=path)
    first = sync(tmp_path / "store", source)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # read again, same text
    again = sync(tmp_path / "store", source)
    con = connect(tmp_path / "store")
    assert (first.counts["inserted"], first.counts["warnings"], first.counts["quarantined"]) == (5, 1, 0)
    assert (again.counts["updated"], again.counts["warnings"]) == (5, 0)
    assert con.sql("SELECT source, file, line_no, reason, raw FROM ingest_warning").fetchall() == [
        ("seq", str(path), 11, "QUAL -50 must be . or a number >= 0", bad)
    ]


def test_a_file_with_a_broken_header_is_quarantined_whole_naming_line_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "calls.vcf"
    path.write_text(HEADER.replace("Number=1,Type=String", "Number=one,Type=String", 1) + RECORDS[0] + "\n")
    report = sync(tmp_path / "store", VcfSource(name="seq", kind="vcf", path=path))
    con = connect(tmp_path / "store")
    assert (report.counts["inserted"], report.counts["quarantined"]) == (0, 1)
    assert con.sql("SELECT file, line_no, reason FROM quarantine").fetchall() == [
        (str(path), 4, "not valid VCF (calls.vcf line 4): INFO Number 'one' must be an integer, A, R, G or .")
    ]
    assert con.sql("SELECT count(*) FROM genomic_variant").fetchone() == (0,)


HTS = SHARED / "genomics" / "vcf" / "hts-specs" / "test" / "vcf"


@pytest.mark.skipif(not HTS.is_dir(), reason=f"hts-specs VCF conformance files not found at {HTS}")
def test_every_conformance_file_that_should_pass_lands(tmp_path: Path) -> None:
    passed = sorted(HTS.glob("*/passed/*.vcf*"))
    connector = VcfConnector(VcfSource(name="hts", kind="vcf", path=HTS / "*" / "passed" / "*.vcf*"))
    with TwinStore(tmp_path / "store") as store:
        run = store.begin_run("hts", "sync")
        land_batches(store, run, connector.pull(None))
    assert len(passed) == connector.stats["files"] == 76
    con = connect(tmp_path / "store")
    assert run.counts["quarantined"] == 0, con.sql("FROM quarantine").fetchall()
    assert run.counts["inserted"] > 0
    # One passed file breaks two rules the 4.3 failed set holds (failed_body_unsorted_000,
    # failed_body_no_newline_*): 4.5's zero_length_LAA.vcf is unsorted and has no last newline.
    assert con.sql("SELECT file, line_no, reason FROM ingest_warning ORDER BY ALL").fetchall() == [
        (str(HTS / "4.5/passed/zero_length_LAA.vcf"), 8, "records are not sorted: POS 300 comes after 400"),
        (str(HTS / "4.5/passed/zero_length_LAA.vcf"), 10, "the last line does not end with a newline"),
    ]


CAUGHT = 603
"""Of the 607 failed files; missed: 4.1 and 4.2 failed_body_format_003 (an underscore in a FORMAT
key, common in real 4.1 files, so allowed) and 4.1 failed_meta_format_030 / 4.2 029 (the
reserved GLE/ PQ declarations of those versions)."""


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not HTS.is_dir(), reason=f"hts-specs VCF conformance files not found at {HTS}")
def test_conformance_files_that_should_fail_are_rejected_or_warned() -> None:
    failed = sorted(HTS.glob("*/failed/*.vcf*"))
    connector = VcfConnector(VcfSource(name="hts", kind="vcf", path=HTS / "*" / "failed" / "*.vcf*"))
    caught = set()
    for batch in connector.pull(None):  # never raises: that is half the point
        caught |= set(batch.problems["file"].to_pylist()) | set(batch.warnings["file"].to_pylist())
        for reason in [*batch.problems["reason"].to_pylist(), *batch.warnings["reason"].to_pylist()]:
            assert reason
    assert len(failed) == connector.stats["files"] == 607
    assert len(caught) >= CAUGHT, sorted(set(map(str, failed)) - caught)


def test_a_nul_byte_in_a_record_lands_with_a_readable_warning(tmp_path: Path) -> None:
    """Found by the mangled-VCF property test: a warning quoting a NUL byte crashed the second
    file's landing (DuckLake passes the join values to its catalog as SQL text)."""
    bad = ["chr5\t112841300\t.\tA\tG\t.\t.\t.\tGT:PS\t0/1:.\t0/0:.", "\x00"]
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        report = sync(
            tmp_path / "store", VcfSource(name=name, kind="vcf", path=write_vcf(folder / "c.vcf", bad))
        )
        assert report.counts["warnings"] >= 1
    reasons = (
        connect(tmp_path / "store")
        .sql("SELECT DISTINCT source, reason FROM ingest_warning WHERE reason LIKE '%\\x00%' ORDER BY 1")
        .fetchall()
    )
    assert [source for source, _ in reasons] == ["first", "second"]
