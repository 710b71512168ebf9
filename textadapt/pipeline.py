"""The stages of an adaptation run, as plain functions with typed inputs and outputs.

    plan_generations -> generate -> training_sets -> (encode_texts) -> train_heads
    zero_shot_weights + encode_images -> evaluate -> save_results -> report

``flows/adapt.py`` runs them in this order as Prefect tasks; tests and notebooks call them directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from textadapt.adapters import TapRecipe, TrainedHead, train_tap_head
from textadapt.cleaning import clean
from textadapt.datasets import DatasetSpec
from textadapt.encoders import Backbone, encode_texts
from textadapt.llm import Backend, Request, Sampling
from textadapt.prompts import PromptTemplate, render
from textadapt.scoring import BASELINES, Score, best_baseline, class_prompts, openclip_imagenet_templates, predict, prototypes, score
from textadapt.store import Generation, Store

Progress = Callable[[int, int], None]

# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class PlannedGeneration:
    key: str
    class_index: int
    class_name: str
    template: PromptTemplate
    prompt: str
    sample_index: int


def generation_key(dataset: str, model: str, template_hash: str, prompt: str, params: dict, sample_index: int) -> str:
    """The content address of one generation: change any part and it is a different generation."""
    payload = {"dataset": dataset, "model": model, "template_hash": template_hash, "prompt": prompt,
               "params": params, "sample_index": sample_index}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def plan_generations(spec: DatasetSpec, templates: list[PromptTemplate], model: str, sampling: Sampling,
                     samples: int) -> list[PlannedGeneration]:
    """Every (class, template, sample) the run needs, with its cache key. Renders every prompt."""
    plan = []
    for ci, class_name in enumerate(spec.classes):
        for t in templates:
            prompt = render(t, spec, class_name)
            for s in range(samples):
                key = generation_key(spec.name, model, t.source_hash, prompt, sampling.as_dict(), s)
                plan.append(PlannedGeneration(key, ci, class_name, t, prompt, s))
    return plan


@dataclass
class GenerationStats:
    planned: int
    cached: int  # served from the cache: no LLM call
    made: int  # LLM calls made now
    rejected_now: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def generate(plan: list[PlannedGeneration], backend: Backend, store: Store, dataset: str, sampling: Sampling,
             progress: Progress | None = None) -> GenerationStats:
    """Ask the LLM for every planned generation not in the cache; store each answer as it arrives."""
    t0 = time.perf_counter()
    existing = store.existing_generations([p.key for p in plan])
    todo = {p.key: p for p in plan if p.key not in existing}
    stats = GenerationStats(planned=len(plan), cached=len(plan) - len(todo), made=0)
    requests = [Request(k, p.prompt, sampling, seed=int(k[:8], 16)) for k, p in todo.items()]
    if progress:
        progress(0, len(requests))
    for req, ans in backend.generate(requests):
        p = todo[req.key]
        description, rejected = clean(ans.text)
        store.add_generation(Generation(
            key=p.key, dataset=dataset, class_name=p.class_name, template=p.template.name,
            template_hash=p.template.source_hash, model=backend.identity, prompt=p.prompt, params=sampling.as_dict(),
            sample_index=p.sample_index, raw_text=ans.text, description=description, rejected=rejected,
            prompt_tokens=ans.prompt_tokens, completion_tokens=ans.completion_tokens, seconds=ans.seconds,
        ))
        stats.made += 1
        stats.rejected_now += rejected is not None
        stats.completion_tokens += ans.completion_tokens or 0
        if progress:
            progress(stats.made, len(requests))
    stats.seconds = time.perf_counter() - t0
    return stats


@dataclass
class TrainingSet:
    """The accepted descriptions of one template set, labelled by the spec's class order."""

    template_set: str
    texts: list[str]
    labels: np.ndarray
    keys: list[str]
    generations: int  # accepted + rejected
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count


