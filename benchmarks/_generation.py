"""The sides of the generation benchmarks: textadapt's generation stage, and bare ``openai`` loops
sending the very same requests (prompt, sampling fields, max_tokens, seed) to the same server.

textadapt's side is ``pipeline.generate``, the function ``textadapt run``'s flow calls: the same
resolution against the cache, (class x template) batches, rows written as each batch completes.
``flow_side`` runs it as ``textadapt run`` does (``textadapt/flows/adapt.py``: inside a Prefect flow
run, with the flow's runner, ``Workers``: Prefect task runs in threads, the global concurrency limit on
LLM requests, the API of that flow run); ``textadapt_side`` runs it on the library's default runner
(threads of this process, no Prefect)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401 - puts this checkout first on sys.path

from textadapt.config import Settings
from textadapt.datasets import DatasetSpec, find_spec, restrict
from textadapt.llm import OpenAIBackend, Sampling, make_backend
from textadapt.pipeline import PlannedGeneration, batches, generate, plan_generations
from textadapt.prompts import list_templates
from textadapt.store import Store


@dataclass
class Workload:
    spec: DatasetSpec
    plan: list[PlannedGeneration]
    sampling: Sampling
    model: str = "smollm2"


def workload(base_url: str, classes: int, samples: int, max_tokens: int, template_set: str = "generic") -> Workload:
    """Real rendered Fashion-MNIST questions, greedy (temperature 0) with no stop string, so every request
    asks for the same fixed amount of work on both sides (up to ``max_tokens`` tokens; the model may end
    earlier, identically on both sides: the token counts are checked)."""
    settings = Settings()
    spec, _ = restrict(find_spec("fashion-mnist", settings.dataset_search_path), None, classes, None)
    templates = list_templates(settings.prompts_dir, [template_set])
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, stop=())
    identity = OpenAIBackend("smollm2", base_url).identity
    return Workload(spec, plan_generations(spec, templates, identity, sampling, samples), sampling)


def _settings(base_url: str, concurrency: int) -> Settings:
    return Settings(llm_base_url=base_url, llm_concurrency=concurrency)


def textadapt_side(w: Workload, base_url: str, concurrency: int) -> tuple[float, int, int]:
    """textadapt's generation stage (pipeline.generate on the library's runner, the OpenAI HTTP backend as
    `--llm openai:smollm2` makes it) into a fresh DuckDB file, so every planned generation is a cache miss.
    Returns (seconds, completion tokens, answers)."""
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp, Store(Path(tmp) / "cache.duckdb") as store:
        backend = make_backend(f"openai:{w.model}", _settings(base_url, concurrency))
        try:
            t0 = time.perf_counter()
            stats = generate(w.plan, backend, store, w.spec)
            seconds = time.perf_counter() - t0
        finally:
            backend.close()
        assert stats.made == len(w.plan), f"textadapt made {stats.made} of {len(w.plan)} generations"
        return seconds, stats.completion_tokens, stats.made


@dataclass
class FlowSide:
    seconds: float
    cpu_seconds: float  # this process (all threads) and the Prefect API server's process, during generate
    tokens: int
    answers: int
    task_runs: int  # Prefect task runs of the flow run, as its API recorded them
    batches: int  # the plan's (class, question) batches


_FLOW: dict = {}


def flow_side(w: Workload, base_url: str, concurrency: int, api_cpu: Callable[[], float]) -> FlowSide:
    """textadapt's generation stage as `textadapt run` runs it: ``pipeline.generate`` inside a Prefect flow run, with
    the flow's runner (``textadapt.flows.workers.Workers``, threads: each unit of work a Prefect task run, retries,
    the global concurrency limit on LLM requests), into a fresh DuckDB file. ``api_cpu()``: the CPU seconds of the
    Prefect API's process so far (counted with this process's, since a user pays both)."""
    if "flow" not in _FLOW:
        _FLOW["flow"] = _make_flow()
    with tempfile.TemporaryDirectory(prefix="bench-gen-flow-") as tmp:
        _FLOW["args"] = (w, base_url, concurrency, Path(tmp) / "cache.duckdb", api_cpu)
        return _FLOW["flow"]()


def _make_flow():
    from prefect import flow
    from prefect.context import FlowRunContext

    from textadapt.flows.workers import Workers

    @flow(name="textadapt-benchmark-generation", persist_result=False)
    def generation() -> FlowSide:
        w, base_url, concurrency, db, api_cpu = _FLOW["args"]
        settings = _settings(base_url, concurrency)
        backend = make_backend(f"openai:{w.model}", settings)
        with Store(db) as store, Workers.open("threads", settings) as workers:
            try:
                cpu0, api0, t0 = time.process_time(), api_cpu(), time.perf_counter()
                stats = generate(w.plan, backend, store, w.spec, runner=workers, llm_spec=f"openai:{w.model}", settings=settings)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - cpu0 + api_cpu() - api0
            finally:
                backend.close()
        assert stats.made == len(w.plan), f"the flow made {stats.made} of {len(w.plan)} generations"
        runs = task_runs(FlowRunContext.get().flow_run.id)
        return FlowSide(seconds, cpu, stats.completion_tokens, stats.made, runs, len(batches(w.plan)))

    return generation


def task_runs(flow_run_id, settle: float = 10.0) -> int:
    """The task runs the Prefect API holds for a flow run (counted until the count stops growing: the API records
    task runs from the events the tasks send, a moment after they ran)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def count() -> int:
        n, offset = 0, 0
        with get_client(sync_client=True) as client:
            while True:
                page = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), offset=offset, limit=200
                )
                n, offset = n + len(page), offset + len(page)
                if len(page) < 200:
                    return n

    deadline, last = time.monotonic() + settle, -1
    while True:
        n = count()
        if n == last or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(1.0)


