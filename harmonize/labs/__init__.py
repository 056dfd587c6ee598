"""Lab results to FHIR: local codes to LOINC and units to UCUM (`codes`), CSV rows (`rows`) and
HL7 v2 ORU/OUL messages (`hl7v2`) to Observations and DiagnosticReports."""
