"""The stages of an adaptation run, as plain functions with typed inputs and outputs.

    plan_meta -> resolve_rounds -> generate -> questions            (meta-prompting, if asked for)
    confusable_classes -> plan_generations -> resolve_rounds -> generate
    training_sets (+ imported sources) -> fill_missing
    embed_texts (harness.texts_to_encode) -> harness.py: training_free + adapted
    embed_images -> harness.evaluate -> harness.save -> report.py

``textadapt/flows/adapt.py`` runs them in this order (``textadapt run``); tests, benchmarks and
notebooks call the same functions. ``generate``, ``embed_texts`` and ``embed_images`` run their
batches through a runner (``batches.py``): threads of this process by default, Prefect tasks in
the flow. ``record_run`` keeps a run's row in the ``runs`` table.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from textadapt import TextadaptError
from textadapt.batches import BackboneRef, BatchFailures, BatchResult, Runner, here
from textadapt.cleaning import clean, stored_raw
from textadapt.config import Settings
from textadapt.datasets import DatasetSpec, ImageSet
from textadapt.encoders import Backbone, encode_texts, text_key, uncached_images, uncached_texts
from textadapt.encoders import embed_images as embed_images_now
from textadapt.encoders import embed_texts as embed_texts_now
from textadapt.llm import Backend, LLMUnreachable, OpenAIBackend, Request, RequestsFailed, Sampling, make_backend
from textadapt.prompts import PromptTemplate, questions_from, render
from textadapt.scoring import class_prompts
from textadapt.store import Generation, Store

Progress = Callable[[int, int], None]

# --------------------------------------------------------------------------------------------
# The run's record


def new_run_id(dataset: str) -> str:
    """A run's id: the dataset, the UTC time and 4 random hex digits (also the Prefect flow run's name)."""
    return f"{dataset}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@contextmanager
def record_run(store: Store, run_id: str, options: dict) -> Iterator[None]:
    """The run's row in ``runs``: running during the block, then completed, or failed with the error it raised."""
    store.start_run(run_id, options["dataset"], options)
    try:
        yield
    except BaseException as e:
        store.finish_run(run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    store.finish_run(run_id, "completed")


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class PlannedGeneration:
    key: str
    class_index: int  # -1 for a dataset-level (meta-prompting) generation
    class_name: str
    template: PromptTemplate
    prompt: str
    sample_index: int
    sampling: Sampling
    base_key: str = ""  # the key of refresh round 0
    refresh: int = 0


def generation_key(dataset: str, model: str, template_hash: str, prompt: str, params: dict, sample_index: int) -> str:
    """The content address of one generation: change any part and it is a different generation."""
    payload = {
        "dataset": dataset,
        "model": model,
        "template_hash": template_hash,
        "prompt": prompt,
        "params": params,
        "sample_index": sample_index,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _sampling_for(template: PromptTemplate, sampling: Sampling) -> Sampling:
    return sampling.for_template(template.parse, **template.sampling_overrides())


def plan_generations(
    spec: DatasetSpec,
    templates: list[PromptTemplate],
    model: str,
    sampling: Sampling,
    samples: int,
    confusable: dict[str, list[str]] | None = None,
) -> list[PlannedGeneration]:
    """Every (class, template, sample) the run needs, with its cache key. Renders every prompt.

    ``parse: questions`` templates are planned by ``plan_meta`` instead: their questions must be
    generated first.
    """
    plan = []
    for ci, class_name in enumerate(spec.classes):
        for t in templates:
            if t.parse == "questions":
                continue
            prompt = render(t, spec, class_name, (confusable or {}).get(class_name))
            ts = _sampling_for(t, sampling)
            for s in range(samples):
                key = generation_key(spec.name, model, t.source_hash, prompt, ts.as_dict(), s)
                plan.append(PlannedGeneration(key, ci, class_name, t, prompt, s, ts, key))
    return plan


def plan_meta(spec: DatasetSpec, templates: list[PromptTemplate], model: str, sampling: Sampling) -> list[PlannedGeneration]:
    """One dataset-level generation per ``parse: questions`` template (meta-prompting, stage 1)."""
    plan = []
    for t in templates:
        if t.parse == "questions":
            prompt, ts = render(t, spec, ""), _sampling_for(t, sampling)
            key = generation_key(spec.name, model, t.source_hash, prompt, ts.as_dict(), 0)
            plan.append(PlannedGeneration(key, -1, "", t, prompt, 0, ts, key))
    return plan


def questions(meta_plan: list[PlannedGeneration], store: Store) -> list[PromptTemplate]:
    """The question templates the LLM wrote in stage 1, ready to be asked for every class."""
    rows = store.generations([p.key for p in meta_plan])
    out = []
    for p in meta_plan:
        description, rejected = rows[p.key]
        if rejected is not None:
            raise TextadaptError(
                f'{p.template.path}: the LLM wrote no usable question ({rejected}); see `textadapt sql "SELECT raw_text FROM '
                f"generations WHERE key = '{p.key}'\"`, edit the template, or run with --refresh to ask again"
            )
        out += questions_from(p.template, description)
    return out


def resolve_rounds(plan: list[PlannedGeneration], store: Store, refresh: bool) -> list[PlannedGeneration]:
    """Point each planned generation at its newest stored round, or at a new round with ``refresh``.

    Old rounds stay in the cache; ``run_generations`` records which round a run used.
    """
    latest = store.latest_rounds([p.base_key for p in plan])
    out = []
    for p in plan:
        key, round_ = latest.get(p.base_key, (p.base_key, -1))
        if refresh:
            round_ += 1
            key = round_key(p.base_key, round_)
        out.append(replace(p, key=key, refresh=max(round_, 0)))
    return out


def round_key(base_key: str, refresh: int) -> str:
    """The key of refresh round ``refresh`` of a generation: round 0 is the base key itself."""
    return hashlib.sha256(f"{base_key}:refresh:{refresh}".encode()).hexdigest() if refresh else base_key


@dataclass
class GenerationStats:
    planned: int
    cached: int  # served from the cache: no LLM call
    made: int  # LLM calls made now
    completion_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: GenerationStats) -> GenerationStats:
        return GenerationStats(
            *(getattr(self, f) + getattr(other, f) for f in ("planned", "cached", "made", "completion_tokens", "seconds"))
        )


def uncached(plan: list[PlannedGeneration], store: Store) -> list[PlannedGeneration]:
    """The planned generations the cache does not hold yet: what an LLM must be asked for."""
    existing = store.existing_generations([p.key for p in plan])
    return [p for p in plan if p.key not in existing]


def batches(plan: list[PlannedGeneration]) -> list[list[PlannedGeneration]]:
    """Group a plan by (class, template): the samples of one question, the unit that is retried and spread out."""
    groups: dict[tuple[int, str], list[PlannedGeneration]] = {}
    for p in plan:
        groups.setdefault((p.class_index, p.template.name), []).append(p)
    return list(groups.values())


def answer(plan: list[PlannedGeneration], backend: Backend, spec: DatasetSpec) -> Iterator[Generation]:
    """Ask the LLM for every planned generation (cached or not: see ``uncached``); yield each cleaned
    row as its answer arrives. Writes nothing: the caller stores the rows."""
    todo = {p.key: p for p in plan}
    requests = [Request(k, p.prompt, p.sampling, seed=int(k[:8], 16)) for k, p in todo.items()]
    for req, ans in backend.generate(requests):
        p = todo[req.key]
        description, rejected = clean(ans.text, p.template.parse, spec.prompting.category)
        yield Generation(
            key=p.key,
            dataset=spec.name,
            class_name=p.class_name,
            template=p.template.name,
            template_hash=p.template.source_hash,
            model=backend.identity,
            prompt=p.prompt,
            params=ans.params or p.sampling.as_dict(),  # what was sent: a server may have refused part of the planned request
            sample_index=p.sample_index,
            raw_text=stored_raw(ans.text),
            description=description,
            rejected=rejected,
            prompt_tokens=ans.prompt_tokens,
            completion_tokens=ans.completion_tokens,
            seconds=ans.seconds,
            base_key=p.base_key,
            refresh=p.refresh,
        )


def answer_batch(
    batch: list[PlannedGeneration], spec: DatasetSpec, llm: Backend | str, settings: Settings | None, slots: int, identity: str
) -> BatchResult:
    """Ask the LLM for one batch and return its cleaned rows (the caller writes them): what one batch of
    ``generate`` runs, in this process or another. ``llm`` is the caller's backend, or its spec where the
    batch runs in another process (built here with ``slots`` requests in flight, from ``settings``)."""
    if isinstance(llm, Backend):
        backend = llm
    else:
        backend = make_backend(llm, (settings or Settings()).model_copy(update={"llm_concurrency": max(slots, 1)}))
        if backend.identity != identity:
            backend.close()
            raise TextadaptError(
                f"LLM {llm!r} is {backend.identity} on {here()} but {identity} in the flow: "
                "give the workers the same model file or TEXTADAPT_LLM_BASE_URL"
            )
    try:
        rows = list(answer(batch, backend, spec))
    finally:
        if backend is not llm:
            backend.close()
    return BatchResult(rows, here())


def generate(
    plan: list[PlannedGeneration],
    backend: Backend,
    store: Store,
    spec: DatasetSpec,
    progress: Progress | None = None,
    *,
    runner: Runner | None = None,
    llm_spec: str | None = None,
    settings: Settings | None = None,
) -> GenerationStats:
    """Ask the LLM for every planned generation the cache lacks, in (class x template) batches, and store
    each batch's rows as it completes: the generation stage of ``textadapt run``, and of everything else.

    ``runner`` runs the batches: threads of this process by default; the flow passes its Prefect
    workers (tasks with retries, threads or Dask). A runner whose batches run in other processes
    rebuilds the backend there from ``llm_spec`` and ``settings``. Requests to an LLM server stay
    within the backend's concurrency (and the runner's ``llm_limit``); a model inside the process
    answers one batch at a time per process. Failed batches stop nothing: the rest are stored, and
    one ``TextadaptError`` then says how many requests failed, why, and which are missing.
    """
    t0 = time.perf_counter()
    runner = runner or Runner()
    todo = uncached(plan, store)
    stats = GenerationStats(planned=len(plan), cached=len(plan) - len(todo), made=0)
    if progress:
        progress(0, len(todo))
    if not todo:
        return stats
    backend.check()  # an unreachable server or a missing engine fails here, in seconds, before any batch
    server = isinstance(backend, OpenAIBackend)
    if server:  # requests to a server: bounded per run by the backend and, through the runner, over all runs
        limit = runner.llm_limit(settings or Settings())
        capacity = min(backend.concurrency, limit or backend.concurrency)
    else:  # a model in the process that runs the batch: one batch at a time per process
        capacity = runner.slots if runner.remote else 1
    if runner.remote and not llm_spec:
        raise ValueError("a runner whose batches run in other processes needs llm_spec, to build the LLM there")
    llm = llm_spec if runner.remote else backend
    jobs = [
        dict(
            batch=b,
            spec=spec,
            llm=llm,
            settings=settings,
            slots=min(len(b), capacity) if server else 0,
            identity=backend.identity,
        )
        for b in batches(todo)
    ]
    stored: set[str] = set()

    def write(job: dict, result: BatchResult) -> None:
        store.add_generations(result.rows)
        stored.update(r.key for r in result.rows)
        stats.made += len(result.rows)
        stats.completion_tokens += sum(r.completion_tokens or 0 for r in result.rows)
        if progress:
            progress(stats.made, len(todo))

    try:
        runner.map(answer_batch, jobs, write, capacity=capacity, weight=lambda job: max(job["slots"], 1), label="generation")
    except BatchFailures as e:
        missing = [p for p in todo if p.key not in stored]
        raise _generation_failed(e, len(todo), missing, len(plan), 1 + runner.retries) from None
    finally:
        stats.seconds = time.perf_counter() - t0
    return stats


def _generation_failed(
    e: BatchFailures, asked: int, missing: list[PlannedGeneration], planned: int, tries: int
) -> TextadaptError:
    """One message for every failed batch of ``generate``: how many requests failed, where, why, and what is missing."""
    reasons: Counter = Counter()  # error -> requests it failed
    where, check = "", ""
    for job, error in e.failures:
        if isinstance(error, RequestsFailed):
            reasons.update(error.reasons)
            where, check = where or f" {error.where}", check or f" ({error.check})"
        else:
            reasons[str(error) if isinstance(error, TextadaptError) else f"{type(error).__name__}: {error}"] += len(job["batch"])
    shown = "; ".join(f"{err} ({n} request{'s' * (n > 1)})" for err, n in list(reasons.items())[:3])
    more = f"; {len(reasons) - 3} other errors" if len(reasons) > 3 else ""
    tried = f", each tried {tries} times" if tries > 1 else ""
    # a server that came to refuse connections keeps its error's kind (LLMUnreachable: not worth asking again at once)
    kind = LLMUnreachable if any(isinstance(error, LLMUnreachable) for _, error in e.failures) else TextadaptError
    return kind(
        f"{len(missing)} of {asked} LLM requests failed{where}: {shown}{more}. {len(e.failures)} of {e.total} (class, question) "
        f"batches failed{tried}.\n{missing_summary(missing, planned)} Running again asks only for the rest{check}."
    )


def missing_summary(missing: list[PlannedGeneration], planned: int) -> str:
    """Which generations a failed ``generate`` left out, by class and template (the first 8 classes)."""
    by_class: dict[str, Counter] = {}
    for p in missing:
        by_class.setdefault(p.class_name, Counter())[p.template.name] += 1
    parts = []
    for class_name, templates in list(by_class.items())[:8]:
        names = ", ".join(f"{t} x{n}" if n > 1 else t for t, n in templates.items())
        parts.append(f"{class_name!r}: {names}" if class_name else f"(dataset-level) {names}")
    more = f"; and {len(by_class) - 8} more classes" if len(by_class) > 8 else ""
    return f"Not generated ({len(missing)} of {planned} planned; the rest are stored): {'; '.join(parts)}{more}."


@dataclass
class TrainingSet:
    """The accepted descriptions of one template set (or imported source), labelled by the spec's class order."""

    template_set: str
    texts: list[str]
    labels: np.ndarray
    keys: list[str]  # the generation each text came from
    generations: int  # generations behind the set, accepted or not
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> generations
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> texts left out by this run (duplicates)


@dataclass
class Selection:
    """What a run trains on, and the record of it for ``run_generations``."""

    sets: dict[str, TrainingSet]
    links: list[tuple[str, int, str | None, list[int] | None]]  # (key, class_index, excluded reason, excluded items (1-based))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def select(entries: list[tuple[str, str, int, str | None, str | None]]) -> Selection:
    """Group (set, key, class_index, description, rejected) into training sets, in the given order.

    Labels come from the caller (the spec's class order), never from the order of anything stored.
    A text whose normalised form repeats an earlier one of the same class and set is left out
    as a duplicate, and the reason is kept for ``run_generations.excluded``.
    """
    groups: dict[str, dict] = {}
    links = []
    for set_name, key, ci, description, rejected in entries:
        g = groups.setdefault(
            set_name, {"texts": [], "labels": [], "keys": [], "n": 0, "rejected": Counter(), "excluded": Counter(), "seen": {}}
        )
        g["n"] += 1
        if rejected is not None:
            g["rejected"][rejected] += 1
            links.append((key, ci, None, None))
            continue
        kept, original, dropped = 0, None, []
        for item, text in enumerate(description.split("\n"), 1):
            first = g["seen"].setdefault((ci, _norm(text)), key)
            if first != key:
                g["excluded"]["duplicate"] += 1
                original = first
                dropped.append(item)
                continue
            g["texts"].append(text)
            g["labels"].append(ci)
            g["keys"].append(key)
            kept += 1
        links.append((key, ci, None if kept else f"duplicate of {original}", dropped or None))
    sets = {
        name: TrainingSet(
            name, g["texts"], np.asarray(g["labels"], np.int64), g["keys"], g["n"], dict(g["rejected"]), dict(g["excluded"])
        )
        for name, g in groups.items()
    }
    return Selection(sets, links)


def training_sets(plan: list[PlannedGeneration], store: Store, spec: DatasetSpec, sources: list[str] = ()) -> Selection:
    """The run's training sets: its generations by template set, plus each imported source."""
    rows = store.generations([p.key for p in plan])
    missing = [p.key for p in plan if p.key not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} planned generations are not in the cache; run generate first")
    entries = [(p.template.template_set, p.key, p.class_index, rows[p.key][0], rows[p.key][1]) for p in plan]
    index = {c: i for i, c in enumerate(spec.classes)}
    for source in sources:
        imported = [(f"import:{source}", k, index[c], d, r) for k, c, d, r in store.imported(spec.name, source) if c in index]
        if not imported:
            raise TextadaptError(
                f"no descriptions imported as {source!r} for dataset {spec.name!r}; "
                f"run `textadapt descriptions import FILE --dataset {spec.name} --source {source}` first"
            )
        entries += imported
    return select(entries)


FALLBACK = "a photo of a {}."


def fill_missing(sets: dict[str, TrainingSet], spec: DatasetSpec) -> dict[str, list[str]]:
    """Give every class with no accepted description in a set the prompt "a photo of a {class}." instead,
    so its head can still learn it; returns set -> the classes filled, for warnings and the report."""
    filled = {}
    for name, ts in sets.items():
        counts = Counter(ts.labels.tolist())
        empty = [i for i in range(len(spec.classes)) if counts[i] == 0]
        if empty:
            ts.texts += [FALLBACK.format(spec.classes[i]) for i in empty]
            ts.labels = np.concatenate([ts.labels, np.asarray(empty, np.int64)])
            ts.keys += [""] * len(empty)
            filled[name] = [spec.classes[i] for i in empty]
    return filled


def confusable_classes(backbone: Backbone, spec: DatasetSpec, store: Store, k: int = 3) -> tuple[dict[str, list[str]], int]:
    """For each class, the spec's confusable classes, else the k nearest "a photo of a {}." prototypes;
    and how many prompts had to be encoded."""
    emb, encoded = encode_texts(backbone, class_prompts(spec.classes, ["a photo of a {}."]), store)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nearest = {c: [spec.classes[j] for j in np.argsort(-sims[i], kind="stable")[:k]] for i, c in enumerate(spec.classes)}
    return {c: spec.prompting.confusable.get(c) or nearest[c] for c in spec.classes}, encoded


# --------------------------------------------------------------------------------------------
# Embedding


def embed_batch(items: list[str] | ImageSet, backbone: Backbone | BackboneRef, batch_size: int) -> BatchResult:
    """Embed one batch of texts or images and return the matrix (the caller writes it): what one batch of
    ``embed_texts`` / ``embed_images`` runs, in this process or another (``backbone`` a ``BackboneRef`` there)."""
    bb = backbone.load() if isinstance(backbone, BackboneRef) else backbone
    emb = embed_images_now(bb, items, batch_size) if isinstance(items, ImageSet) else embed_texts_now(bb, items, batch_size)
    return BatchResult(emb, here())


def embed_texts(
    backbone: Backbone,
    texts: list[str],
    store: Store,
    batch_size: int = 256,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> int:
    """Embed the texts the cache lacks, a batch of ``batch_size`` at a time run by ``runner`` (default: this
    process), storing each batch as it completes; returns how many texts were encoded."""
    runner = runner or Runner()
    # Texts of similar length share a batch: each batch is encoded only up to its longest end-of-text token
    # (encoders.embed_texts is length-aware), so unsorted batches would each pay for their longest text.
    todo = sorted(uncached_texts(backbone, texts, store), key=len)
    ref = BackboneRef.of(backbone) if runner.remote else backbone
    jobs = [dict(items=todo[i : i + batch_size], backbone=ref, batch_size=batch_size) for i in range(0, len(todo), batch_size)]
    done = [0]
    if progress:
        progress(0, len(todo))

    def write(job: dict, result: BatchResult) -> None:
        store.put_embeddings("text", backbone.id, [text_key(t) for t in job["items"]], result.rows, job["items"])
        done[0] += len(job["items"])
        if progress:
            progress(done[0], len(todo))

    _embed(runner, jobs, write, "text embedding")
    return len(todo)


def embed_images(
    backbone: Backbone,
    images: ImageSet,
    store: Store,
    batch_size: int = 256,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> int:
    """Embed the images the cache lacks, as ``embed_texts`` does texts; returns how many images were encoded."""
    runner = runner or Runner()
    todo, keys = uncached_images(backbone, images, store)
    ref = BackboneRef.of(backbone) if runner.remote else backbone
    starts = range(0, len(todo), batch_size)
    jobs = [dict(items=todo.take(range(i, min(i + batch_size, len(todo)))), backbone=ref, batch_size=batch_size) for i in starts]
    job_keys = {id(job): keys[i : i + batch_size] for job, i in zip(jobs, starts)}
    done = [0]
    if progress:
        progress(0, len(todo))

    def write(job: dict, result: BatchResult) -> None:
        store.put_embeddings("image", backbone.id, job_keys[id(job)], result.rows)
        done[0] += len(job["items"])
        if progress:
            progress(done[0], len(todo))

    _embed(runner, jobs, write, "image embedding")
    return len(todo)


def _embed(runner: Runner, jobs: list[dict], write, label: str) -> None:
    # torch uses every core of a process already: one embedding batch at a time per process
    try:
        runner.map(embed_batch, jobs, write, capacity=runner.slots if runner.remote else 1, label=label)
    except BatchFailures as e:
        raise TextadaptError(f"{len(e.failures)} of {e.total} {label} batches failed: {e.failures[0][1]}") from None
