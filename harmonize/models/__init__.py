"""twinhub's reference twin models, each a `harmonize.models.twin_model.TwinModel` (found by the
`twinhub.models` entry points in pyproject.toml)."""
