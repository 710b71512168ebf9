"""7. Cache readers and writer: how long a reader waits while a run writes, and what staging costs the writer.

The writer side compares textadapt's ``Store`` (each batch staged as Parquet files beside the cache, folded into it
at the end) with the design it replaced, as a bare anchor: one DuckDB connection holding the file for the whole
run and inserting each batch (``INSERT ... ON CONFLICT DO NOTHING`` from Arrow, as textadapt 0.3 did). Both write
the same batches, alternately: a run's shape (generation batches of 5 answers, embedding batches of 256 x 512).

The reader side runs that writer in another process (a paced run, as an LLM paces it) and, meanwhile, opens the
cache read-only and counts generations again and again, as ``textadapt sql`` does, and with the ``duckdb`` shell;
then it keeps reading while the writer folds at its end, which is the one time a reader waits.

    .venv/bin/python benchmarks/cache_readers.py [--gen-batches 150] [--emb-batches 40] [--repeats 3]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
import duckdb
import numpy as np
import pyarrow as pa

from textadapt import store as store_module
from textadapt.store import GENERATION_COLUMNS, Generation, Store

NAME = "cache_readers"
SHELL = str(Path(sys.executable).parent / "duckdb")


def gen_batch(b: int) -> list[Generation]:
    return [
        Generation(
            f"{b:06d}-{i}",
            "bench",
            f"class {b % 100}",
            f"targeted/q{b % 5}",
            "0" * 64,
            "llama-cpp:bench@sha256:" + "1" * 64,
            "What are useful features for distinguishing a class in a photo? " * 3,
            {"temperature": 0.99, "max_tokens": 77},
            i,
            "A long answer of the kind a small model writes. " * 4,
            "A description of the kind a run keeps. " * 2,
            None,
            60,
            40,
            0.8,
            run_id="bench-run",
        )
        for i in range(5)
    ]


def emb_batch(b: int) -> tuple[list[str], np.ndarray]:
    return [f"{b:06d}-{i}" for i in range(256)], np.random.default_rng(b).normal(size=(256, 512)).astype(np.float32)


FOLD_STEPS: list[float] = []  # seconds each fold step held DuckDB's write lock (what a reader arriving then waits, at most)


def _timed_fold_step(fold_into):
    def step(self, con, batches, superseded):
        t0 = time.perf_counter()
        fold_into(self, con, batches, superseded)
        FOLD_STEPS.append(time.perf_counter() - t0)

    return step


def write_staged(path: Path, gens: int, embs: int) -> dict:
    t = {}
    t0 = time.perf_counter()
    store = Store(path)
    t["open"] = time.perf_counter() - t0
    store.start_run("bench-run", "bench", {})
    t0 = time.perf_counter()
    for b in range(gens):
        store.add_generations(gen_batch(b))
    t["gen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(embs):
        hashes, e = emb_batch(b)
        store.put_embeddings("text", "bench@1", hashes, e, hashes)
    t["emb"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.close()  # folds
    t["close"] = time.perf_counter() - t0
    return t


OLD_SCHEMA = """
CREATE TABLE generations (key VARCHAR PRIMARY KEY, dataset VARCHAR NOT NULL, class_name VARCHAR NOT NULL,
  template VARCHAR NOT NULL, template_hash VARCHAR NOT NULL, model VARCHAR NOT NULL, prompt VARCHAR NOT NULL,
  params JSON NOT NULL, sample_index INTEGER NOT NULL, raw_text VARCHAR, description VARCHAR, rejected VARCHAR,
  prompt_tokens INTEGER, completion_tokens INTEGER, seconds DOUBLE, created_at TIMESTAMP DEFAULT current_timestamp,
  base_key VARCHAR, refresh INTEGER DEFAULT 0, run_id VARCHAR);
CREATE TABLE text_embeddings (backbone VARCHAR NOT NULL, text_hash VARCHAR NOT NULL, text VARCHAR NOT NULL,
  embedding FLOAT[] NOT NULL, created_at TIMESTAMP DEFAULT current_timestamp, PRIMARY KEY (backbone, text_hash));
