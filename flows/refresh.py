"""The `refresh-models` flow: bring every enabled twin model up to the store's latest snapshot.

Models come from the `twinhub.models` entry-point group (twinhub's own in pyproject.toml; a
user's package adds its own the same way) and run when `[models] enabled` names them. A sync
runs this flow in-process after landing (embedded defaults); under `twinhub serve` a deployment
trigger on the `twinhub.store.updated` event runs it instead (`flows.sync.refresh_here` decides).
Either way the store decides what each model must compute (twin_store.models): a repeated or
missed event changes nothing.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from connectors.errors import ConfigError
from flows.config import Settings, load_settings
from flows.retries import is_retryable
from harmonize.models.twin_model import TwinModel
from twin_store import TwinStore
from twin_store.models import ModelRunReport, refresh

log = logging.getLogger(__name__)
ENTRY_POINTS = "twinhub.models"


def served_as(project: str) -> str:
    """The name of a project's `refresh-models` deployment under `twinhub serve`."""
    return project


def installed() -> dict[str, EntryPoint]:
    """Every installed model's entry point, by name (loaded only when used: one broken
    third-party model never stops the others)."""
    return {point.name: point for point in entry_points(group=ENTRY_POINTS)}


@functools.cache
def load_model(name: str) -> TwinModel:
    points = installed()
    if name not in points:
        raise ConfigError("models.enabled", f"no model {name!r}; installed: {', '.join(points) or 'none'}")
    point = points[name]
    try:
        model = point.load()
    except Exception as e:
        raise ConfigError("models.enabled", f"model {name!r} ({point.value}) does not load: {e}") from None
    if not isinstance(model, TwinModel) or model.name != name:
        raise ConfigError(
            "models.enabled", f"entry point {name!r} ({point.value}) must be a TwinModel named {name!r}"
        )
    return model


def enabled_models(settings: Settings, names: list[str] | None = None) -> list[TwinModel]:
    """The enabled models (or those of `names`), loaded."""
    return [load_model(n) for n in (names if names is not None else settings.models.enabled)]


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_retryable, cache_policy=NO_CACHE)
def refresh_model(
    config: str | None, name: str, trigger: str, snapshot_id: int | None = None
) -> ModelRunReport:
    """One model's refresh, in its own store session (the writer lock serializes it with syncs)."""
    settings = load_settings(Path(config) if config else None)
    (model,) = enabled_models(settings, [name])
    with TwinStore(settings.store.path) as store:
        retrain_after = settings.models.retrain_after.get(name)
        report = refresh(store, model, trigger=trigger, retrain_after=retrain_after, at=snapshot_id)
    log.info(
        "model %s %s: %s from snapshot %s, %s",
        name,
        report.version,
        report.scope,
        report.input_snapshot_id,
        dict(report.counts),
    )
    return report


@flow(name="refresh-models")
def refresh_models(
    config: str | None = None,
    trigger: str = "manual",
    models: list[str] | None = None,
    snapshot_id: int | None = None,
) -> list[ModelRunReport]:
    """Refresh the enabled models (or `models`) to the store's latest snapshot, or to
    `snapshot_id` (a sync's, named by its event)."""
    settings = load_settings(Path(config) if config else None)
    return [refresh_model(config, m.name, trigger, snapshot_id) for m in enabled_models(settings, models)]
