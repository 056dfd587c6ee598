"""One harmonizer per record format a connector emits, as dlt picks a normalizer per item format.

A source kind names its format (`SourceKind.records`); the harmonizer turns its batches into
what the store lands: FHIR resources and wearable samples as they come (the store checks and
normalizes them), lab rows and HL7 v2 messages into FHIR resources, and reportable variant calls
into Genomics Reporting resources beside their table rows. A format that maps with a source's
settings needs the config model that holds them (`lab-rows`: a LabCsvSource).

Pure: the source's mapping files (a ConceptMap, a BED file) arrive as bytes, read by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from connectors.base import Batch
from connectors.errors import ConfigError, TwinhubError
from connectors.genomics.vcf import VcfSource
from connectors.kinds import RecordFormat, SourceConfig
from connectors.labs.hl7v2 import Hl7v2Source
from connectors.labs.lab_csv import LabCsvSource
from harmonize.genomics.report import genomics_reports, reportable_set
from harmonize.labs.codes import CodeMap, code_map_from_json
from harmonize.labs.hl7v2 import resources_from_messages
from harmonize.labs.rows import observations_from_rows

Harmonize = Callable[[Iterator[Batch]], Iterator[Batch]]
Files = Mapping[str, bytes]
"""The contents of a source's mapping files, by config key (`SourceConfig.mapping_files`)."""
S = TypeVar("S", bound=SourceConfig)


def harmonizer(records: RecordFormat, source: SourceConfig, files: Files) -> Harmonize:
    """How the batches of `source`, holding `records`, become what lands. Its mapping files are
    parsed now, so a bad one fails (a ConfigError naming it) before anything lands."""
    return _HARMONIZERS[records](source, files)


def _as_they_come(source: SourceConfig, files: Files) -> Harmonize:
    return lambda batches: batches


def _lab_rows(source: SourceConfig, files: Files) -> Harmonize:
    config = _config(source, LabCsvSource, "lab-rows")
    codes = _code_map(config, files)
    return lambda batches: (observations_from_rows(batch, config, codes) for batch in batches)


def _hl7v2(source: SourceConfig, files: Files) -> Harmonize:
    config = _config(source, Hl7v2Source, "hl7v2")
    codes = _code_map(config, files)
    return lambda batches: (resources_from_messages(batch, config, codes) for batch in batches)


def _variant_calls(source: SourceConfig, files: Files) -> Harmonize:
    config = _config(source, VcfSource, "vcf")
    if config.reportable is None:
        return _as_they_come(source, files)
    bed = files.get("reportable.bed")
    try:
        reportable = reportable_set(config.reportable, bed.decode() if bed is not None else None)
    except ValueError as e:
        raise ConfigError(f"sources.{config.name}.reportable", str(e)) from None
    return lambda batches: genomics_reports(batches, config.name, reportable)


def _code_map(source: LabCsvSource | Hl7v2Source, files: Files) -> CodeMap | None:
    """The source's local-code ConceptMap, checked; a ConfigError naming the file and the fix
    when it cannot be used."""
    data = files.get("concept_map")
    if data is None:
        return None
    try:
        return code_map_from_json(data)
    except ValueError as e:
        raise ConfigError(
            f"sources.{source.name}.concept_map",
            f"{str(source.concept_map)!r} {e}; "
            "fix the file (examples/lab-codes-conceptmap.json shows the form)",
        ) from None


def _config(source: SourceConfig, model: type[S], records: str) -> S:
    if not isinstance(source, model):
        raise TwinhubError(
            f"source {source.name!r} of kind {source.kind!r} emits {records} records, which map with the "
            f"settings of a {model.__name__}; its kind's config must extend {model.__name__}"
        )
    return source


_HARMONIZERS: dict[RecordFormat, Callable[[SourceConfig, Files], Harmonize]] = {
    "fhir": _as_they_come,
    "samples": _as_they_come,
    "lab-rows": _lab_rows,
    "hl7v2": _hl7v2,
    "vcf": _variant_calls,
}
