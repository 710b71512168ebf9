"""One harness for every classifier: build them all, score them all on the same image embeddings.

Every method is a (classes, dim) weight matrix applied to the same cached image embeddings, so
the comparison is fair by construction:

training-free (``kind`` zero-shot or descriptions)
    ``zero-shot:class-name``, ``zero-shot:a-photo-of``, ``zero-shot:ensemble`` (the spec's
    templates: clip_benchmark's for the dataset where it has them, else open_clip's ImageNet
    ensemble); ``waffle`` (WaffleCLIP as its code builds and scores it: per draw, one set of 15
    (random words, random characters) descriptors shared by every class, "A photo of a {c}, which
    (is|has) {d}.", the class score the mean of the similarities, 7 draws: the control any
    description method must beat); ``cupl:SET`` (CuPL: the normalised mean of a set's description
    embeddings per class); ``dclip:SET`` for list-parsed sets (DCLIP: the mean similarity to
    "{c}, which (is|has) {descriptor}", is/has chosen by the descriptor's wording as DCLIP does).
    docs/methods.md says what each is, and where it differs from its reference.
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

import gzip
import importlib.util
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from textadapt import TextadaptError, stats
from textadapt.adapters import TapRecipe, TrainedHead, taskres_base, taskres_recipe, taskres_templates, train_adapter
from textadapt.config import RunOptions
from textadapt.datasets import DatasetSpec, ImageSet
from textadapt.encoders import Backbone, encode_texts
from textadapt.head_cache import HeadInputs, cached_head, head_key, head_row
from textadapt.losses import OTTERSoftLabels
from textadapt.methods import method_name, parse_methods, parse_scorings
from textadapt.scoring import (
    BASELINES,
    PRIORS,
    Score,
    class_prompts,
    ig_logits,
    log_softmax,
    mean_score,
    openclip_imagenet_templates,
    prototypes,
    score_logits,
)
from textadapt.store import Store

# WaffleCLIP (ExplainableML/WaffleCLIP@7a1b8ee): README.md's command `base_main.py --mode=waffle --waffle_count=15
# --reps=7`, and base_main.py seeds repetition r with seed_everything(r) (line 118): draws 0..6.
WAFFLE_PAIRS = 15
WAFFLE_SEEDS = tuple(range(7))
WAFFLE_VOCABULARY = 4330  # random words to draw from: as many as WaffleCLIP's own word list holds


@dataclass
class HarnessConfig:
    """What to train and how to score it: a run's options as the harness needs them (``from_options``)."""

    methods: list[tuple[str, str]]  # (adapter, loss)
    scorings: list[str]
    seeds: list[int]
    steps: int
    prior: str
    beta: float
    ot_alpha: float
    ot_eps: float
    ot_iters: int
    prompt_steps: int | None = None  # tap-coop's full-batch steps; None: the prompt learner's own default
    epochs: int | None = None  # taskres's and protext's epochs; None: each recipe's own

    @classmethod
    def from_options(cls, options: RunOptions, steps: int) -> HarnessConfig:
        """The harness's view of a run's options; ``steps``: the option's, else the dataset spec's."""
        if options.train_only and options.prior == "mean-image" and set(options.scoring) & {"ig", "all"}:
            raise TextadaptError(
                "--prior mean-image needs the test images, which --train-only skips; use empty-text or blank-image"
            )
        return cls(
            methods=parse_methods(options.methods),
            scorings=parse_scorings(options.scoring),
            seeds=[options.seed + i for i in range(options.seeds)],
            steps=steps,
            prior=options.prior,
            beta=options.ig_beta,
            ot_alpha=options.ot_alpha,
            ot_eps=options.ot_eps,
            ot_iters=options.ot_iters,
        )


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
    def predicted(self) -> np.ndarray:
        """(seeds, images): each seed's predicted class of every test image."""
        return np.stack([s.predictions for s in self.per_seed])

    @property
    def top1_std(self) -> float | None:
        return float(np.std([s.top1 for s in self.per_seed])) if len(self.per_seed) > 1 else None

    @property
    def mean_per_class_std(self) -> float | None:
        return float(np.std([s.mean_per_class for s in self.per_seed])) if len(self.per_seed) > 1 else None


# --------------------------------------------------------------------------------------------
# Training-free classifiers


