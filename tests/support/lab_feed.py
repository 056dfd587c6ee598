"""A lab feed whose results name their patient by MRN, and landing a source through the real
pipeline in this process (the linkage and per-source identity tests share them)."""

from __future__ import annotations

from pathlib import Path

from connectors.fhir.ndjson import FhirNdjsonConnector, FhirNdjsonSource
from connectors.labs.hl7v2 import Hl7v2Connector, Hl7v2Source
from flows.sync import harmonized, land_batches
from twin_store import RunReport, TwinStore

MRN = "http://hospital.example.org/mrn"


def land(store: Path, source: Hl7v2Source | FhirNdjsonSource) -> RunReport:
    with TwinStore(store) as st:
        run = st.begin_run(source.name, "sync")
        if isinstance(source, Hl7v2Source):
            land_batches(st, run, harmonized(source, Hl7v2Connector(source).pull(None)))
        else:
            land_batches(st, run, FhirNdjsonConnector(source).pull(None))
        return st.finish_run(run, "succeeded")


def lab_feed(folder: Path, message: str) -> Hl7v2Source:
    """An HL7 v2 source whose results name their patient by the ACME MRN and make no Patient."""
    (folder / "in.hl7").write_text(message)
    return Hl7v2Source(
        name="labs",
        kind="hl7v2",
        path=folder / "in.hl7",
        patient_systems={"ACME": MRN},
        create_patients=False,
    )
