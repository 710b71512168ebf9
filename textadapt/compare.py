"""``textadapt compare A B``: is B better than A on the same test images, and by how much for sure?

A side is a method of a stored run: ``RUN_ID:METHOD`` (e.g. ``fashion-mnist-20261129-101500-ab12:tap-head:targeted``),
or a bare ``RUN_ID`` for its best adapted method (or the method ``compare`` is given). Both sides must
have been scored on the same test images (the same image hashes and labels) and the same classes.
Everything comes from the cache (``run_images``, ``predictions``, ``class_results``): the runs may be
weeks apart, e.g. before and after a prompt template edit.

The differences are B minus A, with paired bootstrap intervals over the test images
(``textadapt.stats``), and McNemar's exact test on the images the two disagree on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from textadapt import TextadaptError, stats
from textadapt.store import Store


@dataclass
class Side:
    run_id: str
    method: str
    dataset: str
    untrained: bool  # the run's backbone has random weights: its accuracies mean nothing
    seeds: int  # predictions per image (one per seed)
    top1: float
    mean_per_class: float


@dataclass
class ClassDifference:
    index: int
    name: str
    images: int
    a: float  # recall of A on the class
    b: float
    difference: stats.Interval  # b - a, with its interval (the class's images resampled)


@dataclass
class Comparison:
    a: Side
    b: Side
    images: int
    top1: stats.Interval  # B's top-1 minus A's, with its interval
    mean_per_class: stats.Interval
    mcnemar: stats.McNemar  # only_a: images A got right and B wrong
    classes: list[ClassDifference]
    n_resamples: int
    level: float
    seed: int

    def to_dict(self) -> dict:
        """Plain JSON-ready data (accuracies and differences as fractions; NaN as None)."""
        return _no_nan(asdict(self))


def _no_nan(x):
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass
class _Scored:
    side: Side
    hashes: list[str]
    labels: np.ndarray
    classes: list[str]
    correct: np.ndarray  # (images,) share of seeds right


def _run(store: Store, run_id: str) -> tuple[str, bool]:
    rows = store.query(
        "SELECT r.dataset, coalesce(b.untrained, false) FROM runs r "
        "LEFT JOIN backbones b ON b.backbone = r.backbone WHERE r.run_id = ?",
        [run_id],
    )
    row = rows[0] if rows else None
    if row is None:
        raise TextadaptError(f"no run {run_id!r} in {store.path} (`textadapt runs` lists them)")
    return row


def resolve(store: Store, side: str, method: str | None = None) -> tuple[str, str]:
    """``RUN_ID`` or ``RUN_ID:METHOD`` -> (run id, method); a bare run id means ``method``, else its best adapted method."""
    run_id, _, named = side.partition(":")
    _run(store, run_id)
    methods = [m for (m,) in store.query("SELECT method FROM results WHERE run_id = ? ORDER BY method", [run_id])]
    wanted = named or method
    if wanted is None:
        best = store.query(
            "SELECT method FROM results WHERE run_id = ? AND kind = 'adapted' ORDER BY top1 DESC, method LIMIT 1", [run_id]
        )
        if not best:
            raise TextadaptError(
                f"run {run_id!r} has no scored adapted method; name one as {run_id}:METHOD"
                + (f" (its methods: {', '.join(methods)})" if methods else " (it has no scored method at all)")
            )
        return run_id, best[0][0]
    if wanted not in methods:
        raise TextadaptError(
            f"run {run_id!r} has no scored method {wanted!r}"
            + (f"; its methods: {', '.join(methods)}" if methods else " (it has no scored method at all)")
        )
    return run_id, wanted


def _load(store: Store, side: str, method: str | None) -> _Scored:
    run_id, method = resolve(store, side, method)
    dataset, untrained = _run(store, run_id)
    hashes, labels = store.run_images(run_id)
    predicted = store.predictions(run_id, method)
    if predicted is None or not hashes:
        raise TextadaptError(
            f"run {run_id!r} has no per-image predictions stored (it was scored before textadapt kept them): "
            "run it again to compare it"
        )
    classes = [
        c
        for (c,) in store.query(
            "SELECT class_name FROM class_results WHERE run_id = ? AND method = ? ORDER BY class_index", [run_id, method]
        )
    ]
    correct = stats.correctness(predicted, labels)
    recall = [correct[labels == k].mean() if (labels == k).any() else np.nan for k in range(len(classes))]
    side_ = Side(run_id, method, dataset, bool(untrained), predicted.shape[0], float(correct.mean()), float(np.nanmean(recall)))
    return _Scored(side_, hashes, labels, classes, correct)


def _same_images(a: _Scored, b: _Scored) -> None:
    """Put B's images in A's order, or refuse: the two must have scored the same labelled images."""
    name = lambda s: f"{s.side.run_id}:{s.side.method}"  # noqa: E731
    if a.classes != b.classes:
        diff = next((i for i, (x, y) in enumerate(zip(a.classes, b.classes)) if x != y), min(len(a.classes), len(b.classes)))
        raise TextadaptError(
            f"A ({name(a)}) and B ({name(b)}) have different classes ({len(a.classes)} and {len(b.classes)}; "
            f"the first difference is class {diff}): compare runs of the same dataset and --max-classes"
        )
    if a.hashes == b.hashes and np.array_equal(a.labels, b.labels):
        return
    key_a, key_b = sorted(zip(a.hashes, a.labels.tolist())), sorted(zip(b.hashes, b.labels.tolist()))
    if key_a != key_b:
        only_a = len(set(a.hashes) - set(b.hashes))
        only_b = len(set(b.hashes) - set(a.hashes))
        what = (
            f"{only_a} of A's images are not among B's and {only_b} of B's not among A's"
            if only_a or only_b
            else "the same images carry different labels"
        )
        raise TextadaptError(
            f"A ({name(a)}) and B ({name(b)}) were scored on different test images ({len(a.hashes)} and "
            f"{len(b.hashes)}; {what}): compare runs with the same --max-images and --max-classes"
        )
    # the same labelled images in another order (the order of a folder listing, say): align B on A
    order_a = sorted(range(len(a.hashes)), key=lambda i: (a.hashes[i], int(a.labels[i])))
    order_b = sorted(range(len(b.hashes)), key=lambda i: (b.hashes[i], int(b.labels[i])))
    aligned = np.empty(len(order_a), dtype=np.int64)
    aligned[order_a] = order_b
    b.hashes, b.labels, b.correct = a.hashes, a.labels, b.correct[aligned]


def compare(
    store: Store,
    a: str,
    b: str,
    method: str | None = None,
    n_resamples: int = stats.N_RESAMPLES,
    level: float = stats.LEVEL,
    seed: int = stats.SEED,
) -> Comparison:
    """B minus A (each ``RUN_ID`` or ``RUN_ID:METHOD``; ``method`` for a bare run id), overall and per class."""
    first, second = _load(store, a, method), _load(store, b, method)
    _same_images(first, second)
    labels, n_classes = first.labels, len(first.classes)
    d = stats.differences(second.correct[None], first.correct, labels, n_classes, ["B"], "A", n_resamples, level, seed)
    # McNemar needs right or wrong: with several seeds, right if at least half the seeds were
    test = stats.mcnemar(first.correct >= 0.5, second.correct >= 0.5)
    classes = []
    for k, name in enumerate(first.classes):
        mask = labels == k
        recall = lambda c: float(c[mask].mean()) if mask.any() else float("nan")  # noqa: E731, B023 (used in this iteration)
        classes.append(
            ClassDifference(k, name, int(mask.sum()), recall(first.correct), recall(second.correct), d.class_interval("B", k))
        )
    return Comparison(
        first.side,
        second.side,
        len(labels),
        d.top1_interval("B"),
        d.mean_per_class_interval("B"),
        test,
        classes,
        n_resamples,
        level,
        seed,
    )
