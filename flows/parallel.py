"""Where a run's batches go, and the rule that keeps the cache safe.

Generation is cut into batches of (class x template) (the samples of one question) and embedding
into batches of ``--batch-size`` texts or images. Each batch is a Prefect task run: in threads of
the flow's process (``--task-runner threads``, the default) or on a Dask cluster (``--task-runner
dask``: ``Settings.dask_address``, else a local cluster started for the run).

**One writer.** A batch task never opens the DuckDB file: it returns its rows (generations,
embeddings) and the flow's process writes them as each batch completes (DuckDB allows one writing
process per file, and the flow holds it for the whole run). The plan is resolved against the cache
in the flow before anything is submitted, so a retried task or a re-run asks only for what the
cache does not hold.

**LLM requests.** Generation tasks retry with exponential back-off. A run keeps at most
``Settings.llm_concurrency`` requests in flight; over all flow runs of one Prefect server, the
global concurrency limit ``textadapt-llm`` bounds the requests to LLM servers (one slot per request
in flight; created with ``Settings.llm_global_limit`` slots when missing).
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from textadapt import TextadaptError, encoders, pipeline
from textadapt.config import RunOptions, Settings
from textadapt.datasets import DatasetSpec, ImageSet
from textadapt.encoders import Backbone
from textadapt.llm import Backend, OpenAIBackend, make_backend
from textadapt.store import Store

TASK = dict(cache_policy=NO_CACHE, persist_result=False)
LLM_LIMIT = "textadapt-llm"
LLM_RETRIES = 3  # after the HTTP client's own retries: a batch asked again 2, 4, 8 s later (with jitter)
LLM_BACKOFF = exponential_backoff(backoff_factor=2)


def here() -> str:
    """This process, as the batches report where they ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class BatchResult:
    rows: Any  # list[Generation] or an (n, D) embedding matrix
    where: str  # host:pid of the process that computed it


@dataclass(frozen=True)
class BackboneRef:
    """What a task on another process needs to load the run's backbone itself, and the identity it must have."""

    spec: str
    device: str
    id: str


def _backbone(ref: Backbone | BackboneRef) -> Backbone:
    if isinstance(ref, Backbone):
        return ref
    bb = encoders.load_backbone(ref.spec, ref.device)
    if bb.id != ref.id:
        raise TextadaptError(f"backbone {ref.spec!r} is {bb.id} on {here()} but {ref.id} in the flow: "
                             "the workers must see the same weights (same open_clip cache or checkpoint file)")
    return bb


@task(name="generate batch", retries=LLM_RETRIES, retry_delay_seconds=LLM_BACKOFF, retry_jitter_factor=0.5, **TASK)
def generate_batch(batch: list[pipeline.PlannedGeneration], spec: DatasetSpec, llm: Backend | str, settings: Settings,
                   slots: int, identity: str, limit: str | None) -> BatchResult:
    """Ask the LLM for one batch and return the cleaned rows (written by the flow, not here).

    ``llm`` is the flow's backend (threads) or its spec, built here (another process). At most
    ``slots`` requests are in flight (0: an in-process model, no server), holding as many slots of
    the global concurrency limit ``limit`` (None: switched off).
    """
    backend = llm if isinstance(llm, Backend) else make_backend(llm, settings.model_copy(update={"llm_concurrency": max(slots, 1)}))
    if backend.identity != identity:
        raise TextadaptError(f"LLM {llm!r} is {backend.identity} on {here()} but {identity} in the flow: "
                             "give the workers the same model file or TEXTADAPT_LLM_BASE_URL")
    try:
        with concurrency(limit, occupy=slots) if slots and limit else nullcontext():
            rows = list(pipeline.answer(batch, backend, spec))
    finally:
        if backend is not llm:
            backend.close()
    return BatchResult(rows, here())


@task(name="embed batch", retries=1, **TASK)
def embed_batch(items: list[str] | ImageSet, backbone: Backbone | BackboneRef, batch_size: int) -> BatchResult:
    """Embed one batch of texts or images; returns the matrix (written by the flow, not here)."""
    bb = _backbone(backbone)
    emb = encoders.embed_images(bb, items, batch_size) if isinstance(items, ImageSet) else encoders.embed_texts(bb, items, batch_size)
    return BatchResult(emb, here())


class BatchFailures(Exception):
    def __init__(self, failures: list[BaseException], total: int):
        self.failures, self.total = failures, total
        super().__init__(f"{len(failures)} of {total} batches failed: {failures[0]}")


