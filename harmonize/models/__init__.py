"""twinhub's reference twin models, each a `harmonize.twin_models.TwinModel` (found by the
`twinhub.models` entry points in pyproject.toml)."""
