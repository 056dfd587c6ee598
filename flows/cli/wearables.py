"""`twinhub wearables connect`: a patient connects their account at a vendor, for any source kind
that offers it (`SourceKind.account`; today fitbit)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from connectors.errors import TwinhubError
from flows.cli._output import err, out, settings

app = typer.Typer(no_args_is_help=True, help="Wearable accounts: connect a patient's Fitbit.")


@app.command("connect")
def connect(
    vendor: Annotated[str, typer.Argument(help="The source kind of the account, e.g. fitbit")],
    patient: Annotated[str, typer.Option("--patient", help="The twin's Patient: key (ehr/p1) or id")],
    source: Annotated[
        str | None, typer.Option("--source", help="The source of that kind (needed when there are several)")
    ] = None,
    code: Annotated[
        str | None,
        typer.Option("--code", help="Finish a connection started earlier: the redirect address or its code"),
    ] = None,
) -> None:
    """Connect a patient's account (OAuth 2.0 with PKCE): prints the address the patient opens,
    then takes the address the vendor sends the browser back to (pasted, or later with --code)."""
    from connectors.kinds import Context, kind_names, source_kind

    kind = source_kind(vendor) if vendor in kind_names() else None
    if kind is None or kind.account is None:
        linkable = ", ".join(k for k in kind_names() if source_kind(k).account is not None)
        raise TwinhubError(f"cannot connect {vendor!r}: only {linkable} accounts are connected this way")
    cfg = settings()
    of_kind = [s for s in cfg.sources if s.kind == vendor]
    chosen = [s for s in of_kind if source in (None, s.name)]
    names = ", ".join(s.name for s in of_kind) or "none"
    if len(chosen) > 1:
        raise TwinhubError(f"there are several {vendor} sources ({names}); pick one with --source NAME")
    if not chosen:
        named = f" named {source!r}" if source else ""
        raise TwinhubError(
            f"no {vendor} source{named} in the config ({vendor} sources: {names}); add a [[sources]] table "
            f'with kind = "{vendor}" (see the docs)'
        )
    src = chosen[0]
    link = kind.account(src, Context(store=cfg.store.path))
    if code is None:
        url = link.start(patient)
        out.print(
            f"Connecting patient {patient} with source {src.name!r}. Open this address in a browser, "
            f"sign in to {link.vendor} as the patient and allow access:",
            highlight=False,
        )
        sys.stdout.write(url + "\n")  # whole, never wrapped: it is copied
        out.print("Then paste the address the browser was sent to (or the code in it):", highlight=False)
        sys.stdout.flush()
        code = sys.stdin.readline().strip()
        if not code:
            later = f"twinhub wearables connect {vendor} --patient {patient} --source {src.name} --code CODE"
            out.print(f"Nothing pasted; finish within 10 minutes with: {later}", highlight=False)
            return
    connected = link.finish(patient, code)
    out.print(connected.summary, highlight=False)
    for warning in connected.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
