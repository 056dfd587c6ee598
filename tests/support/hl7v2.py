"""HL7 v2 messages for the tests: a valid ORU^R01, and hostile mangled ones (hypothesis)."""

from __future__ import annotations

from hypothesis import strategies as st

MESSAGE = "\r".join(
    [
        "MSH|^~\\&|LAB|ACME||TWIN|20240301093000+0100||ORU^R01^ORU_R01|MSG001|P|2.5.1",
        "PID|1||MRN123^^^ACME^MR||Doe^Jane^Q||19800214|F",
        "OBR|1|PL1|FL1|24331-1^Lipid panel^LN|||20240301083000+0100|||||||||||||||20240301092000+0100|||F",
        "SPM|1|SP1||SER^Serum^HL70487|||||||||||||20240301083000+0100",
        "OBX|1|NM|14647-2^Cholesterol^LN||5.50|mmol/L^mmol/L^UCUM|3.0-5.2|H|||F",
        "OBX|2|NM|2085-9^HDL^LN||1.20|mmol/L^mmol/L^UCUM|>1.0|N|||P|||20240301084500",
        "OBX|3|ST|8251-1^Comment^LN||hemolysed sample||||||F",
    ]
)


NOISE = st.text(
    alphabet=st.sampled_from(list("|^~\\&\r\n0123456789.-+:ABCDEFGHIJKLMNOPQRSTUVWXYZ é\x00")), max_size=12
)
"""Separators, digits and letters, a line break, a NUL: what a mangled message is made of."""


@st.composite
def mangled_messages(draw: st.DrawFn) -> str:
    text = MESSAGE
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(NOISE) + text[at + cut :]
    return text
