"""The flow's runner: a stage's batches as Prefect tasks, in threads of the flow's process or on Dask.

``pipeline.generate``, ``embed_texts`` and ``embed_images`` cut their work into batches and hand
them to a runner (``textadapt/batches.py``). ``Workers`` is the flow's: it groups the batches into
**lanes**, one Prefect task run each, in threads of the flow's process (``task_runner="threads"``,
the default) or on a Dask cluster (``task_runner="dask"``: ``Settings.dask_address``, else a local
cluster started for the run). A lane works through its batches in threads of its process, its share
of the stage's capacity at a time, and hands back each batch's rows as the batch completes: at once
in the flow's process, with the task's result on Dask (where a lane holds at most ``REMOTE_LANE``
batches). The flow's process writes them (one writer, see ``batches.py``). So the task runs of a
stage grow with its lanes (the requests it keeps in flight), not with classes x questions: a plan
of 10,000 (class, question) batches is a handful of task runs, not 10,000.

**Retries.** A batch that fails does not stop its lane: the lane finishes its other batches, then
fails, and Prefect runs the lane again for the batches that failed only (what completed is kept):
generation up to ``LLM_RETRIES`` more times with exponential back-off (after the HTTP client's own
retries), embedding once. A server that refuses connections is not asked again. What failed after
the last try comes back to the stage with its batch, as with the library's runner.

**LLM requests.** A run keeps at most ``Settings.llm_concurrency`` requests in flight; over all
flow runs of one Prefect server, the global concurrency limit ``textadapt-llm`` bounds the
requests to LLM servers (one slot per request in flight; created with ``Settings.llm_global_limit``
slots when missing). The flow holds the stage's slots (its capacity: the requests it keeps in
flight) while its lanes work: one acquisition per generation stage. One per batch, as before, cost
0.2 s of CPU and often seconds of wall time per batch on this machine (acquisitions racing each
other are refused and told to wait).
"""

from __future__ import annotations

import math
import os
import queue
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from textadapt import TextadaptError, pipeline
from textadapt.batches import BatchFailures, BatchResult, Done, Runner, here
from textadapt.config import Settings
from textadapt.llm import LLMUnreachable

TASK = dict(cache_policy=NO_CACHE, persist_result=False)
LLM_LIMIT = "textadapt-llm"
LLM_RETRIES = 3  # after the HTTP client's own retries: a lane's failed batches asked again 2, 4, 8 s later (with jitter)
REMOTE_LANE = 16  # most batches of a lane on Dask, whose rows come back only with the task's result


class Lane:
    """The batches one task run works through (``jobs``: the stage's job index -> job), at most ``share`` (by the
    jobs' ``weights``) at once. Prefect runs a failed lane again with this same object, so what completed stays
    done: only ``todo`` is asked again."""

    def __init__(self, jobs: dict[int, dict], weights: dict[int, int], share: int):
        self.todo, self.weights, self.share = dict(jobs), weights, share
        self.results: dict[int, BatchResult] = {}  # completed and not handed back yet (on Dask: with the task's result)

    def __repr__(self) -> str:  # Prefect names a task run's inputs: no need to print every job
        return f"Lane({len(self.todo)} batches to do, share {self.share})"


class LaneFailed(Exception):
    """A lane's batches that failed (stage job index -> error), and the rows of its completed batches not handed
    back yet (Dask)."""

    def __init__(self, failures: dict[int, BaseException], results: dict[int, BatchResult]):
        super().__init__(failures, results)
        self.failures, self.results = failures, results

    def __str__(self) -> str:
        first = next(iter(self.failures.values()))
        return f"{len(self.failures)} batch{'es' * (len(self.failures) > 1)} failed: {type(first).__name__}: {first}"


def _work_through(
    fn: Callable[..., BatchResult], lane: Lane, sink: Callable[[int, BatchResult], None] | None
) -> dict[int, BatchResult]:
    """One try of a lane: run ``fn(**job)`` for every job still to do, in threads of this process (the
    library's runner), handing each result to ``sink`` (the flow's process) or keeping it for the task's result."""
    index = {id(job): i for i, job in lane.todo.items()}

    def done(job: dict, result: BatchResult) -> None:
        i = index[id(job)]
        del lane.todo[i]
        if sink is not None:
            sink(i, result)
        else:
            lane.results[i] = result

    try:
        Runner().map(fn, list(lane.todo.values()), done, capacity=lane.share, weight=lambda job: lane.weights[index[id(job)]])
    except BatchFailures as e:
        raise LaneFailed({index[id(job)]: error for job, error in e.failures}, lane.results) from None
    return lane.results


def _worth_asking_again(task, task_run, state) -> bool:
    """A lane is run again for its failed batches unless one found the server refusing connections
    (``LLMUnreachable``): the run then fails in seconds."""
    try:
        state.result()
    except LaneFailed as e:
        return not any(isinstance(error, LLMUnreachable) for error in e.failures.values())
    except LLMUnreachable:
        return False
    except Exception:  # noqa: BLE001 - any other failure: ask again
        return True
    return True


