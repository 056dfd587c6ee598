"""The `refresh-models` flow: bring every enabled twin model up to the store's latest snapshot.

Models come from the `twinhub.models` entry-point group (twinhub's own in pyproject.toml; a
user's package adds its own the same way) and run when `[models] enabled` names them. A sync
runs this flow in-process after landing (embedded defaults); under `twinhub serve` a deployment
trigger on the `twinhub.store.updated` event runs it instead. Either way the store decides
what each model must compute (twin_store.models): a repeated or missed event changes nothing.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from connectors.errors import ConfigError
from flows.config import Settings, load_settings
from flows.retries import is_retryable
from harmonize.twin_models import TwinModel
from twin_store import TwinStore
from twin_store.models import ModelRunReport, refresh

log = logging.getLogger(__name__)
ENTRY_POINTS = "twinhub.models"


@functools.cache
def registry() -> dict[str, TwinModel]:
    """Every installed model, by name."""
    models = {}
    for point in entry_points(group=ENTRY_POINTS):
        model = point.load()
        if not isinstance(model, TwinModel) or model.name != point.name:
            raise ConfigError(
                "models",
                f"entry point {point.name!r} ({point.value}) must be a TwinModel named {point.name!r}",
            )
        models[point.name] = model
    return models


def enabled_models(settings: Settings, names: list[str] | None = None) -> list[TwinModel]:
    """The enabled models (or those of `names`), checked against what is installed."""
    installed = registry()
    wanted = names if names is not None else settings.models.enabled
    if unknown := [n for n in wanted if n not in installed]:
        raise ConfigError(
            "models.enabled",
            f"no model {', '.join(map(repr, unknown))}; installed: {', '.join(installed) or 'none'}",
        )
    return [installed[n] for n in wanted]


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_retryable, cache_policy=NO_CACHE)
def refresh_model(config: str | None, name: str, trigger: str) -> ModelRunReport:
    """One model's refresh, in its own store session (the writer lock serializes it with syncs)."""
    settings = load_settings(Path(config) if config else None)
    (model,) = enabled_models(settings, [name])
    with TwinStore(settings.store.path) as store:
        report = refresh(store, model, trigger=trigger, retrain_after=settings.models.retrain_after.get(name))
    log.info(
        "model %s %s: %s from snapshot %s, %s", name, report.version, report.scope, report.input_snapshot_id,
        dict(report.counts),
    )  # fmt: skip
    return report


@flow(name="refresh-models")
def refresh_models(
    config: str | None = None, trigger: str = "manual", models: list[str] | None = None
) -> list[ModelRunReport]:
    """Refresh the enabled models (or `models`) to the store's latest snapshot."""
    settings = load_settings(Path(config) if config else None)
    return [refresh_model(config, model.name, trigger) for model in enabled_models(settings, models)]
