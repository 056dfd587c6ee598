"""Variant calls to FHIR Genomics Reporting resources, for the variants a source declares reportable."""
