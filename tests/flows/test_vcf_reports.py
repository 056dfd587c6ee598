"""The vcf2fhir GRCh38 sample (NB6TK328, ACMG genes) as Genomics Reporting resources, compared
with vcf2fhir's own expected bundle, and landed through the CLI into a real store.

vcf2fhir's test (test_annotation) converts NB6TK328_filtered.vcf with GRCh38, patient NB6TK328,
NB6TK328_conversion_region.bed as the region to convert, NB6TK328_region_studied.bed and
NB6TK328_annotations.txt; the same BED is the reportable set here. Deliberate differences from
its (IG STU1-era) output: the gene is named in a gene-studied component (vcf2fhir names it only
in its annotations file), HGVS c. is as the file's ANN writes it (no RefSeq transcript, which
the VCF does not carry), and there are no region-studied or diagnostic-implication Observations.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.errors import ConfigError
from connectors.genomics.vcf import VcfConnector, VcfReportable, VcfSource
from flows.config import load_settings
from flows.sync import harmonized
from tests.support.cli import run_cli
from tests.support.data import SHARED
from twin_store import connect

VCF2FHIR = SHARED / "genomics" / "vcf" / "vcf2fhir"
EXPECTED = SHARED / "genomics" / "fhir-genomics" / "vcf2fhir-expected" / "expected_annotation.json"
needs_vcf2fhir = pytest.mark.skipif(
    not (VCF2FHIR / "NB6TK328_filtered.vcf").exists() or not EXPECTED.exists(),
    reason=f"vcf2fhir sample or expected bundle not found under {SHARED} (../shared/data is absent)",
)


def expected_variants() -> dict[tuple[str, int, str, str], str]:
    """(chromosome, position, ref, alt) -> gene of each variant Observation in vcf2fhir's bundle;
    the gene comes from the annotations file vcf2fhir took it from (its Observations carry none)."""
    genes = {}
    for line in (VCF2FHIR / "NB6TK328_annotations.txt").read_text().splitlines():
        chrom, pos, ref, alt, gene = line.split("\t")[:5]
        genes[(chrom.removeprefix("chr"), int(pos), ref, alt)] = gene.split("^")[1]
    found = {}
    for observation in orjson.loads(EXPECTED.read_bytes())["contained"]:
        if not observation["meta"]["profile"][0].endswith("/variant"):
            continue
        key = _call(observation)
        found[key] = genes[key]
    return found


def _call(observation: dict[str, Any]) -> tuple[str, int, str, str]:
    values = {c["code"]["coding"][0]["code"]: c for c in observation["component"]}
    refseq = values["48013-7"]["valueCodeableConcept"]["coding"][0]["code"]  # NC_000005.10 -> chr 5
    return (
        str(int(refseq.split(".")[0].removeprefix("NC_"))),
        int(values["81254-5"]["valueRange"]["low"]["value"]),
        values["69547-8"]["valueString"],
        values["69551-0"]["valueString"],
    )


@pytest.mark.shared
@needs_vcf2fhir
def test_the_vcf2fhir_grch38_sample_yields_the_variants_of_its_expected_bundle() -> None:
    source = VcfSource(
        name="acmg",
        kind="vcf",
        path=VCF2FHIR / "NB6TK328_filtered.vcf",
        samples={"NB6TK328": "NB6TK328"},
        reportable=VcfReportable(bed=VCF2FHIR / "NB6TK328_conversion_region.bed"),
    )
    (batch,) = harmonized(source, VcfConnector(source).pull(None))
    made = [orjson.loads(raw) for raw in batch.records["raw"].to_pylist()]
    observations = [r for r in made if r["resourceType"] == "Observation"]
    ours = {}
    for o in observations:
        gene = next(c for c in o["component"] if c["code"]["coding"][0]["code"] == "48018-6")
        ours[_call(o)] = gene["valueCodeableConcept"]["coding"][0]["display"]
    expected = expected_variants()
    assert set(ours.values()) == set(expected.values()) == {"APC", "MYBPC3", "MEN1", "BRCA2", "RYR1"}
    assert ours == expected, "same calls (chromosome, position, alleles), same genes"
    assert batch.problems.num_rows == 0
    (report,) = [r for r in made if r["resourceType"] == "DiagnosticReport"]
    assert len(report["result"]) == len(observations) == 5


@pytest.mark.shared
@needs_vcf2fhir
def test_the_genes_alone_find_the_same_variants_as_vcf2fhirs_regions() -> None:
    source = VcfSource(
        name="acmg",
        kind="vcf",
        path=VCF2FHIR / "NB6TK328_filtered.vcf",
        samples={"NB6TK328": "NB6TK328"},
        reportable=VcfReportable(genes=["APC", "BRCA1", "BRCA2", "MEN1", "MYBPC3", "RYR1"]),
    )
    (batch,) = harmonized(source, VcfConnector(source).pull(None))
    made = [orjson.loads(raw) for raw in batch.records["raw"].to_pylist()]
    assert {_call(r) for r in made if r["resourceType"] == "Observation"} == set(expected_variants())


@pytest.mark.shared
@needs_vcf2fhir
def test_gene_spans_lie_in_vcf2fhirs_conversion_regions_of_those_genes() -> None:
    """A check of genomics_reference.toml's GRCh38 spans against vcf2fhir's ACMG-gene BED."""
    from harmonize.genomics.report import REFERENCE, parse_bed, parse_region

    regions = parse_bed((VCF2FHIR / "NB6TK328_conversion_region.bed").read_text())
    for gene, known in REFERENCE["genes"].items():
        span = parse_region(known["GRCh38"])
        assert any(r.chrom == span.chrom and r.start <= span.start <= span.end <= r.end for r in regions), (
            gene
        )


@pytest.mark.slow
@pytest.mark.shared
@needs_vcf2fhir
def test_a_sync_lands_the_report_in_the_views_and_a_rerun_adds_nothing(
    tmp_path: Path, api_env: dict[str, str]
) -> None:
    vcf = shutil.copy(VCF2FHIR / "NB6TK328_filtered.vcf", tmp_path / "NB6TK328.vcf")
    config = tmp_path / "twinhub.toml"
    config.write_text(
        f'[store]\npath = "{tmp_path / "store"}"\n\n'
        f'[[sources]]\nname = "genomes"\nkind = "vcf"\npath = "{vcf}"\n'
        'samples = {"NB6TK328" = "NB6TK328"}\n\n'
        f'[sources.reportable]\nbed = "{VCF2FHIR / "NB6TK328_conversion_region.bed"}"\n'
    )

    def landed() -> list[tuple[Any, ...]]:
        con = connect(tmp_path / "store")
        observations = [i for (i,) in con.sql("SELECT id FROM observation").fetchall()]
        return [
            *con.sql(
                "SELECT resource_type, count(*) FROM fhir_resource GROUP BY ALL ORDER BY ALL"
            ).fetchall(),
            *con.sql("SELECT code, patient_id, count(*) FROM observation GROUP BY ALL").fetchall(),
            *[
                (code, patient, sorted(orjson.loads(ids)) == sorted(observations))
                for code, patient, ids in con.sql(
                    "SELECT code, patient_id, result_ids FROM diagnostic_report"
                ).fetchall()
            ],
            con.sql("SELECT count(*) FROM genomic_variant").fetchone() or (),
        ]

    run_cli("--config", str(config), "sync", "genomes", env=api_env)
    first = landed()
    assert first == [
        ("DiagnosticReport", 1),
        ("Observation", 5),
        ("69548-6", "genomes/NB6TK328", 5),  # no Patient of that id elsewhere: the VCF source's own
        ("51969-4", "genomes/NB6TK328", True),
        (5,),
    ]
    run_cli("--config", str(config), "sync", "genomes", env=api_env)
    os.utime(vcf, (1, 1))  # a changed fingerprint: the file is read and mapped again
    run_cli("--config", str(config), "sync", "genomes", env=api_env)
    assert landed() == first
    con = connect(tmp_path / "store")
    assert con.sql("SELECT count(*) FROM quarantine").fetchone() == (0,)
    assert con.sql(
        "SELECT lines_read, inserted, updated, unchanged FROM ingest_run ORDER BY started_at"
    ).fetchall() == [(11, 11, 0, 0), (0, 0, 0, 0), (11, 0, 5, 6)]


def test_the_reportable_set_is_configured_in_toml_and_a_bad_bed_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "twinhub.toml"
    config.write_text(
        '[[sources]]\nname = "seq"\nkind = "vcf"\npath = "calls.vcf"\n\n'
        '[sources.reportable]\ngenes = ["BRCA2"]\nregions = ["chr17:100-200"]\nbed = "panel.bed"\n'
    )
    source = load_settings(config).source("seq")
    assert isinstance(source, VcfSource) and source.reportable is not None
    assert source.reportable.bed == tmp_path / "panel.bed", "relative to the config file"
    with pytest.raises(ConfigError, match=r"sources.seq.reportable.bed: cannot read .*panel.bed"):
        harmonized(source, iter([]))
    (tmp_path / "panel.bed").write_text("chr1\t0\tten\n")
    with pytest.raises(ConfigError, match=r"sources.seq.reportable: BED line 1 is not chrom"):
        harmonized(source, iter([]))
    config.write_text(config.read_text().replace("chr17:100-200", "chr17:100"))
    with pytest.raises(
        ConfigError, match=r"sources\[0\].reportable.regions\[0\]: 'chr17:100' is not a region"
    ):
        load_settings(config)
