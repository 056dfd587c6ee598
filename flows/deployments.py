"""All deployments in one place: one scheduled `sync` per source that has a `schedule`, and, when
models are enabled, `refresh-models` run by a trigger on every `twinhub.store.updated` event of
the project. Their names and tags carry the project's name (`[project] name`), so projects that
share a Prefect server never overwrite each other's deployments nor trigger each other's
refreshes."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Coroutine
from types import FrameType
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from connectors.errors import ConfigError
from flows.config import Settings
from flows.refresh import refresh_models, served_as
from flows.sync import STORE_UPDATED, sync

REFRESH_TRIGGER = (
    "event {{ event.payload.flow }} {{ event.payload.run_id }} of {{ event.payload.source }} "
    "at snapshot {{ event.payload.snapshot_id }}"
)
"""What `model_run.trigger` says of a refresh the event started (a Jinja template the
automation renders from the event)."""
POLL_SECONDS = 1.0
"""How often the served runner asks for runs to start: Prefect's default, 10 s, would be most of
the time from a sync's end to its models' refresh (the rest: the automation ~2 s, the run's
process starting ~3-9 s, the refresh itself)."""
RUNS_AT_ONCE = 1
"""The served runs go one at a time: the store takes one writer (syncs and refreshes queue here
instead of waiting on its lock, which gives up after 5 minutes)."""


def deployments(settings: Settings, config: str | None) -> list[RunnerDeployment]:
    """A `sync` per scheduled source, plus `refresh-models` on the event when models are
    enabled (the served syncs then leave refreshing to it)."""
    refresh = bool(settings.models.enabled)
    project = settings.project.name
    served = [
        made(
            sync.to_deployment(
                name=f"{s.name}@{project}",
                cron=s.schedule,
                parameters={"source": s.name, "config": config} | ({"refresh": False} if refresh else {}),
                tags=["twinhub", f"project:{project}", f"source:{s.name}"],
            )
        )
        for s in settings.sources
        if s.schedule
    ]
    if refresh:
        trigger = DeploymentEventTrigger(
            name=f"twinhub-refresh-on-store-updated@{project}",
            description="Refresh the enabled twin models after a sync or backfill lands data",
            expect={STORE_UPDATED},
            match={"prefect.resource.id": "twinhub.source.*", "twinhub.project": project},
            parameters={
                "config": config,
                "trigger": REFRESH_TRIGGER,
                "snapshot_id": "{{ event.payload.snapshot_id }}",
            },
        )
        served.append(
            made(
                refresh_models.to_deployment(
                    name=served_as(project),
                    parameters={"config": config},
                    triggers=[trigger],
                    tags=["twinhub", f"project:{project}", "models"],
                )
            )
        )
    if not served:
        raise ConfigError(
            "sources.schedule",
            'nothing to serve: no source has a schedule and no model is enabled; add e.g. `schedule = "0 2 '
            '* * *"` to a [[sources]] table, or `enabled = ["ascvd-pce"]` to [models]',
        )
    return served


def made(deployment: RunnerDeployment | Coroutine[Any, Any, RunnerDeployment]) -> RunnerDeployment:
    """`to_deployment` returns a coroutine only when called from async code, never here."""
    assert isinstance(deployment, RunnerDeployment)
    return deployment


def serve_sources(settings: Settings, config: str | None) -> None:
    served = deployments(settings, config)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        serve(*served, limit=RUNS_AT_ONCE, query_seconds=POLL_SECONDS)
