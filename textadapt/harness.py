"""One harness for every classifier: build them all, score them all on the same image embeddings.

Every method is a (classes, dim) weight matrix applied to the same cached image embeddings, so
the comparison is fair by construction:

training-free (``kind`` zero-shot or descriptions)
    ``zero-shot:class-name``, ``zero-shot:a-photo-of``, ``zero-shot:ensemble`` (the spec's
    templates: clip_benchmark's for the dataset where it has them, else open_clip's ImageNet
    ensemble); ``waffle`` (WaffleCLIP: "a photo of a {c}, which has {random words}" and random
    character strings, 15 pairs per class, a new draw per seed: the control any description method
    must beat); ``cupl:SET`` (the normalised mean of a set's description embeddings per class);
    ``dclip:SET`` for list-parsed sets (the mean similarity to "{c}, which has {descriptor}").
adapted (``kind`` adapted), for every description set
    ``ADAPTER[+ot]:SET``, trained once per seed, with ADAPTER one of (adapters.py, prompt_learning.py,
    docs/methods.md): ``tap-head``, ``zs-head``, ``tap-residual`` (TaskRes's parametrisation, TAP's
    recipe), ``taskres`` (TaskRes's recipe), ``tap-coop`` (CoOp's context, TAP's recipe) and ``protext``
    (ProText's recipe); each trains with its recipe's own loss, or with ``+ot`` OTTER's soft labels
    (losses.py; not protext, which matches embeddings and has no logits). ``residual`` and ``prompt``
    are accepted as the old names of tap-residual and tap-coop.
captioner (``--captioner SPEC``, a CoCa backbone)
    ``captioner``: the class caption "a photo of a {c}." most likely given the image, log P(t_c | image)
    (captioner.py); ``captioner/ig``: minus its log-likelihood with no image (the IG captioner).
scoring
    every method plain, and with ``--scoring all`` also its information-gain form ``METHOD/ig``
    (scoring.py: logits minus beta times the log prior of a content-free input).

Each method is scored per seed; the run reports the mean over seeds and the spread (population
standard deviation), top-1, top-5 (more than 5 classes), mean per-class recall, and the per-class
delta against the best training-free baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from textadapt import TextadaptError
from textadapt.adapters import (ADAPTERS, TapRecipe, TrainedHead, taskres_base, taskres_recipe, taskres_templates,
                                train_adapter)
from textadapt.datasets import DatasetSpec
from textadapt.encoders import Backbone, encode_texts
from textadapt.losses import OTTERSoftLabels
from textadapt.scoring import (BASELINES, PRIORS, Score, class_prompts, ig_logits, log_softmax, mean_score,
                               openclip_imagenet_templates, prototypes, score_logits)
from textadapt.store import Store

ALL_ADAPTERS = (*ADAPTERS, "tap-coop", "protext")
LOSSES = ("ce", "ot")  # what ``+LOSS`` may name: ce, the adapter's own recipe loss (the default); ot, OTTER's soft labels
OWN_LOSS = {"protext": "l1"}  # an adapter's own loss, as stored in results.loss, where it is not a cross-entropy
NO_OT = ("protext",)  # adapters without logits to put soft labels on
ALIASES = {"tap": "tap-head", "residual": "tap-residual", "prompt": "tap-coop"}  # short and old names
SCORINGS = ("plain", "ig")
DEFAULT_METHODS = ["tap-head"]
WAFFLE_PAIRS = 15


@dataclass
class HarnessConfig:
    """What to train and how to score it; ``RunOptions`` fills it in."""

    methods: list[tuple[str, str]] = field(default_factory=lambda: [("tap-head", "ce")])  # (adapter, loss)
    scorings: list[str] = field(default_factory=lambda: ["plain"])
    seeds: list[int] = field(default_factory=lambda: [7777])
    steps: int = 400
    prior: str = "empty-text"
    beta: float = 1.0
    ot_alpha: float = 0.5
    ot_eps: float = 0.15
    ot_iters: int = 5
    prompt_steps: int | None = None  # tap-coop's full-batch steps; None: the prompt learner's own default
    epochs: int | None = None  # taskres's and protext's epochs; None: each recipe's own


def parse_methods(items: list[str]) -> list[tuple[str, str]]:
    """``["all"]`` or items ``ADAPTER[+LOSS]`` (ALIASES accepted) -> (adapter, loss) pairs, loss as stored in results."""
    out: list[tuple[str, str]] = []
    for item in items:
        item = item.strip()
        if item == "all":
            out += parse_methods([m for a in ALL_ADAPTERS for m in ([a] if a in NO_OT else [a, f"{a}+ot"])])
            continue
        adapter, _, loss = item.partition("+")
        adapter = ALIASES.get(adapter, adapter)
        loss = loss or "ce"
        if adapter not in ALL_ADAPTERS:
            raise TextadaptError(f"--methods: unknown adapter {adapter!r} in {item!r}; known: {', '.join(ALL_ADAPTERS)}, or all")
        if loss not in LOSSES:
            raise TextadaptError(f"--methods: unknown loss {loss!r} in {item!r}; known: {', '.join(LOSSES)}")
        if loss == "ot" and adapter in NO_OT:
            raise TextadaptError(f"--methods: {item!r}: {adapter} pulls prompted class embeddings towards the descriptions "
                                 f"(an L1 loss, no logits), so OTTER's soft labels do not apply; use {adapter}")
        out.append((adapter, OWN_LOSS.get(adapter, "ce") if loss == "ce" else loss))
    return list(dict.fromkeys(out).keys())


def parse_scorings(items: list[str]) -> list[str]:
    scorings = list(SCORINGS) if "all" in items else list(dict.fromkeys(items))
    for s in scorings:
        if s not in SCORINGS:
            raise TextadaptError(f"--scoring: unknown scoring {s!r}; known: {', '.join(SCORINGS)}, or all")
    return scorings


def method_name(adapter: str, loss: str, text_set: str) -> str:
    """``ADAPTER:SET``, or ``ADAPTER+ot:SET`` with OTTER's soft labels; the adapter's canonical name, never an alias."""
    return f"{adapter}{'+ot' if loss == 'ot' else ''}:{text_set}"


@dataclass
class Classifier:
    """One method's classifier: a weight matrix per seed (one for deterministic methods)."""

    method: str
    kind: str  # zero-shot, descriptions or adapted
    weights: list[np.ndarray]  # (classes, dim) per seed: logits = v @ W.T
    seeds: list[int]
    adapter: str | None = None
    loss: str | None = None
    text_set: str | None = None
    heads: list[TrainedHead] = field(default_factory=list)
    n_texts: int | None = None


