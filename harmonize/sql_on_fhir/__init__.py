"""SQL-on-FHIR v2: ViewDefinitions and the FHIRPath subset they use, compiled to DuckDB SQL."""
