"""EHR data from FHIR: Bulk Data NDJSON files, and FHIR servers read by search or by `$export`."""
