"""Variant calls from VCF files (4.1-4.5, plain, bgzip or BCF), read with cyvcf2 (htslib).

Each file becomes rows of the columnar `genomic_variant` table: one per sample and alternate
allele the sample carries, never one FHIR resource per variant. Its text is checked against the
spec first (`connectors.genomics.vcf_checks`): a file whose header is broken, or that htslib cannot read,
goes to quarantine whole with the reason; a record that breaks a rule lands with a warning. Files
are read whole, once each (a changed file is read again).
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from cyvcf2 import VCF
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from connectors._files import FileConnector, describe_files, fingerprint, open_maybe_gzipped
from connectors._lines import RAW_KEPT, FileLines, Problem, unreadable
from connectors.base import PROBLEM_SCHEMA, Batch, Watermark, Window, problems_from
from connectors.genomics.vcf_checks import BAD_POS, COLUMNS_RULE, VcfSpecError, check_text
from connectors.kinds import MappingFile, SourceConfig, SourceKind

Assembly = Literal["GRCh37", "GRCh38"]
ASSEMBLY_NAMES = {"GRCh37": ("grch37", "hg19", "b37", "hs37"), "GRCh38": ("grch38", "hg38", "b38", "hs38")}
VARIANT_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("sample", pa.string()),
        ("patient_id", pa.string()),
        ("assembly", pa.string()),
        ("chrom", pa.string()),
        ("pos", pa.int64()),
        ("variant_id", pa.string()),
        ("ref", pa.string()),
        ("alt", pa.string()),
        ("genotype", pa.string()),
        ("zygosity", pa.string()),
        ("phase_set", pa.int64()),
        ("quality", pa.float64()),
        ("filter", pa.string()),
        ("gene", pa.string()),
        ("hgvs_c", pa.string()),
        ("hgvs_p", pa.string()),
        ("clinvar_significance", pa.string()),
        ("clinvar_allele_id", pa.string()),
        ("patient_identifier", pa.string()),
    ]
)
"""One row per sample and carried alternate allele; `genotype` as in the file (0|1, 1/1)."""
ANNOTATIONS = ("GENEINFO", "CLNSIG", "ALLELEID", "ANN")
"""The INFO keys rows take their gene, ClinVar and HGVS annotations from."""
MAX_LINE = 256 << 20
SALVAGE_TRIES = 100
"""Records htslib cannot parse that a file may have before the rest of it is quarantined whole."""


class RecordError(Exception):
    """htslib could not read the record at `index` (0-based, among the file's records)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"record {index + 1}")
        self.index = index


def _region(text: str) -> str:
    if not re.fullmatch(r"[\w.]+:[\d,]+-[\d,]+", text.strip()):
        raise ValueError(f"{text!r} is not a region; write chrom:start-end, e.g. chr13:32315474-32400266")
    return text.strip()


Region = Annotated[str, AfterValidator(_region)]
"""`chrom:start-end`, 1-based and inclusive as a genome browser shows it (chr13:32315474-32400266)."""


class VcfReportable(BaseModel):
    """Which variant calls become FHIR Genomics Reporting resources; the table keeps them all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    genes: list[str] = []
    """HGNC symbols, matched on the file's gene annotation (else on the gene's coordinates)."""
    regions: list[Region] = []
    bed: Path | None = None
    """A BED file of more regions (0-based starts, as BED files are)."""
    source_class: Literal["germline", "somatic"] = "germline"


class VcfSource(SourceConfig):
    """Config of a `vcf` source: a VCF file, a folder of them or a glob."""

    kind: Literal["vcf"]
    path: Path
    assembly: Assembly | None = None
    """When the header does not say (##reference, ##assembly or contig lines)."""
    samples: dict[str, str] = Field(default_factory=dict)
    """Sample name -> the FHIR Patient id it belongs to (unlisted samples keep no patient), or
    with `patient_system` the patient's identifier in that system (an MRN)."""
    patient_system: str | None = None
    """Calls then name their patient by identifier (`patient_identifier`, `system|value`) and get
    its `patient_id` once a Patient with that identifier is in the store."""
    batch_variants: int = Field(default=200_000, ge=1)
    reportable: VcfReportable | None = None
    """Without it no FHIR resources are made, only `genomic_variant` rows."""

    def mapping_files(self) -> dict[str, MappingFile]:
        if self.reportable is None or self.reportable.bed is None:
            return {}
        return {"reportable.bed": MappingFile(self.reportable.bed, "a BED file of regions")}


class VcfConnector(FileConnector[VcfSource]):
    suffixes = (".vcf", ".vcf.gz", ".bcf")
    recursive = True

    def pull(self, since: Watermark | None, window: Window | None = None) -> Iterator[Batch]:
        known: dict[str, Any] = dict((since or {}).get("files", {}))
        progress = dict(known)
        for path in self.files():
            try:
                now = fingerprint(path)
            except OSError as e:  # it vanished since it was listed: the next sync looks again
                yield Batch(
                    records=_no_records(),
                    watermark={"files": dict(progress)},
                    problems=problems_from([unreadable(path, e)]),
                )
                continue
            if known.get(str(path)) == now:
                continue
            self.stats["files"] += 1
            warnings, chunks, problems = self._checked(path)
            if not chunks:
                progress[str(path)] = now
                yield Batch(
                    records=_no_records(),
                    watermark={"files": dict(progress)},
                    problems=problems,
                    warnings=warnings,
                )
                continue
            for n, chunk in enumerate(chunks, start=1):
                last = n == len(chunks)
                if last:
                    progress[str(path)] = now
                yield Batch(
                    records=_no_records(),
                    watermark={"files": dict(progress)},
                    variants=chunk,
                    warnings=warnings if last else PROBLEM_SCHEMA.empty_table(),
                    problems=problems if last else PROBLEM_SCHEMA.empty_table(),
                )

    def _checked(self, path: Path) -> tuple[pa.Table, list[pa.Table], pa.Table]:
        """The file's warnings, variant rows and problems: a broken header quarantines the file
        whole; damage and records htslib cannot read are quarantined, and the rest lands."""
        try:
            try:
                warnings, chunks = self._read(path)
                problems = PROBLEM_SCHEMA.empty_table()
            except VcfSpecError:
                raise
            except Exception:  # damage, or a record htslib cannot read: land what can be read
                warnings, chunks, problems = self._salvage(path)
        except VcfSpecError as e:
            reason = f"not valid VCF ({path.name} line {e.line_no}): {e.reason}"
            return PROBLEM_SCHEMA.empty_table(), [], problems_from([(str(path), e.line_no, reason, e.raw)])
        except Exception as e:  # htslib refuses the file itself: quarantine it whole
            why = str(e.__cause__ or e) if isinstance(e, RecordError) else str(e)
            return (
                PROBLEM_SCHEMA.empty_table(),
                [],
                problems_from([(str(path), 0, f"not a readable VCF ({path.name}): {why}", "")]),
            )
        warnings, problems, chunks = _bad_positions(warnings, problems, chunks)
        return warnings, chunks, problems

    def _salvage(self, path: Path) -> tuple[pa.Table, list[pa.Table], pa.Table]:
        """A file htslib cannot read through: the records before its damage (a cut or corrupt
        gzip stream) land, and each record htslib cannot read is quarantined with its line.
        Each such record costs one more read of the records after it; `SALVAGE_TRIES` bound
        them, and the rest of a file that breaks more often is quarantined as one problem."""
        lines_of = FileLines(path, max_line=MAX_LINE)
        header: list[bytes] = []
        records: list[tuple[int, bytes]] = []
        problems: list[Problem] = []
        for first, lines, problem in lines_of.chunks():
            for line_no, line in enumerate(lines, start=first):
                if not records and line.startswith(b"#"):
                    header.append(line)
                else:
                    records.append((line_no, line))
            if problem is not None:
                problems.append(problem)
        text = b"\n".join([*header, *(line for _, line in records)]) + b"\n"
        warnings = _text_warnings(str(path), text)  # raises VcfSpecError on a broken header
        # Records with a bad POS are quarantined by _bad_positions; with too few or many columns
        # (noise from a corrupt stream, often) here, without asking htslib about each.
        bad_pos = pc.match_substring_regex(warnings["reason"], BAD_POS)
        ragged = pc.match_substring_regex(warnings["reason"], COLUMNS_RULE)
        problems += [
            (str(path), r["line_no"], r["reason"], r["raw"]) for r in warnings.filter(ragged).to_pylist()
        ]
        unplaced = set(warnings.filter(pc.or_(bad_pos, ragged))["line_no"].to_pylist())
        kept = [(n, line) for n, line in records if line.strip() and n not in unplaced]
        with tempfile.TemporaryDirectory(prefix="twinhub-vcf-") as folder:
            readable = Path(folder) / path.name.removesuffix(".gz").removesuffix(".bcf")
            for _ in range(SALVAGE_TRIES):
                readable.write_bytes(b"\n".join([*header, *(line for _, line in kept)]) + b"\n")
                try:
                    chunks = self._variants(readable, label=str(path))
                    break
                except RecordError as e:
                    if e.index >= len(kept):  # not a record's fault: give up on the file
                        raise
                    line_no, line = kept.pop(e.index)
                    reason = f"not a readable VCF record ({path.name} line {line_no}): htslib cannot parse it"
                    problems.append((str(path), line_no, f"{reason}; fix the line", _raw(line)))
            else:
                chunks = []
                rest = "; ".join(f"line {n}" for n, _ in kept[:5])
                problems.append(
                    (
                        str(path),
                        kept[0][0] if kept else 0,
                        f"not a readable VCF ({path.name}): over {SALVAGE_TRIES} records htslib cannot parse "
                        f"(from {rest}); fix the file",
                        "",
                    )
                )
        return warnings, chunks, problems_from(sorted(problems, key=lambda p: p[1]))

    def _read(self, path: Path) -> tuple[pa.Table, list[pa.Table]]:
        """The file's spec warnings and its variant rows. The checks (DuckDB, which lets go of
        the GIL) run in a thread beside htslib's read; a broken header is the clearer reason
        when both fail, so the checks' error wins."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            checked = pool.submit(spec_warnings, path)
            try:
                chunks = list(self._variants(path))
            except Exception:
                checked.result()  # raises VcfSpecError if the header is broken
                raise
            return checked.result(), chunks

    def _variants(self, path: Path, label: str | None = None) -> list[pa.Table]:
        """The file's variant rows, `batch_variants` at a time. Each record is asked only for
        the annotation keys the header declares; htslib declares a key the header lacks once a
        record uses it, and then the file is read again asking for all of them. The rows name
        the file `label` (by default `path`)."""
        vcf = VCF(str(path), strict_gt=True)
        declared = [key for key in ANNOTATIONS if vcf.contains(key)]
        chunks = list(self._chunks(vcf, label or str(path), declared))
        if any(vcf.contains(key) for key in ANNOTATIONS if key not in declared):
            chunks = list(self._chunks(VCF(str(path), strict_gt=True), label or str(path), ANNOTATIONS))
        return chunks

    def _chunks(self, vcf: VCF, path: str, annotations: Sequence[str]) -> Iterator[pa.Table]:
        """The rows, in chunks; a record that cannot be read raises `RecordError` with its index."""
        assembly = self.source.assembly or header_assembly(vcf.raw_header)
        samples = list(vcf.samples)
        rows: list[tuple[Any, ...]] = []
        records, index = iter(vcf), 0
        while True:
            try:
                record = next(records)
                rows += variant_rows(record, path, samples, self.source.samples, assembly, annotations)
            except StopIteration:
                break
            except Exception as e:
                raise RecordError(index) from e
            index += 1
            if len(rows) >= self.source.batch_variants:
                yield self._linked(_table(rows))
                rows = []
        yield self._linked(_table(rows))

    def _linked(self, variants: pa.Table) -> pa.Table:
        """With a `patient_system`, what `samples` maps to is an identifier, not a Patient id."""
        if self.source.patient_system is None:
            return variants
        named = variants["patient_id"]
        identifiers = pc.binary_join_element_wise(self.source.patient_system, named, "|")
        variants = variants.set_column(
            variants.schema.get_field_index("patient_id"), "patient_id", pa.nulls(len(variants), pa.string())
        )
        return variants.set_column(len(VARIANT_SCHEMA) - 1, "patient_identifier", identifiers)


def spec_warnings(path: Path) -> pa.Table:
    """The spec violations of a text VCF's records (BCF is binary: htslib's checks only)."""
    if path.name.endswith(".bcf"):
        return PROBLEM_SCHEMA.empty_table()
    with open_maybe_gzipped(path) as fh:
        return _text_warnings(str(path), fh.read())


def _text_warnings(file: str, data: bytes) -> pa.Table:
    try:
        return check_text(file, data.decode())
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        found = check_text(file, data.decode(errors="replace"))
        bad = pa.table(
            {"file": [file], "line_no": [line], "reason": ["the text is not UTF-8"], "raw": [""]},
            schema=PROBLEM_SCHEMA,
        )
        return pa.concat_tables([bad, found])


def _bad_positions(
    warnings: pa.Table, problems: pa.Table, chunks: list[pa.Table]
) -> tuple[pa.Table, pa.Table, list[pa.Table]]:
    """Records whose POS is negative or not a number are quarantined with their line (not kept
    as warnings) and make no rows; a quarantined line keeps no warnings."""
    bad = pc.match_substring_regex(warnings["reason"], BAD_POS)
    bad = pc.and_(bad, pc.invert(pc.is_in(warnings["line_no"], problems["line_no"])))
    problems = pa.concat_tables([problems, warnings.filter(bad)]).sort_by("line_no")
    warnings = warnings.filter(pc.invert(pc.is_in(warnings["line_no"], problems["line_no"])))
    return warnings, problems, [chunk.filter(pc.greater_equal(chunk["pos"], 0)) for chunk in chunks]


def _raw(line: bytes) -> str:
    return line[:RAW_KEPT].decode(errors="backslashreplace")


def _table(rows: list[tuple[Any, ...]]) -> pa.Table:
    """The rows (every column but `patient_identifier`, which `_linked` fills) as a table."""
    fields = list(VARIANT_SCHEMA)[:-1]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(fields)
    arrays = [pa.array(column, f.type) for column, f in zip(columns, fields, strict=True)]
    arrays.append(pa.nulls(len(rows), pa.string()))
    return pa.table(arrays, schema=VARIANT_SCHEMA)


def header_assembly(header: str) -> str | None:
    """GRCh37 or GRCh38 from the header's reference, assembly or contig lines, if they say."""
    lines = [
        line.lower()
        for line in header.splitlines()
        if line.startswith(("##reference", "##assembly", "##contig"))
    ]
    for assembly, names in ASSEMBLY_NAMES.items():
        if any(name in line for line in lines for name in names):
            return assembly
    return None


