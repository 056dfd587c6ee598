"""Settings: `twinhub.toml` loaded once into a typed object; `TWINHUB_*` env vars override."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from connectors.errors import ConfigError
from connectors.kinds import MappingFile, SourceConfig, kind_names, source_kind

DEFAULT_CONFIG = Path("twinhub.toml")
AUTH_TYPES = ("none", "bearer", "basic", "smart")


class ProjectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    """Names this project's Prefect deployments (`sync/<source>@<name>`, `refresh-models/<name>`)
    and events, so projects that share a Prefect server never mix; default: the config file's
    folder name."""

    @field_validator("name")
    @classmethod
    def _usable(cls, name: str) -> str:
        if bad := set(name) & set("/%&<>@"):
            raise ValueError(f"project name {name!r} may not hold {''.join(sorted(bad))}")
        return name


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Path(".twinhub")


class ViewsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path | None = None
    """A folder of the user's own ViewDefinitions (*.json), beside the standard library."""


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: list[str] = []
    """Twin models to refresh (names of `twinhub.models` entry points; `twinhub models list`)."""
    refresh_after_sync: bool = True
    """Refresh the enabled models in the sync itself; false leaves it to the trigger of a
    `twinhub serve` on the sync's Prefect server (a sync that finds none refreshes them anyway)."""
    retrain_after: dict[str, int] = {}
    """Model name -> how many new patients make a model that learns fit itself again."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TWINHUB_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    project: ProjectConfig = ProjectConfig()
    store: StoreConfig = StoreConfig()
    views: ViewsConfig = ViewsConfig()
    models: ModelsConfig = ModelsConfig()
    sources: list[SourceConfig] = []
    """Each of its kind's config model (`connectors.kinds`), checked by `load_settings`."""

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none configured"
        raise ConfigError(
            f"sources.{name}",
            f"no such source (known: {known}); add a [[sources]] table with that name to the config file",
        )


def load_settings(path: Path | None = None) -> Settings:
    """Load `path` (or $TWINHUB_CONFIG, or ./twinhub.toml if present); relative paths in it are
    relative to the file's folder."""
    explicit = path or (Path(os.environ["TWINHUB_CONFIG"]) if "TWINHUB_CONFIG" in os.environ else None)
    file = explicit or DEFAULT_CONFIG
    if explicit and not file.is_file():
        raise ConfigError(
            "file",
            f"{str(file)!r} does not exist; pass --config PATH to a "
            "twinhub.toml (docs/getting-started.md shows one)",
        )

    class FileSettings(Settings):
        sources: list[dict[str, Any]] = []  # type: ignore[assignment]  # each checked by its kind below

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=file if file.is_file() else None)
            return env_settings, toml, init_settings

    try:
        raw = FileSettings()
    except ValidationError as e:
        raise _config_error(file, e) from None
    except ValueError as e:  # TOML syntax
        raise ConfigError("file", f"{str(file)!r} is not valid TOML ({e}); fix the syntax") from None
    sources = [_source(file, n, table) for n, table in enumerate(raw.sources)]
    _check_sources(sources)
    settings = Settings.model_construct(
        project=raw.project, store=raw.store, views=raw.views, models=raw.models, sources=sources
    )
    return _resolve_paths(settings, file.resolve().parent)


def _source(file: Path, n: int, table: dict[str, Any]) -> SourceConfig:
    """One `[[sources]]` table, checked by the config model of the kind it names."""
    kind = table.get("kind")
    if kind is None:
        raise ConfigError(f"sources[{n}].kind", f"is required; add `kind = ...` there in {file}")
    if kind not in kind_names():
        raise ConfigError(f"sources[{n}]", f"unknown kind {kind!r}; use one of: {', '.join(kind_names())}")
    try:
        config: SourceConfig = source_kind(kind).config.model_validate(table)
    except ValidationError as e:
        raise _config_error(file, e, at=("sources", n)) from None
    return config


def _check_sources(sources: list[SourceConfig]) -> None:
    names = [s.name for s in sources]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError("sources", f"source names must be unique; {', '.join(dupes)} appear twice")
    for source in sources:
        if source.schedule is not None:
            from prefect.client.schemas.schedules import CronSchedule  # Prefect is slow to import

            try:
                CronSchedule(cron=source.schedule)
            except ValidationError:
                raise ConfigError(
                    "sources",
                    f"schedule {source.schedule!r} of source {source.name!r} is not a cron "
                    "expression; use five fields, e.g. '0 2 * * *' for 02:00 daily",
                ) from None


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Every path in the file (data, key and token files) is relative to the file's folder."""
    project = ProjectConfig(name=settings.project.name or _folder_name(base))
    store = StoreConfig(path=base / settings.store.path)
    views = ViewsConfig(path=base / settings.views.path if settings.views.path else None)
    sources = [_rebase(s, base) for s in settings.sources]
    return Settings.model_construct(
        project=project, store=store, views=views, models=settings.models, sources=sources
    )


def _folder_name(folder: Path) -> str:
    """A project's default name: its config file's folder's, less what deployment names refuse."""
    return "".join(c for c in folder.name if c not in "/%&<>@") or "twinhub"


def _rebase(model: Any, base: Path) -> Any:
    update = {
        name: base / value if isinstance(value, Path) else _rebase(value, base)
        for name, value in model
        if isinstance(value, Path | BaseModel)
    }
    return model.model_copy(update=update) if update else model


def _config_error(file: Path, error: ValidationError, at: tuple[str | int, ...] = ()) -> ConfigError:
    """The first problem as one line: which key (under `at`), what is wrong, how to fix it."""
    first: Any = error.errors()[0]
    loc = [*at, *(p for p in first["loc"] if p not in AUTH_TYPES)]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "file"
    if first["type"] == "union_tag_invalid":
        tag, field = first["ctx"]["tag"], first["ctx"]["discriminator"].strip("'")
        return ConfigError(key, f"unknown {field} {tag!r}; use one of: {', '.join(AUTH_TYPES)}")
    if first["type"] == "missing":
        return ConfigError(key, f"is required; add `{loc[-1]} = ...` there in {file}")
    if first["type"] == "extra_forbidden":
        return ConfigError(key, f"is not a known setting; remove it from {file} or check spelling")
    return ConfigError(key, f"{first['msg'].removeprefix('Value error, ')} (in {file})")


def mapping_files(source: SourceConfig) -> dict[str, bytes]:
    """The contents of the source's mapping files (a ConceptMap, a BED file), read now, so a
    missing one fails the sync before anything lands."""
    return {key: _read(source, key, file) for key, file in source.mapping_files().items()}


def _read(source: SourceConfig, key: str, file: MappingFile) -> bytes:
    try:
        return file.path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"sources.{source.name}.{key}",
            f"cannot read {str(file.path)!r} ({e.strerror}); point it at {file.about}",
        ) from None