"""


def write_direct(path: Path, gens: int, embs: int) -> dict:
    """The anchor: the file held for writing, one INSERT per batch (what textadapt did before staging)."""
    t = {}
    t0 = time.perf_counter()
    con = duckdb.connect(str(path))
    con.execute(OLD_SCHEMA)
    con.execute("CHECKPOINT")
    t["open"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(gens):
        rows = gen_batch(b)
        data = {c: [getattr(g, c) for g in rows] for c in GENERATION_COLUMNS}
        data["params"] = [json.dumps(p, sort_keys=True) for p in data["params"]]
        con.register("_new", pa.table(data))
        con.execute(
            f"INSERT INTO generations ({', '.join(GENERATION_COLUMNS)}) SELECT {', '.join(GENERATION_COLUMNS)} FROM _new ON CONFLICT DO NOTHING"
        )
        con.unregister("_new")
    t["gen"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(embs):
        hashes, e = emb_batch(b)
        lists = pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), 512).cast(pa.list_(pa.float32()))
        con.register("_new", pa.table({"backbone": ["bench@1"] * 256, "text_hash": hashes, "text": hashes, "embedding": lists}))
        con.execute(
            "INSERT INTO text_embeddings (backbone, text_hash, text, embedding) SELECT * FROM _new ON CONFLICT DO NOTHING"
        )
        con.unregister("_new")
    t["emb"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    con.close()
    t["close"] = time.perf_counter() - t0
    return t


WRITER = """
import sys, time
sys.path.insert(0, {bench!r})
from cache_readers import gen_batch, emb_batch
from textadapt.store import Store
store = Store({path!r})
store.start_run("bench-run", "bench", {{}})
print("open", flush=True)
for b in range({gens}):
    store.add_generations(gen_batch(b))
    if b % 4 == 0 and b // 4 < {embs}:
        hashes, e = emb_batch(b // 4)
        store.put_embeddings("text", "bench@1", hashes, e, hashes)
    time.sleep({pace})
print("closing", flush=True)
t0 = time.perf_counter()
store.close()
print("folded", time.perf_counter() - t0, flush=True)
"""


def reader(path: Path) -> tuple[float, float, int]:
    """(seconds waiting for the file, seconds to the answer, count), as `textadapt sql` opens the cache."""
    t0 = time.perf_counter()
    store = Store(path, read_only=True)
    opened = time.perf_counter() - t0
    n = store.query("SELECT count(*) FROM generations")[0][0]
    store.close()
    return opened, time.perf_counter() - t0, n


def shell(path: Path) -> tuple[float, str | None]:
    """Seconds a one-shot `duckdb -readonly` query took, and its error (None: it answered)."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [SHELL, "-readonly", "-csv", "-noheader", str(path), "-c", "SELECT count(*) FROM generations"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return time.perf_counter() - t0, None if p.returncode == 0 else p.stderr.strip().splitlines()[0]


def readers_during_a_run(tmp: Path, gens: int, embs: int, pace: float) -> dict:
    """Readers (textadapt's, then the shell, in turn) from the writer's first batch to its exit. A query is counted as
    "during the run" if it started over a second before the writer began its final fold, else "at the fold"."""
    path = tmp / "watched.duckdb"
    code = WRITER.format(bench=str(Path(__file__).parent), path=str(path), gens=gens, embs=embs, pace=pace)
    w = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert w.stdout.readline().strip() == "open"
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in w.stdout), daemon=True).start()
    reads, shells = [], []  # (start, result)
    while w.poll() is None:
        reads.append((time.perf_counter(), reader(path)))
        shells.append((time.perf_counter(), shell(path)))
    time.sleep(0.5)
    closing = next(t for t, line in lines if line.startswith("closing"))
    folded = float(next(line for _, line in lines if line.startswith("folded")).split()[1])
    during = [r for t, r in reads if t < closing - 1]
    at_fold = [r for t, r in reads if t >= closing - 1]
    shell_during = [r for t, r in shells if t < closing - 1]
    shell_at_fold = [r for t, r in shells if t >= closing - 1]
    idle = [reader(path) for _ in range(10)]
    idle_shell = [shell(path) for _ in range(10)]
    waits = [o for o, _, _ in during]
    return {
        "batches": gens,
        "pace_s": pace,
        "reads_during_run": len(during),
        "reader_open_s_median": statistics.median(waits),
        "reader_open_s_max": max(waits),
        "reader_answer_s_median": statistics.median(a for _, a, _ in during),
        "reader_answer_s_max": max(a for _, a, _ in during),
        "counts_seen": sorted({n for *_, n in during}),
        "shell_queries_during_run": len(shell_during),
        "shell_failures_during_run": sum(e is not None for _, e in shell_during),
        "shell_s_median": statistics.median(s for s, _ in shell_during),
        "reads_at_final_fold": len(at_fold),
        "reader_open_s_max_at_fold": max((o for o, _, _ in at_fold), default=0.0),
        "shell_queries_at_final_fold": len(shell_at_fold),
        "shell_errors_at_final_fold": sorted({e.split(":")[0] for _, e in shell_at_fold if e}),
        "shell_failures_at_final_fold": sum(e is not None for _, e in shell_at_fold),
        "final_fold_s": folded,
        "idle_reader_open_s_median": statistics.median(o for o, _, _ in idle),
        "idle_reader_answer_s_median": statistics.median(a for _, a, _ in idle),
        "idle_shell_s_median": statistics.median(s for s, _ in idle_shell),
    }


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--gen-batches", type=int, default=150, help="generation batches (5 answers each)")
    p.add_argument("--emb-batches", type=int, default=40, help="embedding batches (256 x 512 floats each)")
    p.add_argument("--pace", type=float, default=0.05, help="seconds between the watched writer's batches")
    args = p.parse_args()
    repeats = args.repeats or 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-readers-"))
    try:
        print(
            f"writer: {args.gen_batches} generation batches, {args.emb_batches} embedding batches, "
            f"{repeats} alternating repetitions"
        )
        sides = {"staged": [], "direct": []}
        counter = [0]

        def run(side: str) -> float:
            counter[0] += 1
            t = (write_staged if side == "staged" else write_direct)(
                tmp / f"{side}-{counter[0]}.duckdb", args.gen_batches, args.emb_batches
            )
            sides[side].append(t)
            return sum(t.values())

        Store._fold_into = _timed_fold_step(Store._fold_into)  # (its transaction and checkpoint)
        alt = _common.alternate(lambda: run("staged"), lambda: run("direct"), repeats, "staged", "direct")
        per = {
            side: {k: statistics.median(t[k] for t in ts) for k in ("open", "gen", "emb", "close")} for side, ts in sides.items()
        }
        writer = {
            "ratio_total_median": alt["ratio_median"],
            "ratio_min": alt["ratio_min"],
            "ratio_max": alt["ratio_max"],
            "cpu_ratio_median": alt["cpu_ratio_median"],
            **{f"{side}_ms_per_generation_batch": 1000 * per[side]["gen"] / args.gen_batches for side in per},
            **{f"{side}_ms_per_embedding_batch": 1000 * per[side]["emb"] / args.emb_batches for side in per},
            **{f"{side}_close_s": per[side]["close"] for side in per},
            **{f"{side}_total_s": statistics.median(sum(t.values()) for t in ts) for side, ts in sides.items()},
            "fold_steps": len(FOLD_STEPS) / repeats,
            "fold_step_s_max": max(FOLD_STEPS),
            "fold_step_s_median": statistics.median(FOLD_STEPS),
            "fold_bytes": store_module.FOLD_BYTES,
        }
        print(
            _common.table(
                ["", "staged (textadapt)", "direct (file held, before)"],
                [
                    [
                        "ms per generation batch",
                        writer["staged_ms_per_generation_batch"],
                        writer["direct_ms_per_generation_batch"],
                    ],
                    ["ms per embedding batch", writer["staged_ms_per_embedding_batch"], writer["direct_ms_per_embedding_batch"]],
                    ["close (staged: the fold) s", writer["staged_close_s"], writer["direct_close_s"]],
                    ["total s", writer["staged_total_s"], writer["direct_total_s"]],
                ],
            )
        )
        print(
            f"fold: {writer['fold_steps']:.0f} steps per run, each holding the write lock {writer['fold_step_s_median']:.2f} s "
            f"(median), {writer['fold_step_s_max']:.2f} s at most"
        )
        print(f"staged / direct, total: {alt['ratio_median']:.3f} (CPU {alt['cpu_ratio_median']:.3f})")

        print(f"\nreaders while a writer writes {args.gen_batches} batches, {args.pace} s apart, then folds:")
        readers = readers_during_a_run(tmp, args.gen_batches, args.emb_batches, args.pace)
        for k, v in readers.items():
            print(f"  {k}: {f'{len(v)} distinct, {v[0]} to {v[-1]}' if k == 'counts_seen' else v}")
        readers["counts_seen"] = len(readers["counts_seen"])
        _common.write_results(
            NAME,
            {
                "generation_batches": args.gen_batches,
                "embedding_batches": args.emb_batches,
                "rows_per_generation_batch": 5,
                "embedding_batch": "256 x 512 float32",
                "repeats": repeats,
                "watched_writer_pace_s": args.pace,
            },
            {"writer": writer, "readers": readers},
            [
                "direct: one DuckDB connection holding the file, INSERT ... ON CONFLICT DO NOTHING from Arrow per batch",
                "staged: textadapt's Store; its close folds the staged rows into the file",
            ],
            args.out,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