def variant_rows(
    record: Any,
    file: str,
    samples: list[str],
    patients: dict[str, str],
    assembly: str | None,
    annotations: Sequence[str],
) -> list[tuple[Any, ...]]:
    """The rows of one VCF record: each sample's carried alternate alleles. Most records of a
    genome carry none (hom-ref or no-call), so those cost one look at their genotypes."""
    if not samples:
        return []
    try:
        genotypes = record.genotypes
    except Exception:
        if "GT" in record.FORMAT:  # reading FORMAT costs more than the genotypes: only here
            raise
        return []  # no calls: the record says nothing about any sample
    calls = [(s, call) for s, call in enumerate(genotypes) if max(call[:-1], default=-1) > 0]
    if not calls:
        return []
    info = record.INFO
    found = {key: info.get(key) for key in annotations}  # a key the record lacks costs a raise
    gene = (found.get("GENEINFO") or "").split(":")[0] or None
    significance, allele_id = found.get("CLNSIG"), found.get("ALLELEID")
    significance = None if significance is None else str(significance)
    allele_id = None if allele_id is None else str(allele_id)
    hgvs = _annotations(found.get("ANN"))
    phase_sets = _phase_sets(record, len(samples)) if any(call[-1] for _, call in calls) else []
    chrom, pos, variant_id, ref, alts = record.CHROM, record.POS, record.ID, record.REF, record.ALT
    quality, filters = record.QUAL, record.FILTER or "PASS"
    rows = []
    for s, call in calls:
        genotype, carried = _call(tuple(call))
        for a, zygosity in carried:
            alt = alts[a - 1] if a <= len(alts) else "."  # a call on an allele ALT omits
            hgvs_c, hgvs_p, ann_gene = hgvs.get(alt, (None, None, None))
            rows.append(
                (
                    file,
                    samples[s],
                    patients.get(samples[s]),
                    assembly,
                    chrom,
                    pos,
                    variant_id,
                    ref,
                    alt,
                    genotype,
                    zygosity,
                    phase_sets[s] if call[-1] else None,
                    quality,
                    filters,
                    gene or ann_gene,
                    hgvs_c,
                    hgvs_p,
                    significance,
                    allele_id,
                )
            )
    return rows