@dataclass
class MethodResult:
    method: str  # METHOD or METHOD/ig
    classifier: Classifier
    scoring: str
    score: Score  # mean over seeds
    per_seed: list[Score]

    @property
    def top1_std(self) -> float | None:
        return float(np.std([s.top1 for s in self.per_seed])) if len(self.per_seed) > 1 else None

    @property
    def mean_per_class_std(self) -> float | None:
        return float(np.std([s.mean_per_class for s in self.per_seed])) if len(self.per_seed) > 1 else None


def logit_scale(backbone: Backbone) -> float:
    scale = getattr(backbone.model, "logit_scale", None)
    return float(scale.exp().item()) if scale is not None else 100.0


# --------------------------------------------------------------------------------------------
# Training-free classifiers


def _waffle_descriptors(rng: random.Random, vocabulary: list[str], n_pairs: int) -> list[str]:
    """WaffleCLIP's random descriptors: n pairs of (random words, random characters of the same length)."""
    out = []
    for _ in range(n_pairs):
        words = " ".join(rng.choice(vocabulary) for _ in range(2))
        chars = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(len(words)))
        out += [words, chars]
    return out


def _vocabulary(backbone: Backbone) -> list[str]:
    """Real words for WaffleCLIP: the alphabetic whole words of the tokenizer's vocabulary, else a fallback list."""
    encoder = getattr(backbone.tokenizer, "encoder", None)
    if encoder:
        words = sorted(w[:-4] for w in encoder if w.endswith("</w>") and w[:-4].isalpha() and 3 <= len(w) - 4 <= 10)
        if len(words) > 100:
            return words
    return "red blue round square soft hard small large bright dark striped plain metal wood glass paper".split()


def zero_shot_prompts(spec: DatasetSpec) -> dict[str, list[str]]:
    """Each zero-shot baseline's prompts, class-major (what its class prototypes average)."""
    return {method: class_prompts(spec.classes, templates or spec.zeroshot.templates or openclip_imagenet_templates())
            for method, templates in BASELINES.items()}


