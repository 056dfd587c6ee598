"""The second stage: harmonize turns raw records into FHIR R4 with standard codes (LOINC, UCUM,
SNOMED) and checks them, purely: data in, resources (or rows) and a list of problems out; no I/O,
no clock, no environment.

`formats` picks the harmonizer for the record format a source kind emits; `fhir_checks` checks
every resource structurally; `records` is what the mappings share. By modality: `labs`, `genomics`,
`wearables`; then `sql_on_fhir` (ViewDefinitions compiled to SQL) and `models` (the twin models'
seam and the reference models). Mapping rules are data: the TOML files beside the code."""

__all__ = ["fhir_checks", "formats", "genomics", "labs", "models", "records", "sql_on_fhir", "wearables"]
