"""Long-running processes a test starts as a user would (``textadapt serve``, a Prefect worker, Dask's scheduler
and workers), each in its own session with its output in a file, and stopped with everything it started; a test
that fails shows their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Background:
    """``with Background(name, cmd, log_dir, env) as p:`` runs ``cmd`` until the block ends (SIGTERM to its process
    group, then SIGKILL); ``p.log()`` is its output so far, ``p.alive()`` whether it still runs."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict | None = None, cwd: Path | None = None):
        self.name, self.cmd, self.env, self.cwd = name, cmd, env, cwd
        self.path = Path(log_dir) / f"{name.replace(' ', '-')}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Background:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:  # a file, not a pipe: a full pipe would stall the process
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = 6000) -> str:
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        return f"--- {self.name} ({' '.join(self.cmd[:3])} ...), last {tail} characters:\n{text[-tail:]}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and everything it started (its session's process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # whatever it started and left (flow run processes)
        if self.proc.poll() is None:
            self.proc.wait()


def wait_for(what: str, check: Callable[[], T | None], seconds: float, *logs: Background, every: float = 2.0) -> T:
    """Poll ``check()`` until it returns something other than None and return that; fail after ``seconds`` (or as soon as
    one of ``logs``' processes has exited) with what was waited for and the processes' logs."""
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found is not None:
            return found
        dead = [p for p in logs if not p.alive()]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(p.name for p in dead)} exited" if dead else f"not within {seconds:.0f} s"
            raise AssertionError(f"waited for {what}: {why}\n" + "\n".join(p.log() for p in logs))
        time.sleep(every)
