"""`twinhub serve`: the deployments, served until stopped."""

from __future__ import annotations

from flows.cli._output import config_arg, err, settings


def serve() -> None:
    """Serve one scheduled sync per source with a `schedule`, and the refresh of the enabled
    models on every sync's event (stops on SIGTERM)."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import serve_sources

    cfg = settings()
    if cfg.models.enabled and not PREFECT_API_URL.value():
        note = (
            "no Prefect server is set (PREFECT_API_URL), so syncs started outside this serve report to "
            "temporary servers of their own and refresh the models themselves, --no-refresh or not; "
            "to leave it to this serve's trigger, run `prefect server start` and set PREFECT_API_URL "
            "for both"
        )
    elif cfg.models.enabled and cfg.models.refresh_after_sync:
        note = (
            "syncs started outside this serve refresh the models themselves too; give them "
            "--no-refresh, or set refresh_after_sync = false under [models], to leave it to its trigger"
        )
    else:
        note = None
    if note:
        err.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    serve_sources(cfg, config_arg())