class Workers:
    """The task runner of one flow run, started for the run (``open``), with submission windows."""

    def __init__(self, runner: TaskRunner, remote: bool, slots: int):
        self.runner = runner
        self.remote = remote  # tasks run in other processes: they get specs, not live objects
        self.slots = slots  # threads (or Dask worker threads) that run tasks at once

    @classmethod
    @contextmanager
    def open(cls, options: RunOptions, settings: Settings) -> Iterator["Workers"]:
        logger = get_run_logger()
        if options.task_runner == "threads":
            with ThreadPoolTaskRunner(max_workers=settings.llm_concurrency) as runner:
                yield cls(runner, remote=False, slots=settings.llm_concurrency)
            return
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise TextadaptError("--task-runner dask needs prefect-dask: `pip install prefect-dask==0.3.7`") from None
        if settings.dask_address:
            runner = DaskTaskRunner(address=settings.dask_address)
            where = settings.dask_address
        else:
            runner = DaskTaskRunner(cluster_kwargs=_local_cluster_kwargs(settings))
            where = "a local cluster"
        with runner:
            try:
                threads = sum(runner.client.nthreads().values())
            except OSError as e:
                if not settings.dask_address:
                    raise
                raise TextadaptError(f"cannot reach the Dask scheduler at {settings.dask_address} (TEXTADAPT_DASK_ADDRESS): {e}") from None
            logger.info("Dask: %s, %d workers, %d threads; the cache is written by this process (%s)",
                        where, len(runner.client.nthreads()), threads, here())
            yield cls(runner, remote=True, slots=max(threads, 1))

    def map(self, fn: Callable, jobs: list[dict], weight: Callable[[dict], int], capacity: int,
            done: Callable[[dict, BatchResult], None]) -> None:
        """Submit ``fn(**job)`` for every job, keeping the jobs in flight within ``capacity`` (by ``weight``;
        one job always goes); call ``done`` in this thread as each completes. Failed jobs do not stop the
        others: they are raised together at the end as ``BatchFailures``."""
        finished: queue.Queue = queue.Queue()
        pending, in_flight, load, failures = deque(jobs), 0, 0, []
        while pending or in_flight:
            while pending and (in_flight == 0 or load + weight(pending[0]) <= capacity):
                job = pending.popleft()
                future = self.runner.submit(fn, parameters=job)
                future.add_done_callback(lambda f, job=job: finished.put((job, f)))
                in_flight, load = in_flight + 1, load + weight(job)
            job, future = finished.get()
            in_flight, load = in_flight - 1, load - weight(job)
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - after the task's retries; the other batches go on
                failures.append(e)
                continue
            done(job, result)
        if failures:
            raise BatchFailures(failures, len(jobs))


def _local_cluster_kwargs(settings: Settings) -> dict:
    kwargs: dict = dict(processes=True, dashboard_address=":0")
    if settings.dask_workers:
        kwargs["n_workers"] = settings.dask_workers
    if settings.dask_threads_per_worker:
        kwargs["threads_per_worker"] = settings.dask_threads_per_worker
    if not os.environ.get("PREFECT_API_URL"):
        # The temporary local API this run started: without its address each worker would start its own.
        with get_client(sync_client=True) as client:
            kwargs["env"] = {"PREFECT_API_URL": str(client.api_url).rstrip("/")}
    return kwargs


