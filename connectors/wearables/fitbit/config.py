"""Config of a `fitbit` source: the application registered at Fitbit, what to pull, and where
the patients' tokens are kept."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from connectors._secrets import refuse_inline_secrets
from connectors.kinds import SourceConfig

Data = Literal["heart_rate", "steps", "sleep", "spo2", "weight"]
ALL_DATA: tuple[Data, ...] = ("heart_rate", "steps", "sleep", "spo2", "weight")
SCOPE: dict[Data, str] = {
    "heart_rate": "heartrate",
    "steps": "activity",
    "sleep": "sleep",
    "spo2": "oxygen_saturation",
    "weight": "weight",
}
"""The scope Fitbit asks a patient to allow for each kind of data."""
Scope = Literal[
    "activity",
    "heartrate",
    "location",
    "nutrition",
    "oxygen_saturation",
    "profile",
    "respiratory_rate",
    "settings",
    "sleep",
    "social",
    "temperature",
    "weight",
]
DEFAULT_SCOPES: tuple[Scope, ...] = (
    "activity",
    "heartrate",
    "sleep",
    "weight",
    "oxygen_saturation",
    "profile",
    "settings",
)
"""The data's scopes, and the patient's time zone (profile) and devices (settings): without
those two, `timezone` and device "Fitbit" stand in."""
SECRETS = ("client_secret", "token_key", "access_token", "refresh_token", "token")
"""Keys a config must not hold: secrets go in files or environment variables."""


class FitbitSource(SourceConfig):
    """Config of a `fitbit` source."""

    kind: Literal["fitbit"]
    client_id: str
    redirect_uri: str
    """Exactly as registered with the application at Fitbit."""
    client_secret_file: Path | None = None
    """Server apps authenticate with a client secret (HTTP Basic); client and personal apps use
    PKCE alone and send client_id in the body: set neither."""
    client_secret_env: str | None = None
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    """What a connection asks for; the data pulled is what these (and the patient) allow."""
    since: date | None = None
    """The first day pulled for a newly connected patient (default: 30 days before today)."""
    intraday: bool = True
    """Per-minute heart rate, steps and SpO2 (Fitbit grants intraday data to personal apps and
    to apps it approved); false: daily steps, resting heart rate and nightly SpO2, by range."""
    overlap_days: int = Field(default=1, ge=0, le=30)
    timezone: str = "UTC"
    """For patients who did not share their profile (its time zone places their local times)."""
    token_file: Path | None = None
    """The encrypted tokens (default: secrets/<source name>.tokens in the store folder)."""
    token_key_env: str | None = None
    """The key that encrypts them; else `token_key_file`, else `<token file>.key`, made on first use."""
    token_key_file: Path | None = None
    max_wait_seconds: float = Field(default=60, ge=0)
    """Wait this long at most for the rate limit; a longer wait leaves the patient for next time."""
    batch_samples: int = Field(default=200_000, ge=1, le=500_000)
    api_url: str = "https://api.fitbit.com"
    authorize_url: str = "https://www.fitbit.com/oauth2/authorize"
    token_url: str = "https://api.fitbit.com/oauth2/token"
    timeout_seconds: float = Field(default=60, gt=0)
    retries: int = Field(default=5, ge=0, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        return refuse_inline_secrets(data, SECRETS)

    @model_validator(mode="after")
    def _check(self) -> FitbitSource:
        if not any(SCOPE[d] in self.scopes for d in ALL_DATA):
            wanted = ", ".join(sorted(SCOPE.values()))
            raise ValueError(f"scopes allow no data to pull; add at least one of {wanted}")
        for what in ("client_secret", "token_key"):
            if getattr(self, f"{what}_file") is not None and getattr(self, f"{what}_env") is not None:
                raise ValueError(f"set at most one of {what}_file or {what}_env")
        return self

    @field_validator("api_url", "authorize_url", "token_url", "redirect_uri")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/") if parts.path in ("", "/") else url

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {name!r} is not an IANA time zone, e.g. 'Europe/Berlin'") from None
        return name

    def token_path(self, store: Path) -> Path:
        """Where the encrypted tokens live, given the store folder."""
        return self.token_file or store / "secrets" / f"{self.name}.tokens"

    def data(self) -> list[Data]:
        """The kinds of data the configured scopes allow, in pull order."""
        return [d for d in ALL_DATA if SCOPE[d] in self.scopes]
