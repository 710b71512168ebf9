"""The temporary Prefect API of a ``textadapt run`` without a Prefect server, owned by the run's process.

Prefect starts one itself when ``PREFECT_API_URL`` is unset (``prefect.server.api.server.SubprocessASGIServer``: a
uvicorn subprocess, stopped at exit), but a run killed with ``kill -9`` never reaches its exit and leaves that server
running, holding its port and database. So ``textadapt run`` starts the same server itself, before Prefect is
imported, as a child that Linux stops with SIGTERM when the run's process dies, however it dies
(``prctl(PR_SET_PDEATHSIG)``; elsewhere it is stopped at exit only), and points the flow at it with
``PREFECT_API_URL``. Its database is Prefect's own (``PREFECT_HOME``), as with Prefect's temporary API.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from textadapt import TextadaptError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (the run's main thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the run died before prctl took effect
        os._exit(1)


def configured_api_url() -> str | None:
    """The Prefect API the user set (``PREFECT_API_URL``, in the environment or the active profile of Prefect's
    ``profiles.toml``), read without importing Prefect; None: a run needs a temporary one."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_temporary_api(timeout: float | None = None) -> Callable[[], None]:
    """Start Prefect's API server (as Prefect's temporary one: uvicorn, no UI) as a child of this process and set
    ``PREFECT_API_URL`` to it; returns the function that waits until it answers (import Prefect and the flow
    meanwhile: the server starts as they load). Call before importing Prefect. It is stopped at exit, after Prefect
    has sent its last logs and events (their workers drain before ``atexit``'s functions run)."""
    timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        # A run uses no blocks; registering their types at start imports every Prefect collection installed
        # (prefect-dask: Dask's distributed) and hashes the registry, half a second of the start a run waits for.
        "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
        "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
    }
    parent = os.getpid()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None,
    )
    atexit.register(_stop, process)
    os.environ["PREFECT_API_URL"] = url
    return lambda: _wait_until_up(process, url, timeout)


@contextmanager
def without_heartbeats() -> Iterator[None]:
    """No flow-run heartbeats (Prefect sends one every 180 s so that a server can mark a run whose process died as
    crashed): the temporary API dies with the run, so nobody would read them, and stopping their thread costs the end
    of every run up to a second (it sleeps in whole seconds). Call after ``start_temporary_api``."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TextadaptError(
                    f"Prefect's temporary API server exited with code {process.returncode} as it started "
                    "(its error is above); set PREFECT_API_URL to a running `prefect server start` instead"
                )
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise TextadaptError(
        f"Prefect's temporary API server did not answer within {timeout:.0f} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); the machine may be very busy"
    )
