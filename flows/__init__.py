"""The last stage: flows wire the others together as Prefect flows, and the CLI drives them.

`sync` (sync and backfill: pull -> harmonize -> land, then the store-updated event), `refresh`
(the twin models), `listen` (live sources), `deployments` (what `twinhub serve` schedules),
`config` (twinhub.toml, loaded once), `cli` (the `twinhub` command), and the demo's generated
data (`sample_export`, `sample_wearables`)."""

__all__ = ["cli", "config", "deployments", "listen", "refresh", "sample_export", "sample_wearables", "sync"]
