"""4. Encoders: text and image embedding throughput of textadapt (encoders.encode_texts / encode_images,
through the DuckDB cache, every item a miss) vs a bare open_clip loop, ViT-B-32 (untrained weights
cost the same as trained ones).

The bare loop is what a user would write: ``create_model_and_transforms('ViT-B-32')`` (given the same
weights as textadapt's backbone), the tokenizer, ``encode_text`` / ``encode_image`` under
``torch.no_grad()``, then L2-normalise. First the bare loop is swept over a few batch sizes; then both
are compared at its best batch size, alternating, with a fresh DuckDB file for textadapt each
repetition. Texts: distinct CuPL descriptions of ImageNet classes (``cupl_prompts.json`` from the
clip-benchmark package), drawn at random with a fixed seed; images: the first Fashion-MNIST test images
through the same preprocessing. textadapt encodes text length-aware (``textadapt.text_tower``: sorted
by token length, each batch cut to its longest end-of-text token); the bare loop pads every text to 77
tokens, as open_clip does. Goals: text at least 2.5 times faster than the bare loop, with the same
embeddings (max difference reported); image textadapt / bare <= 1.05.

    .venv/bin/python benchmarks/encoders.py [--texts 256] [--images 32] [--threads N] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

import _common

NAME = "encoders"
ARCH = "ViT-B-32"


TEXT_GOAL = 2.5  # textadapt at least this many times faster than the bare loop on texts (CPU time)
IMAGE_GOAL = 1.05  # textadapt / bare on images


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct CuPL descriptions (GPT-3, ImageNet classes), drawn at random (no two share a cache key)."""
    path = Path(importlib.util.find_spec("clip_benchmark").submodule_search_locations[0]) / "datasets" / "cupl_prompts.json"
    every = sorted({d for descriptions in json.loads(path.read_text())["imagenet1k"].values() for d in descriptions})
    return random.Random(seed).sample(every, n)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    _common.add_device(p)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--text-batches", default="16,32,64", help="batch sizes swept for the bare text loop")
    p.add_argument("--image-batches", default="8,16,32", help="batch sizes swept for the bare image loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    args = p.parse_args()
    repeats = args.repeats or 3

    import numpy as np
    import open_clip
    import torch

    from textadapt.config import Settings
    from textadapt.datasets import ImageSet, find_spec, load_test_images
    from textadapt.encoders import encode_images, encode_texts, load_backbone
    from textadapt.store import Store
    from textadapt.text_tower import causal_tower

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else contextlib.nullcontext

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    settings = Settings()
    all_images = load_test_images(find_spec("fashion-mnist", settings.dataset_search_path), settings.home)
    images = ImageSet(all_images.images[: args.images], all_images.labels[: args.images], all_images.source)
    sentences = texts(args.texts)
    print(
        f"{len(sentences)} texts, {len(images)} images ({images.source}), {ARCH} untrained, device {args.device}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    # textadapt's side: its own backbone loader and cached encoders, a fresh cache file every time.
    backbone = load_backbone(f"{ARCH}:random", args.device)

    # The bare side: open_clip as its README shows it, with the same weights (so the outputs can be compared).
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    model.load_state_dict(backbone.model.state_dict())
    model = model.to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(ARCH)
    last: dict[str, np.ndarray] = {}  # each side's embeddings from its latest full run

    def bare_texts(batch: int, limit: int | None = None) -> float:
        t0 = time.perf_counter()
        out = []
        with torch.no_grad(), amp():
            for i in range(0, limit or len(sentences), batch):
                f = model.encode_text(tokenizer(sentences[i : i + batch]).to(args.device))
                out.append((f / f.norm(dim=-1, keepdim=True)).float().cpu().numpy())
        sync()
        seconds = time.perf_counter() - t0
        if limit is None:
            last["bare"] = np.concatenate(out)
        return seconds

    def bare_images(batch: int, limit: int | None = None) -> float:
        t0 = time.perf_counter()
        out = []
        with torch.no_grad(), amp():
            for i in range(0, limit or len(images), batch):
                x = torch.stack([preprocess(images.pil(j)) for j in range(i, min(i + batch, len(images)))]).to(args.device)
                f = model.encode_image(x)
                out.append((f / f.norm(dim=-1, keepdim=True)).float().cpu().numpy())
        sync()
        return time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    counter = [0]

    def fresh_store() -> Store:
        counter[0] += 1
        return Store(tmp / f"cache-{counter[0]}.duckdb")

    def ta_texts(batch: int) -> float:
        with fresh_store() as store:
            t0 = time.perf_counter()
            with amp():
                last["textadapt"], n = encode_texts(backbone, sentences, store, batch)
            sync()
            seconds = time.perf_counter() - t0
        assert n == len(sentences)
        return seconds

    def ta_images(batch: int) -> float:
        with fresh_store() as store:
            t0 = time.perf_counter()
            with amp():
                _, n = encode_images(backbone, images, store, batch)
            sync()
            seconds = time.perf_counter() - t0
        assert n == len(images)
        return seconds

    def text_figures(batch: int) -> dict:
        """Token lengths, positions each side runs, and how far textadapt's embeddings are from the bare loop's."""
        tokens = tokenizer(sentences)
        lengths = (tokens.argmax(-1) + 1).numpy()  # start and end of text included
        needed = causal_tower(backbone.model).lengths(tokens).sort(descending=True).values.numpy()
        run = sum(int(needed[i : i + batch].max()) * len(needed[i : i + batch]) for i in range(0, len(needed), batch))
        return {
            "tokens_mean": float(lengths.mean()),
            "tokens_median": float(np.median(lengths)),
            "tokens_max": int(lengths.max()),
            "context_length": int(tokens.shape[1]),
            "positions_run_per_text": run / len(needed),
            "max_abs_difference": float(np.abs(last["textadapt"] - last["bare"]).max()),
        }

    figures, rows = {}, []
    for kind, bare, ta, batches, n in (
        ("text", bare_texts, ta_texts, args.text_batches, len(sentences)),
        ("image", bare_images, ta_images, args.image_batches, len(images)),
    ):
        sweep = {}
        bare(8, 8)  # warm-up: one small batch
        for b in (int(x) for x in batches.split(",")):
            if b > n:
                continue
            sweep[b] = bare(b)
            print(f"  bare {kind} loop, batch {b}: {n / sweep[b]:.1f} {kind}s/s", flush=True)
        best = min(sweep, key=sweep.get)
        print(f"{kind}: comparing at batch size {best}", flush=True)
        r = _common.alternate(lambda: ta(best), lambda: bare(best), repeats, "textadapt", "bare")  # noqa: B023
        r.update(
            {
                "items": n,
                "best_batch": best,
                "bare_sweep_items_per_s": {str(b): n / s for b, s in sweep.items()},
                "textadapt_items_per_s": n / r["textadapt_median_s"],
                "bare_items_per_s": n / r["bare_median_s"],
                "speedup_median": 1 / r["ratio_median"],
                "speedup_cpu_median": 1 / r["cpu_ratio_median"],
            }
        )
        if kind == "text":
            r.update(text_figures(best))
            r.update(
                {
                    "goal": f"textadapt at least {TEXT_GOAL} times faster (CPU time), same embeddings",
                    "goal_met": r["speedup_median"] >= TEXT_GOAL,
                    "goal_met_cpu": r["speedup_cpu_median"] >= TEXT_GOAL,
                }
            )
            goal = f"speed-up >= {TEXT_GOAL}"
        else:
            r.update(
                {
                    "goal": f"textadapt / bare <= {IMAGE_GOAL}",
                    "goal_met": r["ratio_median"] <= IMAGE_GOAL,
                    "goal_met_cpu": r["cpu_ratio_median"] <= IMAGE_GOAL,
                }
            )
            goal = f"ratio <= {IMAGE_GOAL}"
        figures[kind] = r
        rows.append(
            [
                kind,
                n,
                best,
                f"{r['textadapt_items_per_s']:.1f}",
                f"{r['bare_items_per_s']:.1f}",
                f"{r['ratio_median']:.3f}",
                f"{r['cpu_ratio_median']:.3f}",
                f"{r['speedup_cpu_median']:.2f}",
                goal,
                "met" if r["goal_met_cpu"] else "MISSED",
            ]
        )
    print()
    print(
        _common.table(
            [
                "encoder",
                "items",
                "batch",
                "textadapt items/s",
                "bare items/s",
                "wall ratio textadapt/bare (median)",
                "CPU ratio (median)",
                "speed-up (CPU)",
                "goal (CPU time)",
                "",
            ],
            rows,
        )
    )
    t = figures["text"]
    print(
        f"\ntext: {t['tokens_mean']:.1f} tokens per description on average (median {t['tokens_median']:.0f}, "
        f"max {t['tokens_max']}); textadapt ran {t['positions_run_per_text']:.1f} positions per text, the bare loop "
        f"{t['context_length']}; max |textadapt - bare| over all embeddings {t['max_abs_difference']:.2e}"
    )
    print(f"load average at start {_common.LOAD_AT_START}, now {[round(x, 2) for x in os.getloadavg()]}")
    _common.write_results(
        NAME,
        {
            "arch": ARCH,
            "weights": "random (same cost as trained)",
            "texts": len(sentences),
            "images": len(images),
            "repeats": repeats,
            "device": args.device,
            "mixed_precision": "fp16 autocast" if cuda else "none (fp32)",
            "torch_threads": torch.get_num_threads(),
        },
        figures,
        [
            "textadapt's time includes hashing every item, the cache lookup (all misses) and writing each batch to DuckDB",
            "texts: distinct CuPL ImageNet descriptions (clip-benchmark's cupl_prompts.json), random sample, seed 0",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
