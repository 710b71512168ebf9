"""How sure a difference in accuracy is: paired bootstrap intervals and McNemar's exact test.

Everything here works on per-image correctness: ``correct[i]`` is 1 if a method classified test
image i right and 0 if not, or, for a method trained with several seeds, the share of its seeds
that got it right (their mean is the accuracy the report gives). Two methods scored on the same
images are *paired*: an image that is hard for one is usually hard for the other, so their
difference is far more certain than either accuracy alone, and every interval here keeps the pairs.

- ``differences``: one or many methods against a reference. The top-1 difference's interval comes
  from resampling the test images with replacement (the same resample for every method) and
  recomputing each difference on it; each class's difference from resampling that class's images
  (its image count stays fixed), and the mean per-class difference from those per-class resamples.
  Intervals are the percentile intervals of the resampled differences.
- ``paired_bootstrap``: the same for one pair, the top-1 difference only.
- ``mcnemar``: McNemar's exact test (a two-sided binomial test on the discordant images).

Seeded and deterministic: the same inputs and seed give the same intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
_CHUNK_CELLS = 5_000_000  # resampled images drawn at once (a resamples x images count matrix of this many cells)


@dataclass(frozen=True)
class Interval:
    """An observed difference and its confidence interval (accuracy as a fraction: 0.012 is 1.2 points)."""

    value: float
    low: float
    high: float

    @property
    def sign(self) -> int:
        """+1 if the whole interval is above 0, -1 if it is below, 0 if it holds 0 (or is undefined)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


@dataclass
class Differences:
    """``methods``' accuracy minus ``reference``'s, with intervals; arrays are indexed [method] or [method, class]."""

    methods: list[str]
    reference: str
    top1: np.ndarray  # (M,) top-1 difference
    top1_low: np.ndarray
    top1_high: np.ndarray
    mean_per_class: np.ndarray  # (M,) mean per-class recall difference
    mean_per_class_low: np.ndarray
    mean_per_class_high: np.ndarray
    per_class: np.ndarray  # (M, K) each class's recall difference; NaN for a class with no image
    per_class_low: np.ndarray
    per_class_high: np.ndarray
    n_resamples: int
    level: float
    seed: int

    def _at(self, method: str) -> int:
        return self.methods.index(method)

    def top1_interval(self, method: str) -> Interval:
        m = self._at(method)
        return Interval(float(self.top1[m]), float(self.top1_low[m]), float(self.top1_high[m]))

    def mean_per_class_interval(self, method: str) -> Interval:
        m = self._at(method)
        return Interval(float(self.mean_per_class[m]), float(self.mean_per_class_low[m]), float(self.mean_per_class_high[m]))

    def class_interval(self, method: str, k: int) -> Interval:
        m = self._at(method)
        return Interval(float(self.per_class[m, k]), float(self.per_class_low[m, k]), float(self.per_class_high[m, k]))


