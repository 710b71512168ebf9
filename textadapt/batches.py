"""How a stage's batches run: the runner that ``pipeline.generate``, ``embed_texts`` and ``embed_images`` hand them to.

A stage resolves its work against the cache, cuts it into batches and hands the runner a function
and one job (keyword arguments) per batch; the runner calls ``done(job, result)`` in the stage's
thread as each batch completes, and the stage writes that batch's rows to the cache there.

**One writer.** A batch never opens the DuckDB file: it returns its rows (``BatchResult``), and
the process that called the stage writes them (DuckDB allows one writing process per file).

``Runner`` (here) runs batches in threads of this process, each once: the library's default, for
tests, benchmarks and notebooks. The Prefect flow passes ``textadapt.flows.workers.Workers``
instead: the same stages, each batch a Prefect task with retries, in threads or on a Dask cluster.
"""

from __future__ import annotations

import os
import queue
import socket
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from textadapt import TextadaptError
from textadapt.encoders import Backbone, load_backbone


def here() -> str:
    """This process, as the batches report where they ran (host:pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class BatchResult:
    rows: Any  # list[Generation] or an (n, D) embedding matrix
    where: str  # host:pid of the process that computed it


@dataclass(frozen=True)
class BackboneRef:
    """What a batch in another process needs to load the run's backbone itself, and the identity it must have."""

    spec: str
    device: str
    id: str

    @classmethod
    def of(cls, backbone: Backbone) -> BackboneRef:
        return cls(backbone.spec, str(backbone.device), backbone.id)

    def load(self) -> Backbone:
        bb = load_backbone(self.spec, self.device)
        if bb.id != self.id:
            raise TextadaptError(
                f"backbone {self.spec!r} is {bb.id} on {here()} but {self.id} in the flow: "
                "the workers must see the same weights (same open_clip cache or checkpoint file)"
            )
        return bb


class BatchFailures(Exception):
    """Batches that failed (after the runner's retries), with their jobs; the other batches completed."""

    def __init__(self, failures: list[tuple[dict, BaseException]], total: int):
        self.failures, self.total = failures, total
        super().__init__(f"{len(failures)} of {total} batches failed: {failures[0][1]}")


Done = Callable[[dict, BatchResult], None]


class Runner:
    """Runs a stage's batches in threads of this process, each batch once (no retries)."""

    remote = False  # batches run in other processes: jobs carry specs (LLM, backbone), not live objects
    retries = 0  # how many more times a failed batch is tried
    slots = 1  # batches that can run at once where each takes a whole process (a model inside the process)

    def __init__(self) -> None:
        self.where: dict[str, Counter] = {}  # label -> {host:pid: batches}, for the log

    def llm_limit(self, settings) -> int | None:
        """Slots of a limit on LLM requests shared with other runs (Prefect's global concurrency limit); None: none."""
        return None

    def map(
        self,
        fn: Callable[..., BatchResult],
        jobs: list[dict],
        done: Done,
        *,
        capacity: int,
        weight: Callable[[dict], int] = lambda job: 1,
        label: str = "batches",
    ) -> None:
        """Run ``fn(**job)`` for every job, at most ``capacity`` (by ``weight``) at once; see ``_windowed``."""
        with ThreadPoolExecutor(max_workers=max(1, min(capacity, len(jobs))), thread_name_prefix="textadapt-batch") as pool:
            try:
                self._windowed(lambda job: pool.submit(fn, **job), jobs, done, capacity, weight, label)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _windowed(
        self,
        submit: Callable[[dict], Any],
        jobs: list[dict],
        done: Done,
        capacity: int,
        weight: Callable[[dict], int],
        label: str,
    ) -> None:
        """Submit the jobs, keeping those in flight within ``capacity`` (by ``weight``; one job always goes), and call
        ``done`` in this thread as each completes. A failed job does not stop the others: the failures are raised
        together at the end as ``BatchFailures``. ``submit(job)`` returns a future with ``add_done_callback`` and
        ``result`` (concurrent.futures' or Prefect's)."""
        finished: queue.Queue = queue.Queue()
        pending, in_flight, load, failures = deque(jobs), 0, 0, []
        where = self.where.setdefault(label, Counter())
        while pending or in_flight:
            while pending and (in_flight == 0 or load + weight(pending[0]) <= capacity):
                job = pending.popleft()
                submit(job).add_done_callback(lambda f, job=job: finished.put((job, f)))
                in_flight, load = in_flight + 1, load + weight(job)
            job, future = finished.get()
            in_flight, load = in_flight - 1, load - weight(job)
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - after the runner's retries; the other batches go on
                failures.append((job, e))
                continue
            where[result.where] += 1
            done(job, result)
        if failures:
            raise BatchFailures(failures, len(jobs))
