"""The flow's runner: each batch of a stage as a Prefect task, in threads of the flow's process or on Dask.

``pipeline.generate``, ``embed_texts`` and ``embed_images`` cut their work into batches and hand
them to a runner (``textadapt/batches.py``). ``Workers`` is the flow's: each batch becomes a Prefect
task run, in threads of the flow's process (``task_runner="threads"``, the default) or on a Dask
cluster (``task_runner="dask"``: ``Settings.dask_address``, else a local cluster started for the
run). The tasks return rows; the flow's process writes them (one writer, see ``batches.py``).

**Retries.** A generation batch is asked again up to ``LLM_RETRIES`` times with exponential
back-off (after the HTTP client's own retries); an embedding batch once.

**LLM requests.** A run keeps at most ``Settings.llm_concurrency`` requests in flight; over all
flow runs of one Prefect server, the global concurrency limit ``textadapt-llm`` bounds the
requests to LLM servers (one slot per request in flight; created with ``Settings.llm_global_limit``
slots when missing).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from textadapt import TextadaptError, pipeline
from textadapt.batches import BatchResult, Done, Runner, here
from textadapt.config import Settings
from textadapt.llm import LLMUnreachable

TASK = dict(cache_policy=NO_CACHE, persist_result=False)
LLM_LIMIT = "textadapt-llm"
LLM_RETRIES = 3  # after the HTTP client's own retries: a batch asked again 2, 4, 8 s later (with jitter)


def _worth_asking_again(task, task_run, state) -> bool:
    """A batch is asked again unless the server refuses connections (``LLMUnreachable``): the run then fails in seconds."""
    try:
        state.result()
    except LLMUnreachable:
        return False
    except Exception:  # noqa: BLE001 - any other failure: ask again
        return True
    return True


@task(name="generate batch", retries=LLM_RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.5, retry_condition_fn=_worth_asking_again, **TASK)
def generate_batch(batch, spec, llm, settings, slots: int, identity: str, limit: str | None) -> BatchResult:
    """``pipeline.answer_batch`` holding ``slots`` slots of the global concurrency limit ``limit`` (None: none)."""
    with concurrency(limit, occupy=slots) if slots and limit else nullcontext():
        return pipeline.answer_batch(batch, spec, llm, settings, slots, identity)


@task(name="embed batch", retries=1, **TASK)
def embed_batch(items, backbone, batch_size: int) -> BatchResult:
    return pipeline.embed_batch(items, backbone, batch_size)


# The library's batch function -> the task that runs it here (with the flow's extra parameters).
TASKS = {pipeline.answer_batch: generate_batch, pipeline.embed_batch: embed_batch}


class Workers(Runner):
    """The task runner of one flow run, started for the run (``open``): the library's ``Runner`` with Prefect tasks."""

    retries = LLM_RETRIES

    def __init__(self, runner: TaskRunner, remote: bool, slots: int):
        super().__init__()
        self.runner = runner
        self.remote = remote  # tasks run in other processes: they get specs, not live objects
        self.slots = slots  # threads (or Dask worker threads) that run tasks at once
        self._limit: str | None = None  # the global concurrency limit's name, once llm_limit found it active

    @classmethod
    @contextmanager
    def open(cls, task_runner: str, settings: Settings) -> Iterator["Workers"]:
        """Start the run's workers: ``task_runner`` is the run option (threads or dask)."""
        logger = get_run_logger()
        if task_runner == "threads":
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

    def llm_limit(self, settings: Settings) -> int | None:
        """The slots of the global concurrency limit on LLM requests, created with ``settings.llm_global_limit``
        if the Prefect server has none; None when it is switched off (inactive)."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(LLM_LIMIT)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=LLM_LIMIT, limit=settings.llm_global_limit))
                except ObjectAlreadyExists:  # another run created it meanwhile
                    pass
                limit = client.read_global_concurrency_limit_by_name(LLM_LIMIT)
        self._limit = LLM_LIMIT if limit.active else None
        return limit.limit if limit.active else None

    def map(self, fn: Callable[..., BatchResult], jobs: list[dict], done: Done, *, capacity: int,
            weight: Callable[[dict], int] = lambda job: 1, label: str = "batches") -> None:
        """As ``Runner.map``, each job a Prefect task run (``TASKS[fn]``) on this run's task runner."""
        task_, extra = TASKS[fn], {"limit": self._limit} if fn is pipeline.answer_batch else {}
        self._windowed(lambda job: self.runner.submit(task_, parameters={**job, **extra}), jobs, done, capacity, weight, label)

    def log_where(self, logger) -> None:
        """Where the batches ran, where that was not only this process (a Dask cluster)."""
        for label, where in self.where.items():
            if where and set(where) != {here()}:
                logger.info("%s batches ran in %d processes: %s", label, len(where),
                            ", ".join(f"{w} ({n})" for w, n in sorted(where.items())))


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
