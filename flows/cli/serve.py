"""`twinhub serve`: the deployments, served until stopped."""

from __future__ import annotations

from flows.cli._output import config_arg, err, settings


def serve() -> None:
    """Serve one scheduled sync per source with a `schedule`, and the refresh of the enabled
    models on every sync's event (stops on SIGTERM)."""
    from flows.deployments import serve_sources

    cfg = settings()
    if cfg.models.enabled and cfg.models.refresh_after_sync:
        err.print(
            "note: syncs started outside this serve also refresh the models themselves; give them "
            "--no-refresh, or set refresh_after_sync = false under [models], to leave it to the trigger",
            highlight=False,
            markup=False,
        )
    serve_sources(cfg, config_arg())
