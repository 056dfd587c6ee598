"""Reportable variant calls as FHIR Genomics Reporting (IG STU2/3) resources.

Only calls in the source's reportable set (genes, regions) become resources: one variant
Observation per call, and per sample and file one genomics DiagnosticReport naming them. The
`genomic_variant` table keeps every call, so a whole genome never becomes millions of
resources. Ids derive from the source, sample and variant key (as the table's key), so reading
a file again updates the same resources. Each resource validates with the R4B models before
it may land; one that does not is a problem with the reason.
"""

from __future__ import annotations

import bisect
import re
import tomllib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from connectors.base import Batch, problems_from, records_from
from connectors.genomics.vcf import VcfReportable
from harmonize.labs.rows import TWINHUB_IDS
from harmonize.records import MAPPING_ERRORS, patient_reference, reason

REFERENCE: dict[str, Any] = tomllib.loads(Path(__file__).with_name("genomics_reference.toml").read_text())
"""Chromosome RefSeq accessions and gene HGNC ids and spans per assembly (data, not code)."""

LOINC = "http://loinc.org"
PROFILE = "http://hl7.org/fhir/uv/genomics-reporting/StructureDefinition/"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ALLELIC_STATE = {"heterozygous": "LA6706-1", "homozygous": "LA6705-3", "hemizygous": "LA6707-9"}
SOURCE_CLASS = {"germline": ("LA6683-2", "Germline"), "somatic": ("LA6684-0", "Somatic")}
SIGNIFICANCE = {
    "pathogenic": ("LA6668-3", "Pathogenic"),
    "likely_pathogenic": ("LA26332-9", "Likely pathogenic"),
    "uncertain_significance": ("LA26333-7", "Uncertain significance"),
    "likely_benign": ("LA26334-5", "Likely benign"),
    "benign": ("LA6675-8", "Benign"),
}
"""ClinVar CLNSIG values to the LOINC answers (LL4034-6) the IG binds clinical significance to."""
REGION = re.compile(r"([\w.]+):([\d,]+)-([\d,]+)")


@dataclass(frozen=True, order=True)
class Region:
    """A stretch of one chromosome, 1-based and inclusive; `chrom` as `chrom_name` spells it."""

    chrom: str
    start: int
    end: int


def chrom_name(chrom: str) -> str:
    """One spelling for chr13/13, chrX/X and chrM/MT, so files and configs match either way."""
    name = chrom[3:] if chrom[:3].lower() == "chr" else chrom
    name = name.upper() if name.lower() in ("x", "y", "m", "mt") else name
    return "M" if name == "MT" else name


def parse_region(text: str) -> Region:
    """`chr13:32315474-32400266` (commas allowed) as a Region; ValueError when it is not one."""
    match = REGION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a region; write chrom:start-end, e.g. chr13:32315474-32400266")
    start, end = (int(n.replace(",", "")) for n in match.group(2, 3))
    if not 1 <= start <= end:
        raise ValueError(f"{text!r}: start must be at least 1 and not after end")
    return Region(chrom_name(match.group(1)), start, end)


def parse_bed(text: str) -> list[Region]:
    """The regions of a BED file's text (0-based, half-open starts made 1-based)."""
    regions = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        try:
            chrom, start, end = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise ValueError(f"BED line {n} is not chrom<TAB>start<TAB>end: {line[:80]!r}") from None
        if not 0 <= start < end:
            raise ValueError(f"BED line {n}: start {start} must be below end {end}")
        regions.append(Region(chrom_name(chrom), start + 1, end))
    return regions


@dataclass(frozen=True, kw_only=True)
class Reportable:
    """The reportable set, ready for matching: merged regions per chromosome, gene spans."""

    genes: frozenset[str]
    regions: dict[str, tuple[list[int], list[int]]]
    """chrom -> (starts, ends) of merged, sorted regions, for bisect."""
    spans: dict[str, list[tuple[Region, str]]]
    """assembly -> the configured genes' spans, for calls without a gene annotation."""
    source_class: str
    chroms: frozenset[str] = field(default=frozenset())
    """Chromosomes with a region or span: calls elsewhere match by gene annotation or not at all."""

    def match(self, gene: str | None, assembly: str | None, chrom: str, pos: int) -> tuple[bool, str | None]:
        """Whether the call is reportable, and the gene to name: the annotated gene if it is
        configured, else a configured region, else (no annotation) a configured gene's span."""
        if gene and gene.upper() in self.genes:
            return True, gene
        name = chrom_name(chrom)
        in_span = next(
            (g for r, g in self.spans.get(assembly or "", []) if r.chrom == name and r.start <= pos <= r.end),
            None,
        )
        if name in self.regions:
            starts, ends = self.regions[name]
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and ends[i] >= pos:
                return True, gene or in_span
        if not gene and in_span:
            return True, in_span
        return False, None


