"""A small VCF for the tests: its header, its records, and writing it."""

from __future__ import annotations

from pathlib import Path

HEADER = """##fileformat=VCFv4.2
##reference=GRCh38
##contig=<ID=chr5,length=181538259>
##INFO=<ID=GENEINFO,Number=1,Type=String,Description="Gene">
##INFO=<ID=CLNSIG,Number=.,Type=String,Description="ClinVar significance">
##INFO=<ID=ANN,Number=.,Type=String,Description="SnpEff: Allele|Annotation|...|HGVS.c|HGVS.p">
##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">
##FORMAT=<ID=PS,Number=1,Type=Integer,Description="Phase set">
#CHROM	POS	ID	REF	ALT	QUAL	FILTER	INFO	FORMAT	S1	S2
"""


RECORDS = [
    "chr5\t112841059\trs459552\tT\tA\t1845.7\tPASS\tGENEINFO=APC:324;CLNSIG=Benign;"
    "ANN=A|missense_variant|MODERATE|APC|ENSG1|transcript|ENST1|protein_coding|17/17|c.5465T>A|p.Val1822Asp\t"
    "GT:PS\t0|1:112841000\t1/1:.",
    "chr5\t112841100\t.\tG\tC,T\t50\tLowQual\t.\tGT:PS\t1/2:.\t0/0:.",
    "chr5\t112841200\t.\tA\tG\t.\t.\t.\tGT:PS\t./.:.\t0/1:.",
]


def write_vcf(path: Path, records: list[str]) -> Path:
    path.write_text(HEADER + "\n".join(records) + "\n")
    return path
