"""The VCF spec checks on small files of our own: a broken header rejects the file with its
line and rule; a record that breaks a rule is named in a warning."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.genomics import vcf_checks
from connectors.genomics.vcf_checks import VcfSpecError, check_text

HEADER = [
    "##fileformat=VCFv4.3",
    "##contig=<ID=1,length=249250621>",
    '##FILTER=<ID=q10,Description="Quality below 10">',
    '##INFO=<ID=DP,Number=1,Type=Integer,Description="Depth">',
    '##INFO=<ID=AF,Number=A,Type=Float,Description="Allele frequency">',
    '##INFO=<ID=DB,Number=0,Type=Flag,Description="dbSNP">',
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
    '##FORMAT=<ID=GQ,Number=1,Type=Integer,Description="Genotype quality">',
    '##FORMAT=<ID=PL,Number=G,Type=Integer,Description="Likelihoods">',
    "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\tS2",
]
RECORDS = [
    "1\t100\trs1\tA\tG\t50\tPASS\tDP=10;AF=0.5;DB\tGT:GQ:PL\t0/1:30:10,0,20\t1|1:40:30,20,0",
    "1\t200\t.\tAC\tA,ACC\t.\tq10\tAF=0.1,0.2\tGT:GQ\t1/2:7\t./.:.",
    "1\t300\trs3;rs4\tT\t<DEL>,*\t3.5e1\t.\t.\tGT\t0|2\t0",
]


def text(header: list[str] = HEADER, records: list[str] = RECORDS) -> str:
    return "\n".join([*header, *records]) + "\n"


def reasons(vcf: str) -> list[tuple[int, str]]:
    found = check_text("f.vcf", vcf)
    return list(zip(found["line_no"].to_pylist(), found["reason"].to_pylist(), strict=True))


def test_a_clean_file_has_no_warnings() -> None:
    assert reasons(text()) == []


@pytest.mark.parametrize(
    ("line", "replacement", "expected"),
    [
        (0, "##fileformat=VCF v4.3", "unknown fileformat"),
        (0, "##source=me", "the first line must be ##fileformat"),
        (1, "##contig=<ID=chr 1>", "must be quoted"),
        (1, "##contig=<length=12>", "contig line has no ID"),
        (1, "##contig=<ID=chr:1>", "not a valid contig name"),
        (2, '##FILTER=<ID=q10,Description="open>', "not closed"),
        (3, '##INFO=<ID=DP,Number=N,Type=Integer,Description="Depth">', "Number 'N'"),
        (3, '##INFO=<ID=DP,Number=1,Type=Int,Description="Depth">', "Type 'Int'"),
        (3, "##INFO=<ID=DP,Number=1,Type=Integer,Description=Depth>", "Description must be in double quotes"),
        (3, '##INFO=<ID=DP,Type=Integer,Number=1,Description="Depth">', "in the order ID, Number, Type"),
        (3, "##just some text", "##key=value"),
        (3, "##reference=", "empty value"),
        (9, "#CHROM\tPOSITION\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\tS2", "#CHROM POS ID"),
        (9, "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\tS1", "sample names must be unique"),
    ],
)
def test_a_broken_header_rejects_the_file_naming_line_and_rule(
    line: int, replacement: str, expected: str
) -> None:
    header = list(HEADER)
    header[line] = replacement
    with pytest.raises(VcfSpecError) as rejected:
        check_text("f.vcf", text(header))
    assert rejected.value.line_no == line + 1
    assert expected in rejected.value.reason


def test_a_reserved_key_declared_with_another_type_is_a_warning_on_its_line() -> None:
    header = list(HEADER)
    header[3] = '##INFO=<ID=DP,Number=1,Type=Float,Description="Depth">'
    assert reasons(text(header)) == [(4, "reserved INFO DP must be Number=1, Type=Integer")]


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        (0, "chr,1", "CHROM chr,1 is not a valid contig name"),
        (1, "12a", "POS 12a is not a positive integer"),
        (1, "-1", "POS -1 is not a positive integer"),
        (2, "rs1;rs1", "names one identifier twice"),
        (2, "rs 1", "must be . or ;-separated names"),
        (3, "AX", "REF AX must be bases"),
        (3, "A,C", "REF A,C must be bases"),
        (4, "R", "ALT R is not a list of alleles"),
        (4, "<DEL>X>", "is not a list of alleles"),
        (4, "[1:100[", "is not a list of alleles"),
        (5, "-3", "QUAL -3 must be . or a number >= 0"),
        (5, "high", "QUAL high must be"),
        (6, "q10;", "FILTER q10; must be"),
        (6, "q10;.", "FILTER q10;. must be"),
        (6, "q10;q10", "FILTER q10;q10 must be"),
        (7, "DP=1.5", "INFO DP=1.5 is not of Type Integer"),
        (7, "DP=1,2", "INFO DP=1,2 does not have the number of values"),
        (7, "AF=0.1,0.2", "INFO AF=0.1,0.2 does not have the number of values"),
        (7, "DB=2", "DB is a Flag and takes no value"),
        (7, "DP=1;DP=2", "names a key more than once"),
        (7, "DP=-1", "DP cannot be negative"),
        (7, "DP=2147483648", "INFO DP=2147483648 is not of Type Integer"),
        (7, "DP", "DP needs a value"),
        (8, "GQ:GT:PL", "GT first"),
        (8, "GT:GQ:GQ", "each once"),
        (9, "0/2:30:10,0,20", "names an allele ALT does not have"),
        (9, "0/x:30:10,0,20", "is not a valid GT"),
        (9, "0/1:3.5:10,0,20", "GQ=3.5 is not of Type Integer"),
        (9, "0/1:30:10,0", "PL=10,0 does not have the number of values"),
        (9, "0/1:30:10,0,20:5", "has more fields than FORMAT has keys"),
        (9, "0/1:2147483648:10,0,20", "GQ=2147483648 is not of Type Integer"),
        (9, "1:30:10,0,20", "PL=10,0,20 does not have the number of values"),  # haploid: 2 likelihoods
        (9, "0/1:30:10,0,2e", "PL=10,0,2e is not of Type Integer"),
    ],
)
def test_a_record_that_breaks_a_rule_is_named_in_a_warning(column: int, value: str, expected: str) -> None:
    fields = RECORDS[0].split("\t")
    fields[column] = value
    found = reasons(text(records=["\t".join(fields), *RECORDS[1:]]))
    assert {n for n, _ in found} == {len(HEADER) + 1}, found
    assert any(expected in reason for _, reason in found), found


def test_sample_columns_with_odd_but_valid_values_have_no_warnings() -> None:
    columns = ["1:30:10,0", "0/1:0000000030:10,0,20", "0/1", "./.:.:.", "0/1::10,.,20", "0|1:-0:+1,0,2"]
    records = [f"1\t{100 + n}\t.\tA\tG\t.\t.\t.\tGT:GQ:PL\t{c}\t0/0" for n, c in enumerate(columns)]
    assert reasons(text(records=records)) == []


SAMPLE_KEYS = {  # a FORMAT key per Type and Number
    "I1": ("1", "Integer"),
    "I2": ("2", "Integer"),
    "IA": ("A", "Integer"),
    "IR": ("R", "Integer"),
    "IG": ("G", "Integer"),
    "IX": (".", "Integer"),
    "I0": ("0", "Integer"),
    "F1": ("1", "Float"),
    "FA": ("A", "Float"),
    "C2": ("2", "Character"),
    "SR": ("R", "String"),
    "SX": (".", "String"),
}
ATOMS = [
    "0",
    "7",
    "-1",
    "+5",
    "999999999",
    "2147483647",
    "2147483648",
    "-2147483641",
    "00012345678901",
    ".",
    "",
    "1.5",
    "1e5",
    "-1e-3",
    ".5",
    "inf",
    "NaN",
    "a",
    "é",
    "1x",
]


@st.composite
def sample_lines(draw: st.DrawFn) -> list[str]:
    """Data lines whose sample columns hold values of every Type and Number, mostly valid."""
    lines = []
    for n in range(draw(st.integers(1, 12))):
        keys = ["GT", *draw(st.lists(st.sampled_from(sorted(SAMPLE_KEYS)), max_size=4))]
        alt = draw(st.sampled_from([".", "C", "C,G", "C,G,T"]))
        columns = []
        for _ in range(2):
            values = [draw(st.sampled_from(["0/1", "1|1", "1", "./.", "0/0/1", "2", "0/x"]))]
            for _ in keys[1:]:
                count = draw(st.integers(1, 4))
                values.append(",".join(draw(st.sampled_from(ATOMS)) for _ in range(count)))
            columns.append(":".join(values[: draw(st.integers(1, len(values) + 1))]))
        lines.append(f"1\t{100 + n}\t.\tA\t{alt}\t.\t.\t.\t{':'.join(keys)}\t{columns[0]}\t{columns[1]}")
    return lines


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample_lines())
def test_sample_columns_judged_by_their_shape_get_the_warnings_of_value_by_value(lines: list[str]) -> None:
    """A sample column that matches its shape's regex is never judged value by value: the regex
    must let through only what every value rule lets through."""
    header = [
        *HEADER[:6],
        *(f'##FORMAT=<ID={k},Number={n},Type={t},Description="x">' for k, (n, t) in SAMPLE_KEYS.items()),
        *HEADER[6:],
    ]
    vcf = text(header, lines)
    by_shape = reasons(vcf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vcf_checks, "_clean_cells", lambda keys: "false")  # every column value by value
        assert reasons(vcf) == by_shape


def test_order_duplicates_columns_and_the_last_newline() -> None:
    records = [
        RECORDS[0],
        RECORDS[0].replace("\tA\tG\t", "\tAT\tGT\t"),  # the same variant, spelled longer
        "2\t50\t.\tA\tG\t.\t.\t.\tGT\t0/1\t0/0",
        "2\t40\t.\tA\tG\t.\t.\t.\tGT\t0/1\t0/0",
        "1\t900\t.\tA\tG\t.\t.\t.\tGT\t0/1\t0/0",
        "1\t901\t.\tA\tG\t.\t.\t.\tGT\t0/1",
    ]
    found = reasons(text(records=records).removesuffix("\n"))
    first = len(HEADER) + 1
    assert found == [
        (first + 1, "variant 1:100 A>G is also on line 11"),
        (first + 3, "records are not sorted: POS 40 comes after 50"),
        (first + 4, "records of 1 are not contiguous (it appeared before)"),
        (first + 5, "a data line must have 11 tab-separated columns, not 10"),
        (first + 5, "the last line does not end with a newline"),
    ]


def test_only_the_first_warnings_of_a_file_are_kept_with_a_count_of_the_rest() -> None:
    records = [f"1\t{100 + n}\t.\tA\tG\t-1\t.\t.\tGT\t0/1\t0/0" for n in range(1005)]
    found = reasons(text(records=records))
    assert len(found) == 1001
    assert found[-1] == (0, "5 more spec violations not recorded (only the first 1000 are)")


def test_an_empty_file_is_rejected() -> None:
    with pytest.raises(VcfSpecError, match="empty"):
        check_text("f.vcf", "")
