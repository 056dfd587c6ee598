"""HL7 v2 messages split into segments and fields, read as python-hl7 reads them, but lazily.

`hl7.parse` builds a container for every field, repetition, component and sub-component of
every segment (about 740 objects for a 14-segment lab message) and spends ~3 ms per message
doing it: on its own slower than the 500 messages/s the ingest must reach. The mapping reads
some 40 values per message. Here a message is split into segments and fields once, and a
field into repetitions and components only when it is read, with the same numbering, the same
separators (from MSH-1 and MSH-2), the same special MSH/BHS/FHS headers and the same values
(text as sent, escapes not decoded, stripped) as python-hl7's `Segment(field)(repeat)(component)`.
`tests/harmonize/labs/test_hl7v2_segments.py` checks that against python-hl7 on every shared
message and on mangled ones.
"""

from __future__ import annotations

HEADERS = ("MSH", "BHS", "FHS")
"""Segments whose first field is the field separator itself (python-hl7 treats all three so)."""


class Segment:
    """One segment: `name`, and its fields numbered as HL7 does (MSH-1 is the separator)."""

    __slots__ = ("_components", "_header", "_repetitions", "_subcomponents", "fields", "name")

    def __init__(self, text: str, separators: str) -> None:
        field, self._repetitions, self._components = separators[0], separators[1], separators[2]
        self._subcomponents = separators[3]
        self._header = text[:3] in HEADERS
        if self._header:
            if len(text) < 4:
                raise ValueError(f"segment {text!r} has no field separator")
            end = text.find(text[3], 4)  # python-hl7 takes MSH-2 up to the next separator
            rest = text[end + 1 :]
            self.fields = [text[:3], text[3], text[4:end], *(rest.split(field) if rest else [])]
        else:
            self.fields = text.split(field)
        self.name = self.fields[0]

    def __len__(self) -> int:
        return len(self.fields)

    def raw(self, field: int) -> str:
        """Field `field` as sent (repetitions and components not split), '' where absent."""
        return self.fields[field] if 0 <= field < len(self.fields) else ""

    def get(self, field: int, component: int = 1, repeat: int = 1, subcomponent: int = 0) -> str:
        """The text at field.component of a repeat (1-based, as HL7 numbers them), stripped, ''
        where absent. A component's sub-components come joined, as sent, unless `subcomponent`
        (1-based) asks for one of them."""
        if subcomponent:
            parts = self.get(field, component, repeat).split(self._subcomponents)
            return parts[subcomponent - 1].strip() if subcomponent <= len(parts) else ""
        if not 0 <= field < len(self.fields) or component < 1 or repeat < 1:
            return ""
        text = self.fields[field]
        if self._header and field < 3:  # the name and the separators themselves: never split
            return text.strip() if component == repeat == 1 else ""
        repeats = text.split(self._repetitions, repeat)  # no further than asked
        if repeat > len(repeats):
            return ""
        components = repeats[repeat - 1].split(self._components, component)
        return components[component - 1].strip() if component <= len(components) else ""

    def repetitions(self, field: int) -> list[str]:
        """Field `field`'s repetitions as sent (components not split)."""
        return self.raw(field).split(self._repetitions)

    def repeats(self, field: int) -> int:
        """How many repetitions field `field` holds (1 where absent)."""
        if not 0 <= field < len(self.fields) or (self._header and field < 3):
            return 1
        return self.fields[field].count(self._repetitions) + 1


def segments(text: str) -> list[Segment]:
    """The segments of one message (CR-separated, starting with MSH), in order; raises
    ValueError where python-hl7 could not parse it either."""
    text = text.strip()
    if not text.startswith("MSH") or len(text) < 8:
        raise ValueError(f"does not start with an MSH segment and its separators: {text[:20]!r}")
    # field, repetition, component, sub-component (MSH-1, MSH-2.2, MSH-2.1, MSH-2.4)
    separators = text[3] + text[5] + text[4] + text[7]
    return [Segment(line, separators) for line in text.split("\r")]
