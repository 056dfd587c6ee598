"""The first stage: connectors pull raw records from where a person's data lives, in batches,
since a watermark, and nothing more (no mapping, no store).

The contracts every stage shares live here, at the bottom, so that any stage can import them:
`base` (Batch, Watermark, Window, the Connector protocol), `errors` (the one error tree) and
`kinds` (source kinds as entry-point plugins). The kinds themselves are grouped by modality:
`fhir` (EHRs), `labs`, `genomics` and `wearables`. Modules named with a leading underscore are
plumbing the connectors share (files, HTTP retries, secrets, OAuth)."""

__all__ = ["base", "errors", "fhir", "genomics", "kinds", "labs", "wearables"]