def llm_limit(settings: Settings) -> int | None:
    """The slots of the global concurrency limit on LLM requests, created with ``settings.llm_global_limit``
    if the Prefect server has none; None when it is switched off (inactive)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(LLM_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LLM_LIMIT, limit=settings.llm_global_limit))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
            limit = client.read_global_concurrency_limit_by_name(LLM_LIMIT)
    return limit.limit if limit.active else None


# ------------------------------------------------------------------------------------------------
# The flow's side: resolve against the cache, submit, write what comes back.


def generate(workers: Workers, plan: list[pipeline.PlannedGeneration], backend: Backend, llm_spec: str, spec: DatasetSpec,
             store: Store, settings: Settings, progress: Callable[[int, int], None]) -> pipeline.GenerationStats:
    """Every planned generation the cache lacks, asked in (class x template) batches; each batch's rows
    are written here (in the flow's process) as it completes."""
    t0 = time.perf_counter()
    todo = pipeline.uncached(plan, store)
    stats = pipeline.GenerationStats(planned=len(plan), cached=len(plan) - len(todo), made=0)
    progress(0, len(todo))
    if not todo:
        return stats
    backend.check()  # here, not in a task: an unreachable server fails the run in seconds, without task retries
    remote_server = isinstance(backend, OpenAIBackend)
    limit = llm_limit(settings) if remote_server else None
    if remote_server:  # requests to a server: bounded per run and, through Prefect, over all runs
        capacity = min(settings.llm_concurrency, limit or settings.llm_concurrency)
    else:  # a model in the process that runs the batch: one batch at a time per process
        capacity = workers.slots if workers.remote else 1
    llm = llm_spec if workers.remote else backend
    jobs = []
    for batch in pipeline.batches(todo):
        slots = min(len(batch), capacity) if remote_server else 0
        jobs.append(dict(batch=batch, spec=spec, llm=llm, settings=settings, slots=slots, identity=backend.identity,
                         limit=LLM_LIMIT if limit else None))
    where: dict[str, int] = {}
    stored: set[str] = set()

    def write(job: dict, result: BatchResult) -> None:
        store.add_generations(result.rows)
        stored.update(r.key for r in result.rows)
        stats.made += len(result.rows)
        stats.completion_tokens += sum(r.completion_tokens or 0 for r in result.rows)
        where[result.where] = where.get(result.where, 0) + 1
        progress(stats.made, len(todo))

    try:
        workers.map(generate_batch, jobs, weight=lambda job: max(job["slots"], 1), capacity=capacity, done=write)
    except BatchFailures as e:
        missing = [p for p in todo if p.key not in stored]
        raise TextadaptError(
            f"{len(missing)} of {len(todo)} LLM requests failed: {len(e.failures)} of {e.total} (class, question) batches, "
            f"each tried {1 + LLM_RETRIES} times; the first error: {e.failures[0]}\n"
            f"{pipeline.missing_summary(missing, len(plan))} Running again asks only for the rest."
        ) from None
    finally:
        stats.seconds = time.perf_counter() - t0
    _log_where("generation", where)
    return stats


def embed_texts(workers: Workers, backbone: Backbone, texts: list[str], store: Store, batch_size: int) -> int:
    """Embed the texts the cache lacks, a batch per task; returns how many were encoded."""
    # Texts of similar length share a task: each batch is encoded only up to its longest end-of-text token
    # (encoders.embed_texts is length-aware), so unsorted batches would each pay for their longest text.
    todo = sorted(encoders.uncached_texts(backbone, texts, store), key=len)
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    ref = BackboneRef(backbone.spec, str(backbone.device), backbone.id) if workers.remote else backbone
    where: dict[str, int] = {}

    def write(job: dict, result: BatchResult) -> None:
        store.put_embeddings("text", backbone.id, [encoders.text_key(t) for t in job["items"]], result.rows, job["items"])
        where[result.where] = where.get(result.where, 0) + 1

    _embed(workers, [dict(items=c, backbone=ref, batch_size=batch_size) for c in chunks], write)
    _log_where("text embedding", where)
    return len(todo)


def embed_images(workers: Workers, backbone: Backbone, images: ImageSet, store: Store, batch_size: int,
                 progress: Callable[[int, int], None]) -> int:
    """Embed the images the cache lacks, a batch per task; returns how many were encoded."""
    todo, keys = encoders.uncached_images(backbone, images, store)
    index = list(range(len(todo)))
    ref = BackboneRef(backbone.spec, str(backbone.device), backbone.id) if workers.remote else backbone
    jobs = [dict(items=todo.take(range(i, min(i + batch_size, len(todo)))),
                 backbone=ref, batch_size=batch_size) for i in index[::batch_size]]
    job_keys = {id(job): keys[i : i + batch_size] for job, i in zip(jobs, index[::batch_size])}
    done, where = [0], {}
    progress(0, len(todo))

    def write(job: dict, result: BatchResult) -> None:
        store.put_embeddings("image", backbone.id, job_keys[id(job)], result.rows)
        done[0] += len(job["items"])
        where[result.where] = where.get(result.where, 0) + 1
        progress(done[0], len(todo))

    _embed(workers, jobs, write)
    _log_where("image embedding", where)
    return len(todo)


def _embed(workers: Workers, jobs: list[dict], write: Callable[[dict, BatchResult], None]) -> None:
    try:
        workers.map(embed_batch, jobs, weight=lambda job: 1, capacity=workers.slots if workers.remote else 1, done=write)
    except BatchFailures as e:
        raise TextadaptError(f"{len(e.failures)} of {e.total} embedding batches failed: {e.failures[0]}") from None


def _log_where(stage: str, where: dict[str, int]) -> None:
    if where and set(where) != {here()}:
        get_run_logger().info("%s batches ran in %d processes: %s", stage, len(where),
                              ", ".join(f"{w} ({n})" for w, n in sorted(where.items())))
