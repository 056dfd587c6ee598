"""How the CLI runs Prefect: no telemetry, its state in the project's store, and runs that Ctrl-C
stops cleanly.

Without a Prefect server (no PREFECT_API_URL) Prefect starts a temporary one, a child process of
the command. Started by Prefect on first use it sits in the terminal's process group, so Ctrl-C
stopped it too, and the interrupted run then spent a minute retrying to report its end to it;
and a command killed outright (SIGKILL, the OOM killer) left it running. `stoppable` starts it
first, deaf to Ctrl-C (SIGINT blocked) and bound to die with the command, and stops it when the
command exits, after Prefect has sent it everything.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

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
    """Start Prefect's temporary server (the one its client would start), deaf to Ctrl-C (SIGINT
    blocked) and bound to this process: it dies with it, even by SIGKILL (`_bound_child`)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    PREFECT_HOME.value().mkdir(parents=True, exist_ok=True)  # its database's folder (`demo` starts afresh)

    class BoundServer(SubprocessASGIServer):
        """Prefect's own server, its process started by `_bound_child`. Registered as the
        instance Prefect's client asks for, so it is the one the runs use."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            popen = subprocess.Popen
            subprocess.Popen = functools.partial(popen, preexec_fn=_bound_child(os.getpid()))  # type: ignore[assignment,misc]
            try:  # Prefect makes the command; no other thread starts a process this early
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen  # type: ignore[misc]

    server = BoundServer()
    server.start()
    atexit.register(_stop, server)


PR_SET_PDEATHSIG = 1


def _bound_child(parent: int) -> Callable[[], None]:
    """What a child runs before its program: block SIGINT (Ctrl-C stops the run, not the server
    it reports to), and on Linux ask the kernel to SIGKILL it when this process dies, so a killed
    `twinhub sync` leaves no server behind. The main thread starts it: the signal follows the
    thread that forked."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

    def bind() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the request took hold
                os.kill(os.getpid(), signal.SIGKILL)

    return bind


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
