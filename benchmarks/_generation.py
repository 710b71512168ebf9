"""The two sides of the generation benchmarks: textadapt's generation stage, and bare ``openai`` loops
sending the very same requests (prompt, temperature, max_tokens, seed) to the same server.

textadapt's side is ``pipeline.generate``, the function ``textadapt run``'s flow calls: the same
resolution against the cache, (class x template) batches, rows written as each batch completes. Here
its batches run on the library's default runner (threads of this process); the flow hands it its
Prefect workers instead (each batch a task)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401 - puts this checkout first on sys.path

from textadapt.config import Settings
from textadapt.datasets import DatasetSpec, find_spec, restrict
from textadapt.llm import OpenAIBackend, Sampling
from textadapt.pipeline import PlannedGeneration, generate, plan_generations
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


def textadapt_side(w: Workload, base_url: str, concurrency: int) -> tuple[float, int, int]:
    """textadapt's generation stage (pipeline.generate, as in `textadapt run`, with the OpenAI HTTP backend) into a
    fresh DuckDB file, so every planned generation is a cache miss. Returns (seconds, completion tokens, answers)."""
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp, Store(Path(tmp) / "cache.duckdb") as store:
        backend = OpenAIBackend(w.model, base_url, concurrency=concurrency)
        t0 = time.perf_counter()
        stats = generate(w.plan, backend, store, w.spec)
        seconds = time.perf_counter() - t0
        assert stats.made == len(w.plan), f"textadapt made {stats.made} of {len(w.plan)} generations"
        return seconds, stats.completion_tokens, stats.made


def _kwargs(w: Workload, p: PlannedGeneration) -> dict:
    kw = dict(model=w.model, messages=[{"role": "user", "content": p.prompt}], temperature=w.sampling.temperature,
              max_tokens=w.sampling.max_tokens, seed=int(p.key[:8], 16))
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
