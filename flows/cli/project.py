"""`twinhub init` and `twinhub check`: a project's config, written and then proven."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated

import typer

from connectors.errors import TwinhubError
from flows.cli._output import err, out, settings

STARTER = "starter.toml"


def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config")] = Path("twinhub.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite the file if it exists")] = False,
) -> None:
    """Write a commented starter twinhub.toml: the store, the models, one example per kind."""
    if path.exists() and not force:
        raise TwinhubError(f"{str(path)!r} exists; edit it, or pass --force to replace it")
    path.write_text(files("flows").joinpath(STARTER).read_text(encoding="utf-8"), encoding="utf-8")
    out.print(
        f"wrote {path}: uncomment a [[sources]] example, point it at your data, "
        "then `twinhub check` and `twinhub sync NAME`",
        highlight=False,
        markup=False,
    )


def check(
    name: Annotated[str | None, typer.Argument(help="One source (default: every source)")] = None,
) -> None:
    """Validate the config and reach each source (its files, or its server with the credentials)
    without landing anything; exits 1 when one cannot be read."""
    from connectors.kinds import Context, source_kind

    cfg = settings()
    sources = [cfg.source(name)] if name else list(cfg.sources)
    if not sources:
        out.print(
            "the config is valid and has no sources yet: add a [[sources]] table",
            highlight=False,
            markup=False,
        )
        return
    failed = 0
    for source in sources:
        try:
            source_kind(source.kind).build(source, Context(store=cfg.store.path)).check()
        except TwinhubError as e:
            failed += 1
            err.print(f"{source.name} ({source.kind}): {e}", highlight=False, markup=False, soft_wrap=True)
        else:
            out.print(f"{source.name} ({source.kind}): ok", highlight=False, markup=False)
    if failed:
        raise typer.Exit(1)
