"""How the CLI runs Prefect: no telemetry, its state in the project's store, and runs that Ctrl-C
stops cleanly.

Without a Prefect server (no PREFECT_API_URL) Prefect starts a temporary one, a child process of
the command. Started by Prefect on first use it sits in the terminal's process group, so Ctrl-C
stopped it too, and the interrupted run then spent a minute retrying to report its end to it.
`stoppable` starts it first, deaf to Ctrl-C (SIGINT blocked), and stops it when the command
exits, after Prefect has sent it everything.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer


def defaults(config: Path | None, *, make_home: bool = True) -> None:
    """Prefect's settings for the CLI, set before Prefect is imported: no telemetry (nor its
    notice), and its state (the temporary server's database, results) in the project's store,
    `<store>/.prefect`, unless PREFECT_HOME is set: each project keeps its own, and nothing
    lands in ~/.prefect. Profiles (`prefect config set PREFECT_API_URL=...`) stay the user's."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_HOME" not in os.environ:
        use_home(store_path(config) / ".prefect", make=make_home)
        os.environ.setdefault("PREFECT_PROFILES_PATH", str(Path.home() / ".prefect" / "profiles.toml"))


def use_home(home: Path, *, make: bool = True) -> None:
    """Keep Prefect's state in `home`, unless the user chose a PREFECT_HOME themselves; `make`
    it now (Prefect makes only the last folder of the path, when first imported)."""
    global _chosen_home
    if "PREFECT_HOME" in os.environ and os.environ["PREFECT_HOME"] != _chosen_home:
        return
    _chosen_home = os.environ["PREFECT_HOME"] = str(home)
    if make:
        with contextlib.suppress(OSError):  # Prefect says so if it cannot make it either
            home.mkdir(parents=True, exist_ok=True)
    else:  # a command that runs no flow but reads Prefect's settings (a cron check) makes nothing
        warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")


_chosen_home: str | None = None


def store_path(config: Path | None) -> Path:
    """The store folder `flows.config.load_settings(config)` will name (`[store] path` or
    TWINHUB_STORE__PATH, relative to the config's folder), read with the standard library only:
    Prefect is not loaded yet, and `--help` stays fast."""
    file = config or Path(os.environ.get("TWINHUB_CONFIG", "twinhub.toml"))
    store = os.environ.get("TWINHUB_STORE__PATH")
    if store is None and file.is_file():
        try:
            store = tomllib.loads(file.read_text()).get("store", {}).get("path")
        except (OSError, ValueError, AttributeError):
            store = None  # load_settings will say what is wrong
    return file.resolve().parent / (store if isinstance(store, str) else ".twinhub")


@contextmanager
def stoppable() -> Iterator[None]:
    """Run a flow so that Ctrl-C stops it: the run ends `interrupted` (flows.sync), its committed
    batches stay, and the command exits 130 (main). Without a Prefect server, the temporary one
    is started first, deaf to Ctrl-C, so the run can still report its end."""
    from flows.sync import interrupt_requested

    interrupt_requested.clear()
    _start_temporary_server()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        interrupt_requested.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_temporary_server() -> None:
    """Start Prefect's temporary server (the one its client would start) from a thread that
    blocks SIGINT: the server process inherits the blocked signal, and Ctrl-C meanwhile still
    reaches this process."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    PREFECT_HOME.value().mkdir(parents=True, exist_ok=True)  # its database's folder (`demo` starts afresh)

    failed: list[BaseException] = []

    server = SubprocessASGIServer()

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start()
        except BaseException as e:
            failed.append(e)

    starting = threading.Thread(target=start, name="prefect-server", daemon=True)
    starting.start()
    while starting.is_alive():
        starting.join(0.2)
    if failed:
        raise failed[0]
    atexit.register(_stop, server)


def _stop(server: SubprocessASGIServer) -> None:
    """Stop the temporary server once Prefect has sent it all (its own exit handlers that send
    were registered later, so they ran first): SIGTERM, and SIGKILL if it lingers on open
    connections (Prefect's own stop waits 5 s for them)."""
    process = server.server_process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
