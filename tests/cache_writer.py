"""A writer for the cache-concurrency tests, run as its own process: what a run writes, in the same shape and order,
without the models. ``python cache_writer.py CACHE BATCHES [--pace S] [--fold-every K] [--fold-bytes N] [--run RUN_ID]``

Batch b stores 4 generations (keys b-0 .. b-3), links them to the run, and records llm_calls = 4 (b + 1) on the run's
row (a row a later batch replaces); every 5th batch also stores 16 text embeddings. Then a result and a classifier,
and the run finishes. The same arguments always write the same rows, so a run watched by readers, killed, or
resumed can be compared with one that was not. Prints ``batch N`` after batch N is stored, and ``closing`` before
the final fold.
"""

import argparse
import time

import numpy as np

from textadapt import store as store_module
from textadapt.store import Generation, Store


def generations(b: int, run_id: str) -> list[Generation]:
    return [
        Generation(
            f"{b:05d}-{i}",
            "demo",
            f"class {b % 7}",
            f"targeted/q{b % 5}",
            "h1",
            "llm",
            f"prompt {b}",
            {"t": 0.9},
            i,
            f"raw {b} {i}",
            f"a description of batch {b}, sample {i}",
            None,
            20 + i,
            10 + b % 3,
            0.25,
            run_id=run_id,
        )
        for i in range(4)
    ]


def embeddings(b: int) -> np.ndarray:
    return np.random.default_rng(b).normal(size=(16, 32)).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("batches", type=int)
    p.add_argument("--pace", type=float, default=0.0, help="seconds between batches (an LLM's answer time)")
    p.add_argument("--fold-every", type=int, default=0, help="also try to fold every K batches")
    p.add_argument("--run", default="demo-run")
    p.add_argument("--fold-bytes", type=int, default=0, help="fold steps this small (many steps, readers coming in between)")
    args = p.parse_args()
    if args.fold_bytes:
        store_module.FOLD_BYTES = args.fold_bytes
    store = Store(args.cache)
    store.start_run(args.run, "demo", {"batches": args.batches})
    for b in range(args.batches):
        rows = generations(b, args.run)
        store.add_generations(rows)
        store.link_generations(args.run, [(g.key, b % 7, None) for g in rows])
        store.update_run(args.run, llm_calls=4 * (b + 1))
        if b % 5 == 0:
            store.put_embeddings(
                "text", "demo@1", [f"{b}-{i}" for i in range(16)], embeddings(b), [f"text {b}-{i}" for i in range(16)]
            )
        if args.fold_every and (b + 1) % args.fold_every == 0:
            store.fold()
        print(f"batch {b}", flush=True)
        time.sleep(args.pace)
    store.save_result(args.run, "zero-shot:demo", "zero-shot", 0.5, 0.25, 70, [(0, "class 0", 10, 0.5, 0.0)], seeds=[1, 2])
    store.save_classifier(args.run, "zero-shot:demo", 1, np.eye(2, 32), ["class 0", "class 1"], None, None)
    store.finish_run(args.run, "completed")
    print("closing", flush=True)
    store.close()


if __name__ == "__main__":
    main()
