"""The stages of an adaptation run, as plain functions with typed inputs and outputs.

    plan_meta -> resolve_rounds -> generate -> questions            (meta-prompting, if asked for)
    confusable_classes -> plan_generations -> resolve_rounds -> generate
    training_sets (+ imported sources) -> fill_missing
    then harness.py: training_free + adapted -> encode_images -> evaluate -> save -> report

``flows/adapt.py`` runs them in this order as Prefect tasks; tests and notebooks call them directly.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from textadapt import TextadaptError
from textadapt.cleaning import clean, stored_raw
from textadapt.datasets import DatasetSpec
from textadapt.encoders import Backbone, encode_texts
from textadapt.llm import Backend, Request, Sampling
from textadapt.prompts import PromptTemplate, questions_from, render
from textadapt.scoring import class_prompts
from textadapt.store import Generation, Store

Progress = Callable[[int, int], None]

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
    payload = {"dataset": dataset, "model": model, "template_hash": template_hash, "prompt": prompt,
               "params": params, "sample_index": sample_index}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _sampling_for(template: PromptTemplate, sampling: Sampling) -> Sampling:
    return replace(sampling, **template.sampling_overrides())


def plan_generations(spec: DatasetSpec, templates: list[PromptTemplate], model: str, sampling: Sampling,
                     samples: int, confusable: dict[str, list[str]] | None = None) -> list[PlannedGeneration]:
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
                f"{p.template.path}: the LLM wrote no usable question ({rejected}); see `textadapt sql \"SELECT raw_text FROM "
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

    def __add__(self, other: "GenerationStats") -> "GenerationStats":
        return GenerationStats(*(getattr(self, f) + getattr(other, f) for f in
                                 ("planned", "cached", "made", "completion_tokens", "seconds")))


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
            key=p.key, dataset=spec.name, class_name=p.class_name, template=p.template.name,
            template_hash=p.template.source_hash, model=backend.identity, prompt=p.prompt, params=p.sampling.as_dict(),
            sample_index=p.sample_index, raw_text=stored_raw(ans.text), description=description, rejected=rejected,
            prompt_tokens=ans.prompt_tokens, completion_tokens=ans.completion_tokens, seconds=ans.seconds,
            base_key=p.base_key, refresh=p.refresh,
        )


def generate(plan: list[PlannedGeneration], backend: Backend, store: Store, spec: DatasetSpec,
             progress: Progress | None = None) -> GenerationStats:
    """Ask the LLM for every planned generation not in the cache; store each answer as it arrives."""
    t0 = time.perf_counter()
    todo = uncached(plan, store)
    stats = GenerationStats(planned=len(plan), cached=len(plan) - len(todo), made=0)
    if progress:
        progress(0, len(todo))
    stored: set[str] = set()
    try:
        for row in answer(todo, backend, spec):
            store.add_generation(row)
            stored.add(row.key)
            stats.made += 1
            stats.completion_tokens += row.completion_tokens or 0
            if progress:
                progress(stats.made, len(todo))
    except TextadaptError as e:  # the backend's requests failed after their retries: say which generations are missing
        raise TextadaptError(f"{e}\n{missing_summary([p for p in todo if p.key not in stored], len(plan))}") from e
    stats.seconds = time.perf_counter() - t0
    return stats


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
        g = groups.setdefault(set_name, {"texts": [], "labels": [], "keys": [], "n": 0, "rejected": Counter(),
                                         "excluded": Counter(), "seen": {}})
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
        name: TrainingSet(name, g["texts"], np.asarray(g["labels"], np.int64), g["keys"], g["n"], dict(g["rejected"]), dict(g["excluded"]))
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
