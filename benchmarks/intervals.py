"""What the error bars cost at ImageNet scale: ``harness.gains`` (a paired bootstrap of every method's
gain, overall and per class) and ``Store.save_predictions`` against the scoring they follow.

    .venv/bin/python benchmarks/intervals.py [--images 50000 --classes 1000 --free 10 --adapted 20 --seeds 3]

Synthetic embeddings shaped like ImageNet's validation set under ViT-B-32 (50,000 images, 1000
classes, dim 512) and, like a run with ``--methods all``, 10 training-free methods (one classifier
each) and 20 adapted ones (3 seeds each). The anchor is ``harness.evaluate``, the scoring stage the
intervals follow (one (images x dim) @ (dim x classes) product, argmax and top-5 per classifier), run
alternately with ``harness.gains`` in the same process; the figure is their CPU-time ratio. Writing
every prediction (``Store.save_predictions``, a fresh DuckDB file) is timed too.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_device, alternate, parser, table, write_results

from textadapt import harness
from textadapt.store import Store


def world(images: int, classes: int, dim: int, free: int, adapted: int, seeds: int):
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.arange(images) % classes
    emb = prototypes[labels] + 2.5 * rng.normal(size=(images, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def weights(n: int) -> list[np.ndarray]:  # a classifier near the prototypes, at CLIP's logit scale
        return [100 * (prototypes + rng.normal(size=prototypes.shape).astype(np.float32)) for _ in range(n)]

    classifiers = [harness.Classifier(f"free-{i}", "zero-shot", weights(1), [0]) for i in range(free)]
    classifiers += [harness.Classifier(f"adapted-{i}:set", "adapted", weights(seeds), list(range(seeds))) for i in range(adapted)]
    return emb, labels, classifiers


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--free", type=int, default=10, help="training-free methods (one classifier each)")
    p.add_argument("--adapted", type=int, default=20, help="adapted methods (--seeds classifiers each)")
    p.add_argument("--seeds", type=int, default=3)
    add_device(p)  # accepted with the other benchmarks' flags (make bench BENCH_ARGS=...); everything here is numpy on the CPU
    args = p.parse_args()
    repeats = args.repeats or 3
    emb, labels, classifiers = world(args.images, args.classes, args.dim, args.free, args.adapted, args.seeds)
    results: list = []

    def scoring() -> float:
        t0 = time.perf_counter()
        results[:] = harness.evaluate(classifiers, emb, labels, args.classes, ["plain"], None)
        return time.perf_counter() - t0

    def intervals() -> float:
        t0 = time.perf_counter()
        harness.gains(results, labels, args.classes)
        return time.perf_counter() - t0

    scoring()  # the results the intervals are computed from
    figures = alternate(intervals, scoring, repeats, "intervals", "scoring")
    hashes = [f"{i:064x}" for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.duckdb") as store:
        t0, c0 = time.perf_counter(), time.process_time()
        store.save_predictions("bench", hashes, labels, {r.method: r.predicted for r in results})
        figures["save_predictions_s"], figures["save_predictions_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        figures["prediction_rows"] = store.sql("SELECT count(*) FROM predictions")[1][0][0]
    methods = args.free + args.adapted
    print(
        table(
            ["", "median seconds (wall)", "median CPU seconds"],
            [
                [
                    "harness.gains (1000 resamples: top-1, per class, mean per class)",
                    figures["intervals_median_s"],
                    float(np.median(figures["intervals_cpu_seconds"])),
                ],
                ["harness.evaluate (the anchor)", figures["scoring_median_s"], float(np.median(figures["scoring_cpu_seconds"]))],
                [
                    f"Store.save_predictions ({figures['prediction_rows']:,} rows)",
                    figures["save_predictions_s"],
                    figures["save_predictions_cpu_s"],
                ],
            ],
        )
    )
    print(f"intervals / scoring: CPU {figures['cpu_ratio_median']:.3f}, wall {figures['ratio_median']:.3f}")
    write_results(
        "intervals",
        {
            "images": args.images,
            "classes": args.classes,
            "dim": args.dim,
            "methods": methods,
            "free": args.free,
            "adapted": args.adapted,
            "seeds": args.seeds,
            "repeats": repeats,
            "resamples": 1000,
        },
        figures,
        ["CPU time: this process, all threads; wall time also counts waiting for a core on a shared machine."],
        args.out,
    )


if __name__ == "__main__":
    main()
