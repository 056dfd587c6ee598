"""Which VCF calls become Genomics Reporting resources, and what those resources say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.base import Batch
from connectors.genomics.vcf import VcfConnector, VcfReportable, VcfSource
from harmonize.genomics.report import (
    Region,
    _change_type,
    genomics_reports,
    parse_bed,
    parse_region,
    reportable_set,
)

HEADER = """##fileformat=VCFv4.2
##reference=GRCh38
##contig=<ID=chr5,length=181538259>
##contig=<ID=chr13,length=114364328>
##contig=<ID=chr17,length=83257441>
##INFO=<ID=GENEINFO,Number=1,Type=String,Description="Gene">
##INFO=<ID=CLNSIG,Number=.,Type=String,Description="ClinVar significance">
##INFO=<ID=ANN,Number=.,Type=String,Description="SnpEff: Allele|Annotation|...|HGVS.c|HGVS.p">
##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">
##FORMAT=<ID=PS,Number=1,Type=Integer,Description="Phase set">
#CHROM	POS	ID	REF	ALT	QUAL	FILTER	INFO	FORMAT	S1	S2
"""
RECORDS = [
    # APC by its ANN gene, far outside any configured region
    "chr5\t112841059\t.\tT\tA\t50\tPASS\tCLNSIG=Pathogenic;"
    "ANN=A|missense_variant|MODERATE|APC|ENSG1|transcript|ENST1|protein_coding|17/17|c.5465T>A|p.Val1822Asp\t"
    "GT:PS\t0|1:112841000\t1/1:.",
    # annotated with a gene nobody asked for, inside no region: not reportable
    "chr5\t1000\t.\tG\tC\t50\tPASS\tGENEINFO=TERT:7015\tGT:PS\t0/1:.\t0/0:.",
    # no annotation, inside the configured region chr17:100-200
    "chr17\t150\t.\tC\tT\t50\tPASS\t.\tGT:PS\t0/1:.\t0/0:.",
    # no annotation, inside BRCA2's GRCh38 span (the gene is configured, no region says so)
    "chr13\t32355250\t.\tT\tC\t50\tPASS\t.\tGT:PS\t1/1:.\t0/1:.",
    # no annotation, outside everything: not reportable
    "chr13\t100\t.\tA\tG\t50\tPASS\t.\tGT:PS\t0/1:.\t0/1:.",
]
CONFIG = VcfReportable(genes=["APC", "BRCA2"], regions=["chr17:100-200"])


def write_vcf(path: Path, records: list[str]) -> Path:
    path.write_text(HEADER + "\n".join(records) + "\n")
    return path


def harmonize(tmp_path: Path, config: VcfReportable = CONFIG, **options: Any) -> Batch:
    source = VcfSource(
        name="seq",
        kind="vcf",
        path=write_vcf(tmp_path / "calls.vcf", RECORDS),
        samples={"S1": "p1"},
        **options,
    )
    (batch,) = genomics_reports(VcfConnector(source).pull(None), "seq", reportable_set(config))
    return batch


def resources(batch: Batch) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in batch.records["raw"].to_pylist()]


def component(observation: dict[str, Any], code: str) -> Any:
    (found,) = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == code]
    return found.get("valueString") or found.get("valueCodeableConcept") or found.get("valueRange")


def test_calls_match_by_gene_annotation_region_or_gene_span_and_nothing_else(tmp_path: Path) -> None:
    batch = harmonize(tmp_path)
    found = resources(batch)
    observations = [r for r in found if r["resourceType"] == "Observation"]
    assert sorted(
        (component(o, "69547-8"), component(o, "81254-5")["low"]["value"]) for o in observations
    ) == [
        ("C", 150),
        ("T", 32355250),
        ("T", 112841059),
    ], "sample S1's calls in APC, chr17:100-200 and BRCA2; TERT and chr13:100 are not reportable"
    genes = {component(o, "81254-5")["low"]["value"]: o for o in observations}
    assert component(genes[112841059], "48018-6")["coding"][0]["code"] == "HGNC:583"
    assert component(genes[32355250], "48018-6")["coding"][0]["display"] == "BRCA2"
    assert not any(c["code"]["coding"][0]["code"] == "48018-6" for c in genes[150]["component"])
    assert batch.variants is not None and batch.variants.num_rows == 8, "the table still gets every call"


def test_an_observation_says_what_the_call_says(tmp_path: Path) -> None:
    found = resources(harmonize(tmp_path))
    apc = next(
        r for r in found if r.get("identifier", [{}])[0].get("value") == "S1:GRCh38:chr5:112841059:T:A"
    )
    assert apc["subject"] == {"reference": "Patient/p1"}
    assert apc["meta"]["profile"] == ["http://hl7.org/fhir/uv/genomics-reporting/StructureDefinition/variant"]
    assert apc["code"]["coding"][0]["code"] == "69548-6"
    assert apc["valueCodeableConcept"]["coding"][0]["code"] == "LA9633-4"
    assert component(apc, "48013-7")["coding"][0]["code"] == "NC_000005.10"
    assert (component(apc, "69547-8"), component(apc, "69551-0")) == ("T", "A")
    assert component(apc, "48019-4")["coding"][0]["display"] == "SNV"
    assert component(apc, "53034-5")["coding"][0]["display"] == "heterozygous"
    assert component(apc, "82120-7") == {"text": "phased, phase set 112841000"}
    assert component(apc, "48002-0")["coding"][0]["display"] == "Germline"
    assert component(apc, "48004-6")["coding"][0]["code"] == "c.5465T>A"
    assert component(apc, "48005-3")["coding"][0]["code"] == "p.Val1822Asp"
    assert component(apc, "53037-8")["coding"][0]["code"] == "LA6668-3"


def test_one_report_per_sample_names_its_observations_and_an_unmapped_sample_is_a_problem(
    tmp_path: Path,
) -> None:
    batch = harmonize(tmp_path)
    found = resources(batch)
    (report,) = [r for r in found if r["resourceType"] == "DiagnosticReport"]
    observations = {r["id"] for r in found if r["resourceType"] == "Observation"}
    assert {r["reference"] for r in report["result"]} == {f"Observation/{i}" for i in observations}
    assert report["code"]["coding"][0]["code"] == "51969-4"
    assert report["subject"] == {"reference": "Patient/p1"}
    reasons = batch.problems["reason"].to_pylist()
    assert len(reasons) == 2, "S2 carries APC and BRCA2 calls but has no patient"
    assert all("sample 'S2' has no patient" in r for r in reasons)


def test_ids_are_stable_and_a_file_read_in_several_batches_gets_one_full_report(tmp_path: Path) -> None:
    first = resources(harmonize(tmp_path))
    again = resources(harmonize(tmp_path))
    assert [r["id"] for r in first] == [r["id"] for r in again]
    source = VcfSource(
        name="seq",
        kind="vcf",
        path=tmp_path / "calls.vcf",
        samples={"S1": "p1", "S2": "p2"},
        batch_variants=1,
    )
    batches = list(genomics_reports(VcfConnector(source).pull(None), "seq", reportable_set(CONFIG)))
    assert len(batches) > 3
    reports = [r for b in batches for r in resources(b) if r["resourceType"] == "DiagnosticReport"]
    last = {r["id"]: r for r in reports}  # the copy that lands last wins
    observations = [r for b in batches for r in resources(b) if r["resourceType"] == "Observation"]
    assert sum(len(r["result"]) for r in last.values()) == len(observations) == 5


def test_a_somatic_source_says_so_and_no_reportable_set_means_no_resources(tmp_path: Path) -> None:
    somatic = resources(harmonize(tmp_path, VcfReportable(genes=["APC"], source_class="somatic")))
    assert component(somatic[0], "48002-0")["coding"][0]["code"] == "LA6684-0"
    assert resources(harmonize(tmp_path, VcfReportable(genes=["CFTR"]))) == []


def test_regions_and_bed_files_parse_or_name_the_problem() -> None:
    assert parse_region("chr13:32,315,474-32400266") == Region("13", 32315474, 32400266)
    assert parse_region("MT:1-100") == Region("M", 1, 100)
    assert parse_bed("track name=x\nchr1\t0\t10\n# note\nchrX 5 6\n") == [
        Region("1", 1, 10),
        Region("X", 6, 6),
    ]
    with pytest.raises(ValueError, match="is not a region"):
        parse_region("chr13:32315474")
    with pytest.raises(ValueError, match="BED line 2 is not chrom"):
        parse_bed("chr1\t0\t10\nchr1\tten\t20\n")
    merged = reportable_set(VcfReportable(regions=["1:10-20", "chr1:15-30"]), bed="chr1\t40\t50\n")
    assert merged.regions["1"] == ([10, 41], [30, 50])


@pytest.mark.parametrize(
    ("ref", "alt", "kind"),
    [
        ("A", "G", "SNV"),
        ("AC", "GT", "MNV"),
        ("ACT", "A", "deletion"),
        ("A", "ACT", "insertion"),
        ("ACT", "GC", "delins"),
        ("A", "<DEL>", None),
        ("A", ".", None),
    ],
)
def test_the_dna_change_type_follows_vcf_padding(ref: str, alt: str, kind: str | None) -> None:
    found = _change_type(ref, alt)
    assert (found[1] if found else None) == kind