def training_free(backbone: Backbone, spec: DatasetSpec, store: Store, sets: dict, dclip_sets: set[str], seeds: list[int],
                  batch_size: int = 256) -> tuple[list[Classifier], int]:
    """The zero-shot, WaffleCLIP, CuPL and DCLIP classifiers, and how many texts had to be encoded."""
    n, scale, encoded, out = len(spec.classes), logit_scale(backbone), 0, []
    for method, prompts in zero_shot_prompts(spec).items():
        emb, k = encode_texts(backbone, prompts, store, batch_size)
        encoded += k
        out.append(Classifier(method, "zero-shot", [scale * prototypes(emb, n)], [0]))
    vocabulary, weights = _vocabulary(backbone), []
    for seed in seeds:
        rng = random.Random(seed)
        texts = [f"a photo of a {c}, which has {d}." for c in spec.classes for d in _waffle_descriptors(rng, vocabulary, WAFFLE_PAIRS)]
        emb, k = encode_texts(backbone, texts, store, batch_size)
        encoded += k
        weights.append(scale * prototypes(emb, n))
    out.append(Classifier("waffle", "zero-shot", weights, list(seeds)))
    for name, ts in sets.items():
        emb, k = encode_texts(backbone, ts.texts, store, batch_size)
        encoded += k
        out.append(Classifier(f"cupl:{name}", "descriptions", [scale * _class_means(emb, ts.labels, n)], [0], text_set=name,
                              n_texts=len(ts.texts)))
        if name in dclip_sets:
            texts = [f"{spec.classes[y]}, which has {_descriptor(t)}" for t, y in zip(ts.texts, ts.labels)]
            emb, k = encode_texts(backbone, texts, store, batch_size)
            encoded += k
            out.append(Classifier(f"dclip:{name}", "descriptions", [_dclip(emb, ts.labels, n, scale)], [0], text_set=name,
                                  n_texts=len(ts.texts)))
    return out, encoded


def _descriptor(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]


def _class_means(emb: np.ndarray, labels: np.ndarray, n: int, normalise: bool = True) -> np.ndarray:
    sums = np.zeros((n, emb.shape[1]), np.float64)
    np.add.at(sums, labels, emb)
    means = sums / np.maximum(np.bincount(labels, minlength=n), 1)[:, None]
    if normalise:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return means.astype(np.float32)


def _dclip(emb: np.ndarray, labels: np.ndarray, n: int, scale: float) -> np.ndarray:
    """DCLIP with a varying number of descriptors per class: the unnormalised mean per class."""
    return scale * _class_means(emb, labels, n, normalise=False)


# --------------------------------------------------------------------------------------------
# Adapted classifiers


def teacher_prototypes(training_free: list[Classifier]) -> np.ndarray:
    """The normalised zero-shot ensemble prototypes: where zs-head and tap-residual start."""
    w = next(c for c in training_free if c.method == "zero-shot:ensemble").weights[0]
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def adapted(backbone: Backbone, spec: DatasetSpec, store: Store, sets: dict, teacher: np.ndarray, config: HarnessConfig,
            batch_size: int = 256, log=print) -> tuple[list[Classifier], int]:
    """Every (adapter, loss) of ``config.methods`` on every description set, once per seed.

    ``teacher``: the normalised zero-shot prototypes (classes, dim) that zs-head and tap-residual start from.
    """
    n, scale, encoded, out = len(spec.classes), logit_scale(backbone), 0, []
    base = None  # taskres's template features, computed once
    for name, ts in sets.items():
        emb, k = encode_texts(backbone, ts.texts, store, batch_size)
        encoded += k
        for adapter, loss_name in config.methods:
            if adapter == "taskres" and base is None:
                base = taskres_base(backbone, spec.classes, taskres_templates(spec.name), batch_size)
            heads = []
            for seed in config.seeds:
                loss = OTTERSoftLabels(config.ot_alpha, config.ot_eps, config.ot_iters) if loss_name == "ot" else None
                if adapter in ("tap-coop", "protext"):
                    heads.append(_prompt(adapter, backbone, emb, ts.labels, spec, config, seed, loss, scale))
                elif adapter == "taskres":
                    recipe = taskres_recipe(spec.name, seed)
                    recipe.epochs = config.epochs or recipe.epochs
                    heads.append(train_adapter(adapter, emb, ts.labels, n, recipe, base, scale, loss, backbone.device))
                else:
                    recipe = TapRecipe(steps=config.steps, seed=seed)
                    heads.append(train_adapter(adapter, emb, ts.labels, n, recipe, teacher, scale, loss, backbone.device))
                if loss is not None:
                    mass = loss.labelled_mass()
                    log(f"{method_name(adapter, loss_name, name)} seed {seed}: the OT plan gives the labelled class "
                        f"{mass[0]:.3f} of a description's mass at the first step, {mass[-1]:.3f} at the last "
                        f"(uniform: {1 / n:.3f})")
            method = method_name(adapter, loss_name, name)
            log(f"{method}: trained {len(heads)} seed(s) in {sum(h.seconds for h in heads):.1f} s, "
                f"last loss {np.mean([h.losses[-1] for h in heads]):.3f}")
            out.append(Classifier(method, "adapted", [h.weight for h in heads], list(config.seeds), adapter, loss_name, name,
                                  heads, len(ts.texts)))
    return out, encoded


def _prompt(adapter, backbone, emb, labels, spec, config, seed, loss, scale) -> TrainedHead:
    from textadapt.prompt_learning import PromptRecipe, protext_recipe, train_prompt_learner

    if adapter == "protext":
        recipe = protext_recipe(spec.name, seed, config.epochs)
    else:
        recipe = PromptRecipe(seed=seed) if config.prompt_steps is None else PromptRecipe(seed=seed, steps=config.prompt_steps)
    head = train_prompt_learner(backbone, emb, labels, spec.classes, recipe, loss)
    head.weight = scale * head.weight  # normalised class embeddings -> CLIP's logits, as zero-shot's
    return head