def training_sets(plan: list[PlannedGeneration], store: Store) -> dict[str, TrainingSet]:
    """Group the stored answers of the plan by template set. Labels come from the plan (the spec's
    class order), never from the order of anything stored."""
    rows = store.generations([p.key for p in plan])
    missing = [p.key for p in plan if p.key not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} planned generations are not in the cache; run generate first")
    groups: dict[str, dict] = {}
    for p in plan:
        g = groups.setdefault(p.template.template_set, {"texts": [], "labels": [], "keys": [], "n": 0, "rejected": Counter()})
        description, rejected, _ = rows[p.key]
        g["n"] += 1
        if rejected is not None:
            g["rejected"][rejected] += 1
        else:
            g["texts"].append(description)
            g["labels"].append(p.class_index)
            g["keys"].append(p.key)
    return {
        name: TrainingSet(name, g["texts"], np.asarray(g["labels"], np.int64), g["keys"], g["n"], dict(g["rejected"]))
        for name, g in groups.items()
    }


def check_trainable(sets: dict[str, TrainingSet], spec: DatasetSpec) -> None:
    """Every class needs at least one accepted description in every set, or its head cannot learn it."""
    for ts in sets.values():
        counts = Counter(ts.labels.tolist())
        empty = [spec.classes[i] for i in range(len(spec.classes)) if counts[i] == 0]
        if empty:
            raise RuntimeError(
                f"template set {ts.template_set!r}: no accepted description for classes {empty} "
                f"(rejections: {ts.rejected}); see `textadapt sql \"SELECT class_name, rejected, raw_text FROM generations "
                f"WHERE rejected IS NOT NULL\"`"
            )


# --------------------------------------------------------------------------------------------
# Classifiers


def zero_shot_weights(backbone: Backbone, spec: DatasetSpec, store: Store, batch_size: int = 256) -> tuple[dict[str, np.ndarray], int]:
    """The zero-shot baselines' class weights, and how many prompts had to be encoded."""
    weights, encoded = {}, 0
    for method, templates in BASELINES.items():
        templates = templates or spec.zeroshot.templates or openclip_imagenet_templates()
        emb, n = encode_texts(backbone, class_prompts(spec.classes, templates), store, batch_size)
        weights[method] = prototypes(emb, len(spec.classes))
        encoded += n
    return weights, encoded


def head_method(template_set: str) -> str:
    return f"tap-head:{template_set}"


def train_heads(backbone: Backbone, sets: dict[str, TrainingSet], spec: DatasetSpec, store: Store, steps: int,
                seed: int, batch_size: int = 256) -> tuple[dict[str, TrainedHead], int]:
    """One TAP head per template set; returns the heads by method name and the texts encoded."""
    heads, encoded = {}, 0
    for name, ts in sets.items():
        emb, n = encode_texts(backbone, ts.texts, store, batch_size)
        encoded += n
        heads[head_method(name)] = train_tap_head(emb, ts.labels, len(spec.classes), TapRecipe(steps=steps, seed=seed), backbone.device)
    return heads, encoded


def evaluate(weights: dict[str, np.ndarray], image_embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Score]:
    return {m: score(predict(image_embeddings, w), labels, n_classes) for m, w in weights.items()}


def is_zero_shot(method: str) -> bool:
    return method.startswith("zero-shot:")


def save_results(store: Store, run_id: str, spec: DatasetSpec, scores: dict[str, Score], heads: dict[str, TrainedHead],
                 sets: dict[str, TrainingSet]) -> str:
    """Store every method's scores and per-class deltas against the best zero-shot baseline; returns its name."""
    best = best_baseline(scores, is_zero_shot)
    ref = scores[best].per_class
    for method, s in scores.items():
        head = heads.get(method)
        per_class = [
            (i, spec.classes[i], int(s.n_per_class[i]), _num(s.per_class[i]), _num(s.per_class[i] - ref[i]))
            for i in range(len(spec.classes))
        ]
        ts = sets.get(method.split(":", 1)[1]) if head else None
        store.save_result(run_id, method, "zero-shot" if is_zero_shot(method) else "adapted", s.top1, s.mean_per_class,
                          int(s.n_per_class.sum()), per_class, n_texts=len(ts.texts) if ts else None,
                          train_seconds=head.seconds if head else None, losses=head.losses if head else None)
    return best


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