def correctness(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(seeds, images) or (images,) predicted classes -> each image's share of seeds that got it right."""
    predicted = np.asarray(predicted)
    return (predicted.reshape(-1, len(labels)) == labels).mean(axis=0)


def _bounds(samples: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of ``samples`` along ``axis`` (numpy's default "linear" quantiles).

    Partial sorts around the four order statistics needed: np.quantile sorts everything, ten times slower here.
    """
    n = samples.shape[axis]
    tail = (1 - level) / 2
    positions = [tail * (n - 1), (1 - tail) * (n - 1)]
    kth = sorted({min(int(p) + d, n - 1) for p in positions for d in (0, 1)})
    part = np.partition(samples, kth, axis=axis)
    out = []
    for p in positions:
        lo, frac = int(p), p - int(p)
        below = np.take(part, lo, axis=axis)
        above = np.take(part, min(lo + 1, n - 1), axis=axis)
        out.append(below + frac * (above - below))
    return out[0], out[1]


def _resampled_sums(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(groups, n_resamples, M): the sums of ``values`` (groups, images, M) over resamples of each group's images
    drawn with replacement, each group on its own.

    A resample is a count per image (how often it was drawn), so its sums are one matrix product.
    """
    g, n, m = values.shape
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // max(g * n, 1)))
    out = np.empty((g, n_resamples, m), np.float64)
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        drawn = rng.integers(0, n, size=(b * g, n))
        drawn += (np.arange(b * g) * n)[:, None]  # row r's draws count in its own slots of one bincount
        counts = np.bincount(drawn.ravel(), minlength=b * g * n).reshape(b, g, n).astype(values.dtype)
        if g == 1:  # one large product: BLAS
            out[0, start : start + b] = counts[:, 0] @ values[0]
        else:  # many small ones: einsum's own loop (BLAS threads on small products stall on a busy machine)
            out[:, start : start + b] = np.einsum("bgn,gnm->gbm", counts, values)
    return out


def differences(
    correct: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    methods: list[str],
    reference_name: str,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Differences:
    """Every method's accuracy minus the reference's on the same images, with paired bootstrap intervals.

    ``correct``: (methods, images) correctness; ``reference``: (images,); ``labels``: (images,) true
    classes in 0..n_classes-1. Top-1: resample all images; per class: resample each class's images.
    """
    correct = np.atleast_2d(np.asarray(correct, np.float64))
    diff = (correct - np.asarray(reference, np.float64)[None, :]).T  # (images, M): paired differences
    labels = np.asarray(labels)
    n, m = diff.shape
    top_rng, class_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    # float32 products are faster, and their rounding stays far below one image up to millions of images
    dtype = np.float32 if n < 2**21 else np.float64

    top1 = diff.mean(axis=0)
    top1_low, top1_high = _bounds(_resampled_sums(diff[None].astype(dtype), n_resamples, top_rng)[0] / n, level)

    # Per class: the classes of one size are resampled together (one size for a balanced test set like ImageNet's).
    per_class = np.full((m, n_classes), np.nan)
    per_class_low, per_class_high = per_class.copy(), per_class.copy()
    class_means = np.zeros((n_resamples, m))
    sizes = np.bincount(labels, minlength=n_classes)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    batch = max(1, _CHUNK_CELLS // (n_resamples * m))  # classes at once: bounds the (classes, resamples, M) sums
    for size in np.unique(sizes[sizes > 0]):
        same = np.flatnonzero(sizes == size)
        for classes in np.array_split(same, -(-len(same) // batch)):
            rows = diff[order[starts[classes][:, None] + np.arange(size)]]  # (classes, size, M)
            resampled = _resampled_sums(rows.astype(dtype), n_resamples, class_rng) / size  # (classes, resamples, M)
            per_class[:, classes] = rows.mean(axis=1).T
            low, high = _bounds(resampled, level, axis=1)
            per_class_low[:, classes], per_class_high[:, classes] = low.T, high.T
            class_means += resampled.sum(axis=0)
    present = int((sizes > 0).sum())
    with np.errstate(invalid="ignore"):
        mean_per_class = per_class[:, sizes > 0].mean(axis=1) if present else np.full(m, np.nan)
        mpc_low, mpc_high = _bounds(class_means / present, level) if present else (np.full(m, np.nan),) * 2
    return Differences(
        list(methods),
        reference_name,
        top1,
        top1_low,
        top1_high,
        mean_per_class,
        mpc_low,
        mpc_high,
        per_class,
        per_class_low,
        per_class_high,
        n_resamples,
        level,
        seed,
    )


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> Interval:
    """Top-1 of ``a`` minus top-1 of ``b`` (per-image correctness of two methods on the same images), with its interval."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64))[None, :, None]
    sums = _resampled_sums(diff, n_resamples, np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0]))
    low, high = _bounds(sums[0, :, 0] / diff.shape[1], level)
    return Interval(float(diff.mean()), float(low), float(high))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two classifiers on the same images: only the images they disagree on count."""

    only_a: int  # images A got right and B wrong
    only_b: int  # images B got right and A wrong
    p_value: float  # two-sided: how often a split at least this uneven comes from two equally good classifiers


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> McNemar:
    """McNemar's exact test on (images,) booleans: a two-sided binomial test of only_a against only_a + only_b at 1/2."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    only_a, only_b = int((a_right & ~b_right).sum()), int((b_right & ~a_right).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n can be tens of thousands)
    j = np.arange(1, k + 1)
    log_pmf = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))]) - n * math.log(2)  # log C(n, i) / 2**n
    top = log_pmf.max()
    tail = math.exp(top) * float(np.exp(log_pmf - top).sum())
    return McNemar(only_a, only_b, min(1.0, 2 * tail))