# --------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def content_free_embedding(backbone: Backbone, prior: str, store: Store, image_embeddings: np.ndarray | None) -> np.ndarray:
    """The embedding of a content-free input, for information-gain scoring (see scoring.PRIORS)."""
    if prior == "empty-text":
        return encode_texts(backbone, [""], store)[0][0]
    if prior == "blank-image":
        pixels = backbone.preprocess(Image.new("RGB", (224, 224), (128, 128, 128))).unsqueeze(0).to(backbone.device)
        return backbone.model.encode_image(pixels, normalize=True).float().cpu().numpy()[0]
    if prior == "mean-image":
        if image_embeddings is None:
            raise TextadaptError("--prior mean-image needs the test images; use empty-text or blank-image with --train-only")
        mean = image_embeddings.mean(axis=0)
        return mean / np.linalg.norm(mean)
    raise TextadaptError(f"--prior: unknown estimator {prior!r}; known: {', '.join(PRIORS)}")


def evaluate(classifiers: list[Classifier], image_embeddings: np.ndarray, labels: np.ndarray, n_classes: int,
             scorings: list[str], content_free: np.ndarray | None, beta: float = 1.0) -> list[MethodResult]:
    """Score every classifier (every seed) on the same image embeddings, plain and/or IG."""
    results = []
    for c in classifiers:
        for scoring in scorings:
            per_seed = []
            for w in c.weights:
                logits = image_embeddings @ w.T
                if scoring == "ig":
                    logits = ig_logits(logits, (w @ content_free)[None, :], beta)
                per_seed.append(score_logits(logits, labels, n_classes))
            results.append(MethodResult(scored_name(c.method, scoring), c, scoring, mean_score(per_seed), per_seed))
    return results


def captioner_results(scores, labels: np.ndarray, n_classes: int, scorings: list[str], beta: float = 1.0) -> list[MethodResult]:
    """The CoCa captioner as a classifier: caption log-likelihood (plain) and minus beta * its no-image prior (ig)."""
    clf = Classifier("captioner", "zero-shot", [], [0])
    out = []
    for scoring in scorings:
        logits = scores.loglik if scoring == "plain" else scores.ig(beta)
        s = score_logits(logits, labels, n_classes)
        out.append(MethodResult(scored_name("captioner", scoring), clf, scoring, s, [s]))
    return out


def best_baseline(results: list[MethodResult]) -> MethodResult:
    """The training-free method with the highest mean top-1 under plain scoring: what every delta is against."""
    return max((r for r in results if r.classifier.kind != "adapted" and r.scoring == "plain"), key=lambda r: r.score.top1)


def scored_name(method: str, scoring: str) -> str:
    return method if scoring == "plain" else f"{method}/{scoring}"


def save_classifiers(store: Store, run_id: str, spec: DatasetSpec, classifiers: list[Classifier], scorings: list[str],
                     content_free: np.ndarray | None, beta: float) -> None:
    """Keep every classifier (its first seed) in ``classifiers``, once per scoring: what ``textadapt export`` writes out."""
    for c in classifiers:
        for scoring in scorings:
            log_prior = log_softmax(c.weights[0] @ content_free) if scoring == "ig" else None
            store.save_classifier(run_id, scored_name(c.method, scoring), c.seeds[0], c.weights[0], spec.classes, log_prior,
                                  beta if scoring == "ig" else None)


def save(store: Store, run_id: str, spec: DatasetSpec, results: list[MethodResult]) -> str:
    """Store every method's scores and per-class deltas against the best training-free baseline; returns its name."""
    best = best_baseline(results)
    ref = best.score.per_class
    for r in results:
        s, c = r.score, r.classifier
        per_class = [(i, spec.classes[i], int(s.n_per_class[i]), _num(s.per_class[i]), _num(s.per_class[i] - ref[i]))
                     for i in range(len(spec.classes))]
        store.save_result(
            run_id, r.method, c.kind, s.top1, s.mean_per_class, int(s.n_per_class.sum()), per_class,
            n_texts=c.n_texts, train_seconds=sum(h.seconds for h in c.heads) if c.heads else None,
            losses=c.heads[0].losses if c.heads else None, top5=s.top5, top1_std=r.top1_std,
            mean_per_class_std=r.mean_per_class_std, seeds=c.seeds if c.kind == "adapted" or len(c.seeds) > 1 else None,
            top1_per_seed=[p.top1 for p in r.per_seed], adapter=c.adapter, loss=c.loss, scoring=r.scoring, text_set=c.text_set,
        )
    return best.method


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)

