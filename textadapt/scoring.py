"""Classifiers on image embeddings, and how they are measured.

Every classifier here is a (classes, dim) weight matrix W: the logits of an L2-normalised image
embedding v are W v and the predicted class is their argmax. Zero-shot CLIP's W holds the
normalised class prompt embeddings (the mean of the normalised embeddings of a prompt ensemble,
renormalised) times CLIP's logit scale; an adapted head's W is learned.

Information-gain scoring (the IG captioner's idea, for any classifier): a classifier built from
text alone carries a class prior learned from text, and the logits of a content-free input show
it. ``ig_logits`` subtracts it: logits - beta * log_softmax(prior_logits). The estimators of the
content-free input (``PRIORS``):

- ``empty-text``: the text embedding of the empty string, the text tower's "nothing" (default:
  needs no image at all, like the rest of textadapt).
- ``blank-image``: the image embedding of a uniform mid-grey image, the "no image" input.
- ``mean-image``: the normalised mean of the test images' embeddings (transductive: it uses the
  unlabelled test images, never their labels).
"""

from __future__ import annotations

import importlib.util
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The zero-shot baselines every run reports: name -> prompt templates ("{}" is the class name).
# "ensemble" takes the dataset spec's [zeroshot] templates, else open_clip's ImageNet ensemble.
BASELINES: dict[str, list[str] | None] = {
    "zero-shot:class-name": ["{}"],
    "zero-shot:a-photo-of": ["a photo of a {}."],
    "zero-shot:ensemble": None,
}


def open_clip_file(name: str) -> Path:
    """A file shipped inside the open_clip package, found without importing it: ``import open_clip`` costs ~4 s
    (torchvision, timm), and a run whose embeddings are all cached needs only its data."""
    return Path(next(iter(importlib.util.find_spec("open_clip").submodule_search_locations))) / name


def openclip_imagenet_templates() -> list[str]:
    """open_clip's ImageNet prompt ensemble, from ``open_clip/zero_shot_metadata.py`` (data only: it imports nothing)."""
    templates = runpy.run_path(str(open_clip_file("zero_shot_metadata.py")))["OPENAI_IMAGENET_TEMPLATES"]
    return [t("{}") if callable(t) else t for t in templates]


def class_prompts(class_names: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: class 0 with every template, then class 1, ..."""
    return [t.replace("{}", c) for c in class_names for t in templates]


def prototypes(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes*templates, D) class-major prompt embeddings -> (classes, D) normalised class weights."""
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)


SCORINGS = ("plain", "ig")  # plain logits, and information gain (``ig_logits``)
PRIORS = ("empty-text", "blank-image", "mean-image")


def predict(image_embeddings: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.argmax(image_embeddings @ weight.T, axis=1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ig_logits(logits: np.ndarray, prior_logits: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Information-gain scores: logits minus beta times the log prior the content-free input shows."""
    return logits - beta * log_softmax(prior_logits)


@dataclass
class Score:
    top1: float
    mean_per_class: float
    per_class: np.ndarray  # recall of each class; NaN where the class has no image
    n_per_class: np.ndarray
    top5: float | None = None  # only where there are more than 5 classes
    confusion: np.ndarray | None = None  # (classes, classes) counts: row = true class, column = predicted (summed over seeds)
    predictions: np.ndarray | None = None  # (images,) each test image's predicted class; None for a mean over seeds


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs."""
    return np.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def score(predictions: np.ndarray, labels: np.ndarray, n_classes: int, top5_hits: np.ndarray | None = None) -> Score:
    n = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[predictions == labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    top5 = float(top5_hits.mean()) if top5_hits is not None else None
    return Score(
        float((predictions == labels).mean()),
        float(np.nanmean(per_class)),
        per_class,
        n,
        top5,
        confusion_matrix(predictions, labels, n_classes),
        predictions,
    )


def score_logits(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> Score:
    """Top-1, top-5 (more than 5 classes), mean per-class recall of (images, classes) logits."""
    top5 = None
    if n_classes > 5:
        top = np.argpartition(-logits, 5, axis=1)[:, :5]
        top5 = (top == labels[:, None]).any(axis=1)
    return score(np.argmax(logits, axis=1), labels, n_classes, top5)


def mean_score(scores: list[Score]) -> Score:
    """The mean over seeds: top-1, top-5, mean per class, and each class's recall; the confusion counts summed."""
    first = scores[0]
    confusion = None if any(s.confusion is None for s in scores) else np.sum([s.confusion for s in scores], axis=0)
    return Score(
        float(np.mean([s.top1 for s in scores])),
        float(np.mean([s.mean_per_class for s in scores])),
        np.mean([s.per_class for s in scores], axis=0),
        first.n_per_class,
        None if first.top5 is None else float(np.mean([s.top5 for s in scores])),
        confusion,
    )


def best_baseline(scores: dict[str, Score], is_baseline: Callable[[str], bool]) -> str:
    """The zero-shot baseline with the highest top-1: what every adapted head is compared with."""
    return max((m for m in scores if is_baseline(m)), key=lambda m: scores[m].top1)
