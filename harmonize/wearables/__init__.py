"""Wearable samples to standard codes and units, and each day's rollup to FHIR Observations."""