def reportable_set(config: VcfReportable, bed: str | None = None) -> Reportable:
    """The config's genes and regions, plus the regions of `bed` (the BED file's text)."""
    regions = sorted([parse_region(r) for r in config.regions] + (parse_bed(bed) if bed else []))
    merged: dict[str, tuple[list[int], list[int]]] = {}
    for r in regions:
        starts, ends = merged.setdefault(r.chrom, ([], []))
        if ends and r.start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], r.end)
        else:
            starts.append(r.start)
            ends.append(r.end)
    genes = frozenset(g.strip().upper() for g in config.genes)
    spans: dict[str, list[tuple[Region, str]]] = {}
    for gene, known in REFERENCE["genes"].items():
        if gene in genes:
            for assembly in ("GRCh37", "GRCh38"):
                spans.setdefault(assembly, []).append((parse_region(known[assembly]), gene))
    chroms = set(merged) | {r.chrom for found in spans.values() for r, _ in found}
    return Reportable(
        genes=genes, regions=merged, spans=spans, source_class=config.source_class, chroms=frozenset(chroms)
    )


def genomics_reports(batches: Iterable[Batch], source: str, reportable: Reportable) -> Iterator[Batch]:
    """Each VCF batch with the resources of its reportable calls added as records.

    A file read in several batches gets its DiagnosticReport again with each batch that adds
    results, naming all results so far, so the last copy to land names them all."""
    results: dict[tuple[str, str], dict[str, None]] = {}
    for batch in batches:
        yield with_resources(batch, source, reportable, results)


def with_resources(
    batch: Batch, source: str, reportable: Reportable, results: dict[tuple[str, str], dict[str, None]]
) -> Batch:
    """`batch` plus its reportable calls' resources; `results` carries each (file, sample)'s
    Observation ids across the batches of one file."""
    variants = batch.variants
    if variants is None or not len(variants):
        return batch
    good: list[tuple[str, int, str]] = []
    bad: list[tuple[str, int, str, str]] = []
    touched: dict[tuple[str, str], dict[str, Any]] = {}
    for n, row in _candidates(variants, reportable):
        ok, gene = reportable.match(row["gene"], row["assembly"], row["chrom"], row["pos"])
        if not ok:
            continue
        try:
            resource = variant_observation(row, source, gene, reportable.source_class)
            Observation.model_validate_json(resource)
        except MAPPING_ERRORS as e:
            bad.append((row["file"], n, f"variant {_key(row)}: {reason(e)}", orjson.dumps(row).decode()))
            continue
        good.append((row["file"], n, resource.decode()))
        key = (row["file"], row["sample"])
        results.setdefault(key, {})[orjson.loads(resource)["id"]] = None
        touched[key] = row
    for (file, sample), patient in touched.items():
        report = genomics_report(source, file, sample, patient, list(results[(file, sample)]))
        try:
            DiagnosticReport.model_validate_json(report)
        except MAPPING_ERRORS as e:
            bad.append((file, 0, f"report of sample {sample!r}: {reason(e)}", report.decode()))
        else:
            good.append((file, 0, report.decode()))
    return replace(
        batch,
        records=pa.concat_tables([batch.records, records_from(good)]),
        problems=pa.concat_tables([batch.problems, problems_from(bad)]),
    )