@functools.lru_cache(maxsize=4096)
def _call(call: tuple[int, ...]) -> tuple[str, tuple[tuple[int, str], ...]]:
    """A call (alleles, then whether phased) as the file writes its genotype (0|1, 1/1), and the
    alternate alleles it carries with their zygosity: a genome has few distinct calls."""
    *alleles, phased = call
    genotype = ("|" if phased else "/").join("." if a < 0 else str(a) for a in alleles)
    carried = tuple(
        (
            a,
            "hemizygous"
            if len(alleles) == 1
            else "homozygous"
            if all(x == a for x in alleles)
            else "heterozygous",
        )
        for a in sorted({a for a in alleles if a > 0})
    )
    return genotype, carried


def _annotations(ann: Any) -> dict[str, tuple[str | None, str | None, str | None]]:
    """SnpEff ANN per allele: (HGVS.c, HGVS.p, gene) of its first annotation."""
    found: dict[str, tuple[str | None, str | None, str | None]] = {}
    if not ann:
        return found
    for annotation in str(ann).split(","):
        parts = annotation.split("|")
        if len(parts) > 10 and parts[0] not in found:
            found[parts[0]] = (parts[9] or None, parts[10] or None, parts[3] or None)
    return found


def _phase_sets(record: Any, n: int) -> list[int | None]:
    try:
        values = record.format("PS")
    except KeyError:
        values = None
    if values is None:
        return [None] * n
    return [_integer(v[0]) for v in values]


def _integer(value: Any) -> int | None:
    """A PS value: an int, or text where the header does not declare PS (htslib keeps it as is)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _no_records() -> pa.Table:
    from connectors.base import RECORD_SCHEMA

    return RECORD_SCHEMA.empty_table()


KIND = SourceKind(
    kind="vcf",
    modality="genomics",
    summary="VCF files (plain, bgzip or BCF), spec-checked; reportable calls become Genomics Reporting FHIR",
    config=VcfSource,
    build=lambda source, context: VcfConnector(source),
    records="vcf",
    describe=describe_files,
)