@task(
    name="generate",
    retries=LLM_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_worth_asking_again,
    **TASK,
)
def generate_lane(lane: Lane, sink) -> dict[int, BatchResult]:
    """``pipeline.answer_batch`` for each batch of the lane."""
    return _work_through(pipeline.answer_batch, lane, sink)


@task(name="embed", retries=1, **TASK)
def embed_lane(lane: Lane, sink) -> dict[int, BatchResult]:
    """``pipeline.embed_batch`` for each batch of the lane."""
    return _work_through(pipeline.embed_batch, lane, sink)


# The library's batch function -> the task that runs a lane of its batches here.
TASKS = {pipeline.answer_batch: generate_lane, pipeline.embed_batch: embed_lane}


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
    def open(cls, task_runner: str, settings: Settings) -> Iterator[Workers]:
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
                raise TextadaptError(
                    f"cannot reach the Dask scheduler at {settings.dask_address} (TEXTADAPT_DASK_ADDRESS): {e}"
                ) from None
            logger.info(
                "Dask: %s, %d workers, %d threads; the cache is written by this process (%s)",
                where,
                len(runner.client.nthreads()),
                threads,
                here(),
            )
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
                        GlobalConcurrencyLimitCreate(name=LLM_LIMIT, limit=settings.llm_global_limit)
                    )
                except ObjectAlreadyExists:  # another run created it meanwhile
                    pass
                limit = client.read_global_concurrency_limit_by_name(LLM_LIMIT)
        self._limit = LLM_LIMIT if limit.active else None
        return limit.limit if limit.active else None

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
        """As ``Runner.map``, the jobs in lanes (``lanes``), each lane a Prefect task run (``TASKS[fn]``) on this run's
        task runner; ``done`` is called in this thread as each job completes."""
        if not jobs:
            return
        events: queue.Queue = queue.Queue()  # ("job", index, result) as each job completes here; ("lane", lane, future)
        sink = None if self.remote else (lambda i, result: events.put(("job", i, result)))
        task_ = TASKS[fn]
        pending, in_flight, load, failures = list(lanes(jobs, capacity, weight, self.remote)), 0, 0, []
        where = self.where.setdefault(label, Counter())

        def hand_back(i: int, result: BatchResult) -> None:
            where[result.where] += 1
            done(jobs[i], result)

        pending.reverse()
        # LLM requests: this run's capacity of the global limit's slots, held while its lanes work
        slots = fn is pipeline.answer_batch and self._limit
        with concurrency(self._limit, occupy=capacity) if slots else nullcontext():
            while pending or in_flight:
                while pending and (in_flight == 0 or load + pending[-1].share <= capacity):
                    lane = pending.pop()
                    future = self.runner.submit(task_, parameters={"lane": lane, "sink": sink})
                    future.add_done_callback(lambda f, lane=lane: events.put(("lane", lane, f)))
                    in_flight, load = in_flight + 1, load + lane.share
                kind, *event = events.get()
                if kind == "job":
                    hand_back(*event)
                    continue
                lane, future = event
                in_flight, load = in_flight - 1, load - lane.share
                try:
                    returned = future.result()
                except LaneFailed as e:  # after the task's retries
                    returned = e.results
                    failures += [(jobs[i], error) for i, error in e.failures.items()]
                except Exception as e:  # noqa: BLE001 - the lane itself failed: all it had left to do
                    returned = dict(lane.results)
                    failures += [(jobs[i], e) for i in lane.todo]
                for i, result in sorted(returned.items()):
                    hand_back(i, result)
        if failures:
            raise BatchFailures(failures, len(jobs))

    def log_where(self, logger) -> None:
        """Where the batches ran, where that was not only this process (a Dask cluster)."""
        for label, where in self.where.items():
            if where and set(where) != {here()}:
                logger.info(
                    "%s batches ran in %d processes: %s",
                    label,
                    len(where),
                    ", ".join(f"{w} ({n})" for w, n in sorted(where.items())),
                )


def lanes(jobs: list[dict], capacity: int, weight: Callable[[dict], int], remote: bool) -> list[Lane]:
    """The jobs in lanes: as many lanes as jobs of the largest weight fit in ``capacity`` (each lane that share of
    it), the jobs dealt round-robin so the lanes finish together; on Dask (``remote``) lanes of at most
    ``REMOTE_LANE`` jobs, since a lane's rows come back only with its result."""
    weights = {i: max(1, weight(job)) for i, job in enumerate(jobs)}
    widest = max(weights.values())
    count = max(1, min(len(jobs), capacity // widest))
    share = max(widest, capacity // count)
    if remote:
        count = max(count, math.ceil(len(jobs) / REMOTE_LANE))
    dealt = [list(range(k, len(jobs), count)) for k in range(count)]
    return [Lane({i: jobs[i] for i in d}, {i: weights[i] for i in d}, share) for d in dealt if d]


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