def which(descriptor: str) -> str:
    """DCLIP's and WaffleCLIP's clause for a descriptor: "which is an X", "which has X", "which can X"."""
    if descriptor.startswith("a") or descriptor.startswith("used"):  # "a"/"an" ..., "used for ...": is
        return f"which is {descriptor}"
    if descriptor.startswith(("has", "often", "typically", "may", "can")):
        return f"which {descriptor}"
    return f"which has {descriptor}"


@lru_cache(maxsize=1)
def _waffle_vocabulary() -> tuple[tuple[str, ...], str]:
    """The words and characters WaffleCLIP's descriptors are drawn from, as textadapt makes them.

    WaffleCLIP's own word list is not redistributed here (docs/methods.md): textadapt takes the
    ``WAFFLE_VOCABULARY`` most frequent whole words of CLIP's BPE vocabulary (two or more letters a-z, in
    merge order, which follows frequency; shipped inside open_clip), sorted; the characters are ASCII
    letters of both cases and digits. Both are the same on every machine with the same open_clip.

    The words are read from open_clip's BPE file as its ``SimpleTokenizer`` builds its vocabulary (a token's id
    is its last position among the merges), without importing open_clip: a cached run never needs its 4 s import.
    """
    package = importlib.util.find_spec("open_clip")
    bpe = Path(package.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    position = {"".join(m.split()): i for i, m in enumerate(merges)}
    tokens = sorted(position, key=position.__getitem__)
    words = [t[:-4] for t in tokens if t.endswith("</w>") and re.fullmatch(r"[a-z]{2,}", t[:-4])]
    characters = "".join(sorted(string.ascii_letters + string.digits))
    return tuple(sorted(dict.fromkeys(words[:WAFFLE_VOCABULARY]))), characters


@lru_cache(maxsize=64)
def waffle_descriptors(class_names: tuple[str, ...], seed: int, n_pairs: int = WAFFLE_PAIRS) -> tuple[str, ...]:
    """WaffleCLIP's shared random descriptors for one draw: n_pairs (random words, random characters).

    As its ``waffle`` mode builds them: words from its word list cut to the class names' mean word
    length, as many as the names have words on average; characters from its character set in as
    many comma-separated groups as the names have words, as long in all as their longest words.
    Its code draws a set for every class, then keeps one class's set for all; the same calls on the
    same NumPy stream (``RandomState(seed)``, as its ``seed_everything``) give the same set.
    """
    words, characters = _waffle_vocabulary()
    names = [c.replace("_", " ") for c in class_names]  # its wordify; the character counts use the raw names
    n_words = int(max(np.round(np.mean([len(c.split(" ")) for c in names])), 1))
    word_length = int(np.round(np.mean([np.mean([len(w) for w in c.split(" ")]) for c in names])))
    words = [w[:word_length] for w in words]
    n_groups = int(np.round(np.mean([c.count(" ") for c in class_names]))) + 1
    n_chars = int(np.ceil(np.mean([max(len(w) for w in c.split(" ")) for c in class_names])))
    n_chars += n_groups - n_chars % n_groups
    rng = np.random.RandomState(seed)

    # Its np.random.choice(x, 1, replace=False)[0] is x[permutation(len(x))[0]] on the same stream (NumPy's legacy
    # RandomState.choice); permutation skips choice's per-call checks, several times faster for the characters.
    def pick(pool):
        return pool[rng.permutation(len(pool))[0]]

    drawn = []
    for _ in class_names:
        pairs = []
        for _ in range(n_pairs):
            pairs.append(" ".join(pick(words) for _ in range(n_words)))
            pairs.append(", ".join("".join(pick(characters) for _ in range(n_chars // n_groups)) for _ in range(n_groups)))
        drawn.append(tuple(pairs))
    return drawn[rng.choice(len(class_names))]


def waffle_texts(class_names: list[str], seed: int) -> list[str]:
    """One WaffleCLIP draw's prompts, class-major: every class with the same descriptors."""
    shared = waffle_descriptors(tuple(class_names), seed)
    return [f"A photo of a {c.replace('_', ' ')}, {which(d)}." for c in class_names for d in shared]


def zero_shot_prompts(spec: DatasetSpec) -> dict[str, list[str]]:
    """Each zero-shot baseline's prompts, class-major (what its class prototypes average)."""
    return {
        method: class_prompts(spec.classes, templates or spec.zeroshot.templates or openclip_imagenet_templates())
        for method, templates in BASELINES.items()
    }


def training_free(
    backbone: Backbone, spec: DatasetSpec, store: Store, sets: dict, dclip_sets: set[str], batch_size: int = 256
) -> tuple[list[Classifier], int]:
    """The zero-shot, WaffleCLIP, CuPL and DCLIP classifiers, and how many texts had to be encoded."""
    n, scale, encoded, out = len(spec.classes), backbone.logit_scale, 0, []
    for method, prompts in zero_shot_prompts(spec).items():
        emb, k = encode_texts(backbone, prompts, store, batch_size)
        encoded += k
        out.append(Classifier(method, "zero-shot", [scale * prototypes(emb, n)], [0]))
    weights = []
    for seed in WAFFLE_SEEDS:
        texts = waffle_texts(spec.classes, seed)
        emb, k = encode_texts(backbone, texts, store, batch_size)
        encoded += k
        weights.append(scale * mean_similarity_weights(emb, np.repeat(np.arange(n), len(texts) // n), n))
    out.append(Classifier("waffle", "zero-shot", weights, list(WAFFLE_SEEDS)))
    for name, ts in sets.items():
        emb, k = encode_texts(backbone, ts.texts, store, batch_size)
        encoded += k
        out.append(
            Classifier(
                f"cupl:{name}",
                "descriptions",
                [scale * _class_means(emb, ts.labels, n)],
                [0],
                text_set=name,
                n_texts=len(ts.texts),
            )
        )
        if name in dclip_sets:
            texts, labels = dclip_texts(spec.classes, ts.texts, ts.labels)
            emb, k = encode_texts(backbone, texts, store, batch_size)
            encoded += k
            out.append(
                Classifier(
                    f"dclip:{name}",
                    "descriptions",
                    [scale * mean_similarity_weights(emb, labels, n)],
                    [0],
                    text_set=name,
                    n_texts=len(ts.texts),
                )
            )
    return out, encoded


def training_free_texts(spec: DatasetSpec) -> list[str]:
    """Every text the training-free classifiers embed besides the description sets (for embedding them in parallel)."""
    zero_shot = [t for ps in zero_shot_prompts(spec).values() for t in ps]
    return zero_shot + [t for seed in WAFFLE_SEEDS for t in waffle_texts(spec.classes, seed)]


def texts_to_encode(spec: DatasetSpec, sets: dict, dclip_sets: set[str]) -> list[str]:
    """Every text ``training_free`` and ``adapted`` encode through the cache, so that a caller can embed them all
    up front in parallel batches (then both find them there): the zero-shot and WaffleCLIP prompts, the
    description sets, and DCLIP's sentences for ``dclip_sets``."""
    out = training_free_texts(spec)
    for name, ts in sets.items():
        out += ts.texts + (dclip_texts(spec.classes, ts.texts, ts.labels)[0] if name in dclip_sets else [])
    return list(dict.fromkeys(out))


def dclip_texts(class_names: list[str], descriptions: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """DCLIP's sentences "{c}, which (is|has) {descriptor}" and their classes; a class with no
    descriptor gets the empty one, as DCLIP's loader does (so it is scored, not left at zero)."""
    texts = [f"{class_names[y]}, {which(_descriptor(t))}" for t, y in zip(descriptions, labels)]
    missing = sorted(set(range(len(class_names))) - set(np.asarray(labels).tolist()))
    texts += [f"{class_names[y]}, {which('')}" for y in missing]
    return texts, np.concatenate([np.asarray(labels, dtype=np.int64), np.asarray(missing, dtype=np.int64)])


def mean_similarity_weights(emb: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(classes, dim) weights whose logits are each class's mean similarity to its texts' normalised
    embeddings (DCLIP's and WaffleCLIP's score): the unnormalised mean, since v . mean(e) = mean(v . e)."""
    return _class_means(emb, labels, n, normalise=False)


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


# --------------------------------------------------------------------------------------------
# Adapted classifiers


def teacher_prototypes(training_free: list[Classifier]) -> np.ndarray:
    """The normalised zero-shot ensemble prototypes: where zs-head and tap-residual start."""
    w = next(c for c in training_free if c.method == "zero-shot:ensemble").weights[0]
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def adapted(
    backbone: Backbone,
    spec: DatasetSpec,
    store: Store,
    sets: dict,
    teacher: np.ndarray,
    config: HarnessConfig,
    batch_size: int = 256,
    log=print,
    progress=None,
) -> tuple[list[Classifier], int]:
    """Every (adapter, loss) of ``config.methods`` on every description set, once per seed.

    ``teacher``: the normalised zero-shot prototypes (classes, dim) that zs-head and tap-residual start from.
    ``progress(done, total)``: heads trained (or read back) so far. A head whose inputs are unchanged since a run
    trained it (``head_cache.head_key``) is read back from the cache; only the others are trained, and stored.
    """
    n, scale, encoded, out = len(spec.classes), backbone.logit_scale, 0, []
    base = None  # taskres's template features, computed once
    total, done = len(sets) * len(config.methods) * len(config.seeds), 0
    if progress:
        progress(0, total)
    for name, ts in sets.items():
        emb, k = encode_texts(backbone, ts.texts, store, batch_size)
        encoded += k
        for adapter, loss_name in config.methods:
            if adapter == "taskres" and base is None:
                base = taskres_base(backbone, spec.classes, taskres_templates(spec.name), batch_size)
            method = method_name(adapter, loss_name, name)
            start = base if adapter == "taskres" else teacher if adapter in ("zs-head", "tap-residual") else None
            inputs = [
                HeadInputs(
                    adapter,
                    loss_name,
                    _recipe(adapter, spec, config, seed),
                    OTTERSoftLabels(config.ot_alpha, config.ot_eps, config.ot_iters) if loss_name == "ot" else None,
                    emb,
                    ts.labels,
                    start,
                    scale,
                    spec.classes,
                    backbone.id,
                    torch.device(backbone.device).type,
                )
                for seed in config.seeds
            ]
            keys = [head_key(h) for h in inputs]
            cached = store.trained_heads(keys)
            heads, new = [], []
            for key, h in zip(keys, inputs):
                if key in cached:
                    head = cached_head(cached[key])
                else:
                    head = _train(h, backbone)
                    new.append(head_row(key, h, head))
                heads.append(head)
                if head.labelled_mass:
                    mass = head.labelled_mass
                    log(
                        f"{method} seed {head.seed}: the OT plan gives the labelled class {mass[0]:.3f} of a description's "
                        f"mass at the first step, {mass[-1]:.3f} at the last (uniform: {1 / n:.3f})"
                        + (" (from the cache)" if head.cached else "")
                    )
                done += 1
                if progress:
                    progress(done, total)
            store.put_trained_heads(new)
            log(f"{method}: {_trained_or_cached(heads)}, last loss {np.mean([h.losses[-1] for h in heads]):.3f}")
            out.append(
                Classifier(
                    method,
                    "adapted",
                    [h.weight for h in heads],
                    list(config.seeds),
                    adapter,
                    loss_name,
                    name,
                    heads,
                    len(ts.texts),
                )
            )
    return out, encoded


def _recipe(adapter: str, spec: DatasetSpec, config: HarnessConfig, seed: int):
    """The recipe one seed of ``adapter`` trains with: TapRecipe, TaskResRecipe or the prompt learner's PromptRecipe."""
    if adapter == "protext":
        from textadapt.prompt_learning import protext_recipe

        return protext_recipe(spec.name, seed, config.epochs)
    if adapter == "tap-coop":
        from textadapt.prompt_learning import PromptRecipe

        return PromptRecipe(seed=seed) if config.prompt_steps is None else PromptRecipe(seed=seed, steps=config.prompt_steps)
    if adapter == "taskres":
        recipe = taskres_recipe(spec.name, seed)
        recipe.epochs = config.epochs or recipe.epochs
        return recipe
    return TapRecipe(steps=config.steps, seed=seed)


def _train(h: HeadInputs, backbone: Backbone) -> TrainedHead:
    """Train one head on its inputs; a +ot head keeps the OT plan's labelled-class mass per step."""
    if h.adapter in ("tap-coop", "protext"):
        head = _prompt(h, backbone)
    else:
        head = train_adapter(
            h.adapter, h.embeddings, h.labels, len(h.classes), h.recipe, h.start, h.logit_scale, h.ot, backbone.device
        )
    if h.ot is not None:
        head.labelled_mass = h.ot.labelled_mass()
    return head


def _prompt(h: HeadInputs, backbone: Backbone) -> TrainedHead:
    from textadapt.prompt_learning import train_prompt_learner

    head = train_prompt_learner(backbone, h.embeddings, h.labels, h.classes, h.recipe, h.ot)
    head.weight = h.logit_scale * head.weight  # normalised class embeddings -> CLIP's logits, as zero-shot's
    return head


def _trained_or_cached(heads: list[TrainedHead]) -> str:
    """How a method's heads were had: "trained 3 seed(s) in 2.8 s", "3 seed(s) from the cache (trained in 2.8 s)", or both."""
    trained = [h for h in heads if not h.cached]
    cached = [h for h in heads if h.cached]
    parts = []
    if trained:
        parts.append(f"trained {len(trained)} seed(s) in {sum(h.seconds for h in trained):.1f} s")
    if cached:
        parts.append(f"{len(cached)} seed(s) from the cache (trained in {sum(h.seconds for h in cached):.1f} s)")
    return ", ".join(parts)


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


def evaluate(
    classifiers: list[Classifier],
    image_embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    scorings: list[str],
    content_free: np.ndarray | None,
    beta: float = 1.0,
) -> list[MethodResult]:
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


def save_classifiers(
    store: Store,
    run_id: str,
    spec: DatasetSpec,
    classifiers: list[Classifier],
    scorings: list[str],
    content_free: np.ndarray | None,
    beta: float,
) -> None:
    """Keep every classifier (its first seed) in ``classifiers``, once per scoring: what ``textadapt export`` writes out."""
    for c in classifiers:
        for scoring in scorings:
            log_prior = log_softmax(c.weights[0] @ content_free) if scoring == "ig" else None
            store.save_classifier(
                run_id,
                scored_name(c.method, scoring),
                c.seeds[0],
                c.weights[0],
                spec.classes,
                log_prior,
                beta if scoring == "ig" else None,
            )


def gains(results: list[MethodResult], labels: np.ndarray, n_classes: int) -> stats.Differences:
    """Every method's accuracy minus the best training-free baseline's (top-1, mean per class, each class), with 95%
    intervals of a paired bootstrap over the test images; a method's correctness on an image is the mean over its seeds."""
    best = best_baseline(results)
    correct = np.stack([stats.correctness(r.predicted, labels) for r in results])
    return stats.differences(correct, correct[results.index(best)], labels, n_classes, [r.method for r in results], best.method)


def save(
    store: Store,
    run_id: str,
    spec: DatasetSpec,
    results: list[MethodResult],
    gains: stats.Differences | None = None,
    images: ImageSet | None = None,
) -> str:
    """Store every method's scores and per-class deltas against the best training-free baseline; returns its name.

    With ``gains`` (``gains(results, ...)``) also the deltas' intervals; with ``images`` (the test images scored)
    every method's per-image predictions, for ``textadapt compare``.
    """
    best = best_baseline(results)
    ref = best.score.per_class
    for r in results:
        s, c = r.score, r.classifier
        per_class = [
            (i, spec.classes[i], int(s.n_per_class[i]), _num(s.per_class[i]), _num(s.per_class[i] - ref[i]))
            for i in range(len(spec.classes))
        ]
        intervals = {}
        if gains is not None:
            m = gains.methods.index(r.method)
            per_class = [
                (*row, _num(gains.per_class_low[m, i]), _num(gains.per_class_high[m, i])) for i, row in enumerate(per_class)
            ]
            intervals = dict(
                baseline=gains.reference,
                delta_top1=s.top1 - best.score.top1,
                delta_top1_low=_num(gains.top1_low[m]),
                delta_top1_high=_num(gains.top1_high[m]),
                delta_mean_per_class=s.mean_per_class - best.score.mean_per_class,
                delta_mean_per_class_low=_num(gains.mean_per_class_low[m]),
                delta_mean_per_class_high=_num(gains.mean_per_class_high[m]),
            )
        store.save_result(
            run_id,
            r.method,
            c.kind,
            s.top1,
            s.mean_per_class,
            int(s.n_per_class.sum()),
            per_class,
            n_texts=c.n_texts,
            train_seconds=sum(h.seconds for h in c.heads) if c.heads else None,
            losses=c.heads[0].losses if c.heads else None,
            top5=s.top5,
            top1_std=r.top1_std,
            mean_per_class_std=r.mean_per_class_std,
            seeds=c.seeds if c.kind == "adapted" or len(c.seeds) > 1 else None,
            top1_per_seed=[p.top1 for p in r.per_seed],
            adapter=c.adapter,
            loss=c.loss,
            scoring=r.scoring,
            text_set=c.text_set,
            **intervals,
        )
    if images is not None:
        store.save_predictions(run_id, images.keys(), images.labels, {r.method: r.predicted for r in results})
    return best.method


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