def _kwargs(w: Workload, p: PlannedGeneration) -> dict:
    """The request textadapt sends for ``p`` to llama_cpp.server, written out by hand: OpenAI's sampling fields at the
    recipe's values, and llama.cpp's own samplers switched off by name (``llm.server_extras``), so both sides ask the
    server for the same work (its default repeat_penalty of 1.1 would otherwise change the greedy answers)."""
    kw = dict(
        model=w.model,
        messages=[{"role": "user", "content": p.prompt}],
        temperature=w.sampling.temperature,
        top_p=w.sampling.top_p,
        max_tokens=w.sampling.max_tokens,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=int(p.key[:8], 16),
        extra_body={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
    )
    if w.sampling.stop:
        kw["stop"] = list(w.sampling.stop)
    return kw


def bare_concurrent(w: Workload, base_url: str, concurrency: int) -> tuple[float, int, int]:
    """A bare ``AsyncOpenAI`` loop: every request at once behind a semaphore of ``concurrency``."""
    from openai import AsyncOpenAI

    async def main() -> tuple[int, int]:
        client = AsyncOpenAI(base_url=base_url, api_key="none")
        sem = asyncio.Semaphore(concurrency)

        async def one(p: PlannedGeneration):
            async with sem:
                return await client.chat.completions.create(**_kwargs(w, p))

        try:
            responses = await asyncio.gather(*(one(p) for p in w.plan))
        finally:
            await client.close()
        return sum(r.usage.completion_tokens for r in responses), len(responses)

    t0 = time.perf_counter()
    tokens, n = asyncio.run(main())
    return time.perf_counter() - t0, tokens, n


def bare_sequential(w: Workload, base_url: str) -> tuple[float, int, int]:
    """The reference scripts' way (TAP, CuPL): a plain loop, one blocking request at a time."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none")
    t0 = time.perf_counter()
    tokens = 0
    for p in w.plan:
        tokens += client.chat.completions.create(**_kwargs(w, p)).usage.completion_tokens
    seconds = time.perf_counter() - t0
    client.close()
    return seconds, tokens, len(w.plan)
