"""4. Encoders: text and image embedding throughput of textadapt (encoders.encode_texts / encode_images,
through the DuckDB cache, every item a miss) vs a bare open_clip loop, ViT-B-32 (untrained weights
cost the same as trained ones).

The bare loop is what a user would write: ``create_model_and_transforms('ViT-B-32')``, the tokenizer,
``encode_text`` / ``encode_image`` under ``torch.no_grad()``, then L2-normalise. First the bare loop
is swept over a few batch sizes; then both are compared at its best batch size, alternating, with a
fresh DuckDB file for textadapt each repetition. Same texts (unique sentences), same images (the
first Fashion-MNIST test images through the same preprocessing). Goal: textadapt / bare <= 1.05.

    .venv/bin/python benchmarks/encoders.py [--texts 64] [--images 32] [--threads N] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import _common

NAME = "encoders"
ARCH = "ViT-B-32"


def texts(n: int) -> list[str]:
    """``n`` distinct description-like sentences (no two share a cache key)."""
    kinds = ["shirt", "sneaker", "ankle boot", "trouser", "pullover", "dress", "coat", "sandal", "bag", "T-shirt"]
    looks = ["a soft cotton", "a worn leather", "a bright striped", "a plain dark", "a loose knitted", "a slim denim"]
    return [f"{looks[i % len(looks)]} {kinds[(i // len(looks)) % len(kinds)]} photographed on a plain background, item {i}."
            for i in range(n)]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    _common.add_device(p)
    p.add_argument("--texts", type=int, default=64)
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
    print(f"{len(sentences)} texts, {len(images)} images ({images.source}), {ARCH} untrained, device {args.device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    # The bare side: open_clip as its README shows it.
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    model = model.to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(ARCH)

    def bare_texts(batch: int, limit: int | None = None) -> float:
        t0 = time.perf_counter()
        out = []
        with torch.no_grad(), amp():
            for i in range(0, limit or len(sentences), batch):
                f = model.encode_text(tokenizer(sentences[i : i + batch]).to(args.device))
                out.append((f / f.norm(dim=-1, keepdim=True)).float().cpu().numpy())
        sync()
        return time.perf_counter() - t0

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

    # textadapt's side: its own backbone loader and cached encoders, a fresh cache file every time.
    backbone = load_backbone(f"{ARCH}:random", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    counter = [0]

    def fresh_store() -> Store:
        counter[0] += 1
        return Store(tmp / f"cache-{counter[0]}.duckdb")

    def ta_texts(batch: int) -> float:
        with fresh_store() as store:
            t0 = time.perf_counter()
            with amp():
                _, n = encode_texts(backbone, sentences, store, batch)
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

    figures, rows = {}, []
    for kind, bare, ta, batches, n in (("text", bare_texts, ta_texts, args.text_batches, len(sentences)),
                                       ("image", bare_images, ta_images, args.image_batches, len(images))):
        sweep = {}
        bare(8, 8)  # warm-up: one small batch
        for b in (int(x) for x in batches.split(",")):
            if b > n:
                continue
            sweep[b] = bare(b)
            print(f"  bare {kind} loop, batch {b}: {n / sweep[b]:.1f} {kind}s/s", flush=True)
        best = min(sweep, key=sweep.get)
        print(f"{kind}: comparing at batch size {best}", flush=True)
        r = _common.alternate(lambda: ta(best), lambda: bare(best), repeats, "textadapt", "bare")
        r.update({"items": n, "best_batch": best, "bare_sweep_items_per_s": {str(b): n / s for b, s in sweep.items()},
                  "textadapt_items_per_s": n / r["textadapt_median_s"], "bare_items_per_s": n / r["bare_median_s"],
                  "goal_met": r["ratio_median"] <= 1.05, "goal_met_cpu": r["cpu_ratio_median"] <= 1.05})
        figures[kind] = r
        rows.append([kind, n, best, f"{r['textadapt_items_per_s']:.1f}", f"{r['bare_items_per_s']:.1f}", f"{r['ratio_median']:.3f}",
                     f"{r['cpu_ratio_median']:.3f}", "met" if r["goal_met_cpu"] else "MISSED"])
    print()
    print(_common.table(["encoder", "items", "batch", "textadapt items/s", "bare items/s", "wall ratio textadapt/bare (median)",
                         "CPU ratio (median)", "goal <= 1.05 (CPU)"], rows))
    _common.write_results(NAME, {"arch": ARCH, "weights": "random (same cost as trained)", "texts": len(sentences),
                                 "images": len(images), "repeats": repeats, "device": args.device,
                                 "mixed_precision": "fp16 autocast" if cuda else "none (fp32)",
                                 "torch_threads": torch.get_num_threads()},
                          {**figures, "goal": "textadapt / bare <= 1.05"},
                          ["textadapt's time includes hashing every item, the cache lookup (all misses) and writing each batch to DuckDB"],
                          args.out)


if __name__ == "__main__":
    main()