def _candidates(variants: pa.Table, reportable: Reportable) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) of the calls that may match: a configured gene, or a
    chromosome with a region or span. Cheap columnar filter first; most rows stop here."""
    spellings = [s for c in reportable.chroms for s in (c, f"chr{c}", f"Chr{c}", f"CHR{c}")]
    spellings += ["MT", "chrMT"] if "M" in reportable.chroms else []
    mask = pc.or_kleene(
        pc.is_in(pc.utf8_upper(variants["gene"]), pa.array(sorted(reportable.genes), pa.string())),
        pc.is_in(variants["chrom"], pa.array(spellings, pa.string())),
    )
    numbered = variants.append_column("_n", pa.array(range(1, len(variants) + 1), pa.int64()))
    for row in numbered.filter(pc.fill_null(mask, False)).to_pylist():
        yield row.pop("_n"), row


def subject(row: dict[str, Any]) -> dict[str, Any]:
    """The Patient a sample's resources are about (a variant row's patient id, or its patient
    identifier, `system|value`, for the store to link); the one place that says how."""
    if row["patient_id"]:
        return patient_reference(row["patient_id"], None)
    if identifier := row.get("patient_identifier"):
        system, _, value = identifier.partition("|")
        return patient_reference(value, system)
    raise ValueError(f"sample {row['sample']!r} has no patient; map it to one in the source's `samples`")


def _key(row: dict[str, Any]) -> str:
    return f"{row['chrom']}:{row['pos']}:{row['ref']}:{row['alt']}"


def _concept(code: str, display: str, system: str = LOINC) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def _component(code: str, display: str, **value: Any) -> dict[str, Any]:
    return {"code": _concept(code, display), **value}


def variant_observation(row: dict[str, Any], source: str, gene: str | None, source_class: str) -> bytes:
    """One call (a VARIANT_SCHEMA row) as a variant Observation; ValueError when it cannot be."""
    sample, assembly, chrom = row["sample"], row["assembly"], row["chrom"]
    key = f"{sample}|{assembly}|{chrom}|{row['pos']}|{row['ref']}|{row['alt']}"
    end = row["pos"] + max(len(row["ref"]), 1) - 1
    components = []
    if gene:
        hgnc = REFERENCE["genes"].get(gene.upper(), {}).get("hgnc")
        value = _concept(hgnc, gene, "http://www.genenames.org/geneId") if hgnc else {"text": gene}
        components.append(_component("48018-6", "Gene studied [ID]", valueCodeableConcept=value))
    chromosome = {"text": chrom_name(chrom)}  # 48000-4: 48001-2 is the cytogenetic band, which a VCF lacks
    components.append(_component("48000-4", "Chromosome [Identifier]", valueCodeableConcept=chromosome))
    if refseq := REFERENCE["refseq"].get(assembly or "", {}).get(chrom_name(chrom)):
        seq = {"coding": [{"system": "http://www.ncbi.nlm.nih.gov/nuccore", "code": refseq}]}
        components.append(_component("48013-7", "Genomic reference sequence ID", valueCodeableConcept=seq))
    components += [
        _component("69547-8", "Genomic ref allele [ID]", valueString=row["ref"]),
        _component("69551-0", "Genomic alt allele [ID]", valueString=row["alt"]),
        _component(
            "92822-6",
            "Genomic coordinate system [Type]",
            valueCodeableConcept=_concept("LA30102-0", "1-based character counting"),
        ),
        _component(
            "81254-5",
            "Variant exact start-end",
            valueRange={"low": {"value": row["pos"]}, "high": {"value": end}},
        ),
    ]
    if change := _change_type(row["ref"], row["alt"]):
        value = _concept(*change, "http://sequenceontology.org")
        components.append(_component("48019-4", "DNA change type", valueCodeableConcept=value))
    if state := ALLELIC_STATE.get(row["zygosity"]):
        components.append(
            _component("53034-5", "Allelic state", valueCodeableConcept=_concept(state, row["zygosity"]))
        )
    if row["phase_set"] is not None:
        phase = {"text": f"phased, phase set {row['phase_set']}"}
        components.append(_component("82120-7", "Allelic phase", valueCodeableConcept=phase))
    components.append(
        _component(
            "48002-0", "Genomic source class", valueCodeableConcept=_concept(*SOURCE_CLASS[source_class])
        )
    )
    for code, display, hgvs in (
        ("48004-6", "DNA change (c.HGVS)", row["hgvs_c"]),
        ("48005-3", "Amino acid change (pHGVS)", row["hgvs_p"]),
    ):
        if hgvs:
            value = {"coding": [{"system": "http://varnomen.hgvs.org", "code": hgvs}]}
            components.append(_component(code, display, valueCodeableConcept=value))
    if significance := row["clinvar_significance"]:
        known = SIGNIFICANCE.get(significance.strip().lower().replace(" ", "_"))
        value = _concept(*known) if known else {"text": significance}
        components.append(
            _component("53037-8", "Genetic variation clinical significance", valueCodeableConcept=value)
        )
    resource = {
        "resourceType": "Observation",
        "id": str(uuid.uuid5(TWINHUB_IDS, f"{source}|{key}")),
        "meta": {"profile": [PROFILE + "variant"], "source": f"urn:twinhub:source:{source}"},
        "identifier": [{"system": f"urn:twinhub:source:{source}", "value": key.replace("|", ":")}],
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
        "code": _concept("69548-6", "Genetic variant assessment"),
        "subject": subject(row),
        "valueCodeableConcept": _concept("LA9633-4", "Present"),
        "component": components,
    }
    return orjson.dumps(resource)


def _change_type(ref: str, alt: str) -> tuple[str, str] | None:
    """The Sequence Ontology type of a simple call (VCF pads indels with the base before them)."""
    if not re.fullmatch(r"[ACGTNacgtn]+", ref) or not re.fullmatch(r"[ACGTNacgtn]+", alt):
        return None  # symbolic (<DEL>), breakend or missing alleles
    if len(ref) == len(alt):
        return ("SO:0001483", "SNV") if len(ref) == 1 else ("SO:0002007", "MNV")
    if ref[0].upper() == alt[0].upper() and min(len(ref), len(alt)) == 1:
        return ("SO:0000159", "deletion") if len(ref) > len(alt) else ("SO:0000667", "insertion")
    return ("SO:1000032", "delins")


def genomics_report(
    source: str, file: str, sample: str, patient: dict[str, Any], observation_ids: list[str]
) -> bytes:
    """The genomics DiagnosticReport of one sample in one file, naming its variant Observations;
    `patient` a variant row of the sample (see `subject`)."""
    resource = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid5(TWINHUB_IDS, f"{source}|report|{sample}|{file}")),
        "meta": {"profile": [PROFILE + "genomics-report"], "source": f"urn:twinhub:source:{source}"},
        "identifier": [{"system": f"urn:twinhub:source:{source}", "value": f"{sample}:{file}"}],
        "status": "final",
        "category": [_concept("GE", "Genetics", "http://terminology.hl7.org/CodeSystem/v2-0074")],
        "code": _concept("51969-4", "Genetic analysis report"),
        "subject": subject(patient),
        "result": [{"reference": f"Observation/{i}"} for i in observation_ids],
    }
    return orjson.dumps(resource)
