"""The report's figures, drawn with matplotlib's Agg renderer and returned as PNG bytes.

Every function builds its own ``Figure`` (no pyplot, so no global figure state and no GUI backend)
and takes plain arrays, so any method a run scores can be drawn without a change here.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 90
MAX_CLASSES_SHOWN = 40  # above this, the per-class chart keeps the classes that move most
LABELLED_CONFUSION = 30  # above this, the confusion matrix has no class names on its axes
ANNOTATED_CONFUSION = 12  # up to this, every cell shows its count


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def shown_classes(accuracy: dict[str, np.ndarray], reference: str, limit: int = MAX_CLASSES_SHOWN) -> np.ndarray:
    """Indices of the classes to draw: all of them, or beyond ``limit`` the half with the largest gains
    and the half with the largest losses of any method against ``reference``."""
    n = len(accuracy[reference])
    if n <= limit:
        return np.arange(n)
    others = [m for m in accuracy if m != reference] or [reference]
    deltas = np.nan_to_num(np.stack([accuracy[m] - accuracy[reference] for m in others]), nan=0.0)
    gain, loss = deltas.max(axis=0), deltas.min(axis=0)
    top = np.argsort(-gain, kind="stable")[: limit // 2]
    taken = set(top.tolist())
    bottom = [i for i in np.argsort(loss, kind="stable") if i not in taken][: limit - len(top)]
    return np.sort(np.concatenate([top, np.asarray(bottom, dtype=int)]))


def per_class_accuracy(classes: list[str], accuracy: dict[str, np.ndarray], reference: str) -> bytes:
    """Grouped bars: each class's accuracy (%) under every method in ``accuracy`` (reference first)."""
    methods = [reference, *[m for m in accuracy if m != reference]]
    idx = shown_classes(accuracy, reference)
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 0.25 * len(idx) * len(methods) + 2), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(idx))
    for k, m in enumerate(methods):
        values = 100 * np.nan_to_num(accuracy[m][idx], nan=0.0)
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, values, width, label=f"{m} (reference)" if m == reference else m)
    ax.set_xticks(x, [_short(classes[i]) for i in idx], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    title = "Accuracy per class"
    if len(idx) < len(classes):
        title += f" ({len(idx)} of {len(classes)} classes: the largest gains and losses against {reference})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def gains(methods: list[str], delta: np.ndarray, low: np.ndarray, high: np.ndarray, reference: str) -> bytes:
    """Each method's gain over ``reference`` (points) as a dot with its confidence interval as a bar, a line at 0;
    green where the interval lies above 0, red below, grey where it holds 0."""
    fig = Figure(figsize=(7.0, 0.3 * len(methods) + 1.4))
    ax = fig.add_subplot()
    y = np.arange(len(methods))
    colours = np.where(low > 0, "#1a7f37", np.where(high < 0, "#c62828", "#777777"))
    for i in range(len(methods)):
        ax.errorbar(delta[i], y[i], xerr=[[delta[i] - low[i]], [high[i] - delta[i]]], fmt="o", color=colours[i], capsize=3, ms=4)
    ax.axvline(0, color="#222222", lw=0.8)
    ax.set_yticks(y, [_short(m, 36) for m in methods], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"top-1 minus {_short(reference, 36)} (points)")
    ax.set_title("Gain over the best training-free baseline, with 95% intervals", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def confusion(classes: list[str], matrix: np.ndarray, title: str) -> bytes:
    """Heat map of a (true, predicted) count matrix, coloured by the share of each true class's images."""
    n = len(classes)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(12.0, max(4.0, 0.45 * n + 2))
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
    if n <= LABELLED_CONFUSION:
        names = [_short(c, 20) for c in classes]
        ax.set_xticks(np.arange(n), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(np.arange(n), names, fontsize=8)
    if n <= ANNOTATED_CONFUSION:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def stage_seconds(stages: dict[str, float]) -> bytes:
    """Horizontal bars: wall-clock seconds of each stage of the run, in run order."""
    names = list(stages)
    fig = Figure(figsize=(6.0, 0.35 * len(names) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, [stages[s] for s in names], color="#4c72b0")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
