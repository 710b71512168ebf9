"""Classifiers on image embeddings, and how they are measured.

Every classifier here is a (classes, dim) weight matrix W: the predicted class of an
L2-normalised image embedding v is argmax(W v). Zero-shot CLIP's W holds the normalised class
prompt embeddings (the mean of the normalised embeddings of a prompt ensemble, renormalised);
an adapted head's W is learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# The zero-shot baselines every run reports: name -> prompt templates ("{}" is the class name).
# "ensemble" takes the dataset spec's [zeroshot] templates, else open_clip's ImageNet ensemble.
BASELINES: dict[str, list[str] | None] = {
    "zero-shot:class-name": ["{}"],
    "zero-shot:a-photo-of": ["a photo of a {}."],
    "zero-shot:ensemble": None,
}


def openclip_imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES]


def class_prompts(class_names: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: class 0 with every template, then class 1, ..."""
    return [t.replace("{}", c) for c in class_names for t in templates]


def prototypes(prompt_embeddings: np.ndarray, n_classes: int) -> np.ndarray:
    """(classes*templates, D) class-major prompt embeddings -> (classes, D) normalised class weights."""
    per_class = prompt_embeddings.reshape(n_classes, -1, prompt_embeddings.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)


def predict(image_embeddings: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.argmax(image_embeddings @ weight.T, axis=1)


@dataclass
class Score:
    top1: float
    mean_per_class: float
    per_class: np.ndarray  # recall of each class; NaN where the class has no image
    n_per_class: np.ndarray


def score(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> Score:
    n = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[predictions == labels], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    return Score(float((predictions == labels).mean()), float(np.nanmean(per_class)), per_class, n)


def best_baseline(scores: dict[str, Score], is_baseline: Callable[[str], bool]) -> str:
    """The zero-shot baseline with the highest top-1: what every adapted head is compared with."""
    return max((m for m in scores if is_baseline(m)), key=lambda m: scores[m].top1)
