"""When a task may be retried: decided by the error's type, never by its message."""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State

from connectors.errors import TransientError, TwinhubError


def is_retryable(task: object, task_run: object, state: State[Any]) -> bool:
    """Retry what may pass (timeouts, lock contention, unknown faults), never a user mistake."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, TwinhubError) or isinstance(error, TransientError)
