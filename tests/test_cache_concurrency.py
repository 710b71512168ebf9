"""The cache read while a run writes, with real processes and real files: a writer process (tests/cache_writer.py,
which stores what a run stores, in batches) and readers: ``Store(read_only=True)`` as ``textadapt sql`` opens it, and
PyPI's ``duckdb`` shell. Readers see every batch stored so far, never a row twice; a reader held open does not stall
the writer; one writer at a time; a writer killed at any point leaves a cache that opens, and running it again
completes it. Each final cache equals the one a writer left alone wrote."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from textadapt import TextadaptError
from textadapt.store import MIGRATIONS, SCHEMA_VERSION, TABLES, Store

WRITER = str(Path(__file__).parent / "cache_writer.py")
SHELL = str(Path(sys.executable).parent / "duckdb")
CONTENT = {  # every table the writer fills, without the times it was stored at
    "generations": "SELECT * EXCLUDE (created_at) FROM generations ORDER BY key",
    "runs": "SELECT * EXCLUDE (started_at, finished_at) FROM runs",
    "run_generations": "SELECT * FROM run_generations ORDER BY ALL",
    "text_embeddings": "SELECT backbone, text_hash, text, embedding FROM text_embeddings ORDER BY text_hash",
    "results": "SELECT * FROM results",
    "class_results": "SELECT * FROM class_results",
    "classifiers": "SELECT * FROM classifiers",
}
SEEN = [
    "SELECT count(*), count(DISTINCT key) FROM generations",
    "SELECT max(llm_calls), count(*) FROM runs",  # one scan each
    "SELECT count(*), count(DISTINCT text_hash) FROM text_embeddings",
]


def writer(cache: Path, batches: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WRITER, str(cache), str(batches), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def content(cache: Path) -> dict[str, list[tuple]]:
    with Store(cache, read_only=True) as s:
        return {table: s.query(sql) for table, sql in CONTENT.items()}


def staged_batches(cache: Path) -> list[str]:
    return sorted(d.name for d in Path(f"{cache}.staging").iterdir() if d.name[:1].isdigit())


def seen(cache: Path) -> tuple[tuple, float]:
    """What a reader sees (counts), and how long it waited to open the file."""
    t0 = time.perf_counter()
    with Store(cache, read_only=True) as s:
        waited = time.perf_counter() - t0
        return sum((s.query(sql)[0] for sql in SEEN), ()), waited


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    """What the writer leaves when nobody reads, kills or interrupts it: by number of batches."""
    out = {}
    for batches in (120, 200):
        cache = tmp_path_factory.mktemp("reference") / "c.duckdb"
        p = writer(cache, batches)
        assert p.wait(timeout=600) == 0, p.stderr.read()
        out[batches] = content(cache)
        assert staged_batches(cache) == []  # nobody had it open: all folded
    return out


def test_readers_see_every_batch_while_the_writer_writes_and_folds(tmp_path, reference):
    cache = tmp_path / "c.duckdb"
    # Folds mid-run too, each time no reader has the file, in steps of 20 kB: readers come in between steps.
    p = writer(cache, 120, "--pace", "0.02", "--fold-every", "30", "--fold-bytes", "20000")
    while not cache.exists() or not Path(f"{cache}.staging", "anchor").exists():
        time.sleep(0.05)
    views, waits = [], []
    while p.poll() is None:
        counts, waited = seen(cache)
        views.append(counts)
        waits.append(waited)
    assert p.returncode == 0, p.stderr.read()
    views.append(seen(cache)[0])
    assert len(views) > 20
    for (n, distinct, calls, runs, emb, emb_distinct), later in zip(views, views[1:]):
        assert n == distinct and emb == emb_distinct and runs <= 1  # never a row twice
        assert later[0] >= n and (later[2] or 0) >= (calls or 0) and later[4] >= emb  # never a row lost, never an older run row
    assert views[-1] == (480, 480, 480, 1, 384, 384)
    assert len({v[0] for v in views}) > 5  # they saw it grow
    assert content(cache) == reference[120]
    print(f"reader waits over {len(waits)} opens: max {max(waits):.3f} s, median {sorted(waits)[len(waits) // 2]:.4f} s")


def test_a_reader_left_open_does_not_stall_the_writer(tmp_path, reference):
    """An interactive `duckdb -readonly` shell left open for the whole run: the writer keeps writing (its folds wait for
    later), the shell sees each new batch, and the next writer folds what was left once the shell is gone."""
    cache = tmp_path / "c.duckdb"
    Store(cache).close()
    shell = subprocess.Popen(
        [SHELL, "-readonly", "-csv", "-noheader", str(cache)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p = writer(cache, 120, "--pace", "0.01", "--fold-every", "20")
    while p.poll() is None:
        shell.stdin.write("SELECT count(*) FROM generations;\n")
        shell.stdin.flush()
        time.sleep(0.2)
    assert p.returncode == 0, p.stderr.read()
    shell.stdin.write("SELECT count(*), count(DISTINCT key) FROM generations;\n")
    out, err = shell.communicate(timeout=60)
    assert shell.returncode == 0 and err == ""
    counts = [int(line.split(",")[0]) for line in out.split()]
    assert counts == sorted(counts) and len(set(counts)) > 3 and out.split()[-1] == "480,480"
    assert staged_batches(cache)  # the writer could not fold while the shell had the file open ...
    Store(cache).close()  # ... the next writer does
    assert staged_batches(cache) == []
    assert content(cache) == reference[120]


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    cache = tmp_path / "c.duckdb"
    p = writer(cache, 1000, "--pace", "0.1", "--run", "demo-20260101-000000-beef")
    try:
        assert p.stdout.readline().startswith("batch")
        with pytest.raises(TextadaptError) as e:
            Store(cache)
        msg = str(e.value)
        assert "in use by another process" in msg and f"pid {p.pid}" in msg and "run demo-20260101-000000-beef" in msg
        counts, _ = seen(cache)  # readers are welcome meanwhile
        assert counts[0] > 0
    finally:
        p.kill()
        p.wait()
    Store(cache).close()  # the lock died with its process


@pytest.mark.parametrize("when", ["writing", "closing"])
def test_a_writer_killed_mid_write_leaves_a_cache_that_opens_and_a_rerun_completes(tmp_path, reference, when):
    """SIGKILL while staging batches (during merges of staged files), or while folding them into the file at the end."""
    cache = tmp_path / "c.duckdb"
    p = writer(cache, 200)
    done = 0
    for line in p.stdout:
        if line.startswith("batch"):
            done = int(line.split()[1]) + 1
        if (when == "writing" and done == 120) or (when == "closing" and line.startswith("closing")):
            time.sleep(0.3 if when == "closing" else 0)
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    n, distinct, *_ = seen(cache)[0]  # the file opens; what was stored survived, once
    assert n == distinct and n >= 4 * done
    with Store(cache, read_only=True) as s:
        assert s.query("SELECT status FROM runs") == [("running" if when == "writing" else "completed",)]
    Store(cache).close()  # the next writer marks a run whose process is gone, and folds what it left
    with Store(cache, read_only=True) as s:
        assert s.query("SELECT status FROM runs") == [("interrupted" if when == "writing" else "completed",)]
    assert staged_batches(cache) == []
    again = writer(cache, 200)  # the run again completes
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert staged_batches(cache) == []
    assert content(cache) == reference[200]


def test_a_version_3_cache_migrates_keeping_every_row(tmp_path):
    """A cache as textadapt wrote it before version 6: tables in main, no staging. Rows move to the stored tables; a
    generation's run_id is the run that was writing when it was stored and used it (only one process wrote at a time)."""
    path = tmp_path / "v3.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '3')")
    for sql in MIGRATIONS[:3]:
        con.execute(sql)
    gen = (
        "INSERT INTO generations (key, dataset, class_name, template, template_hash, model, prompt, params, sample_index, "
        "description, created_at, base_key) VALUES (?, 'd', 'bag', ?, 'h', 'm', 'p', '{}', 0, 'a bag.', ?, ?)"
    )
    con.execute(
        "INSERT INTO runs (run_id, dataset, status, options, started_at, finished_at) VALUES "
        "('r1', 'd', 'completed', '{}', '2026-01-01 10:00', '2026-01-01 10:30'), "
        "('r2', 'd', 'completed', '{}', '2026-01-01 11:00', '2026-01-01 11:30')"
    )
    for key, template, at in [
        ("made-by-r1", "generic/look", "2026-01-01 10:10"),
        ("made-by-r2", "generic/look", "2026-01-01 11:10"),
        ("before-any-run", "generic/look", "2026-01-01 09:00"),
        ("imported", "import/cupl", "2026-01-01 10:20"),
    ]:
        con.execute(gen, [key, template, at, key])
    con.executemany(
        "INSERT INTO run_generations VALUES (?, ?, 0, NULL)",
        [("r1", "made-by-r1"), ("r2", "made-by-r1"), ("r2", "made-by-r2"), ("r2", "before-any-run"), ("r1", "imported")],
    )
    con.execute(
        "INSERT INTO results (run_id, method, kind, top1, mean_per_class, n_images, losses, seeds) "
        "VALUES ('r2', 'tap-head:generic', 'adapted', 0.5, 0.4, 10, [1.0, 0.5], [1, 2])"
    )
    con.execute("INSERT INTO classifiers VALUES ('r2', 'tap-head:generic', 1, 1, 2, ['bag'], [0.5, 0.5], NULL, NULL)")
    con.close()
    with Store(path) as s:
        assert s.sql("SELECT value FROM textadapt_meta WHERE key = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
        assert s.query("SELECT key, run_id FROM generations ORDER BY key") == [
            ("before-any-run", None),
            ("imported", None),
            ("made-by-r1", "r1"),
            ("made-by-r2", "r2"),
        ]
        assert s.query("SELECT run_id, llm_calls FROM run_llm_usage ORDER BY run_id") == [("r1", 1), ("r2", 1)]
        assert s.query("SELECT run_id, key, excluded, excluded_items FROM run_generations ORDER BY ALL")[0] == (
            "r1",
            "imported",
            None,
            None,
        )
        assert s.query("SELECT method, losses, seeds, flow_run_id FROM results JOIN runs USING (run_id)") == [
            ("tap-head:generic", [1.0, 0.5], [1, 2], None)
        ]
        assert s.classifier("r2", "tap-head:generic")[2] == ["bag"]
        assert s.run_images("r2")[0] == [] and s.predictions("r2", "tap-head:generic") is None  # schema 4's tables, empty
        assert s.query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'stored'") == [(len(TABLES),)]
    with Store(path, read_only=True) as s:  # and the file is whole (checkpointed): it reopens
        assert s.query("SELECT count(*) FROM generations") == [(4,)]


def test_the_duckdb_shell_and_a_moved_cache(tmp_path):
    """The views name the staging folder by its absolute path. A cache moved with its staging folder reads right through
    textadapt (its own views, for that connection) until its next writer rewrites them for the new place."""
    old = tmp_path / "old" / "c.duckdb"
    p = writer(old, 10)
    assert p.wait(timeout=300) == 0
    with Store(old) as s:
        s.update_run("demo-run", flow_run_id="0b9e-flow")  # staged, not folded while ...
        shell = subprocess.Popen([SHELL, "-readonly", str(old)], stdin=subprocess.PIPE, text=True)  # ... a shell has the file
        time.sleep(0.5)
    shell.communicate(".quit\n", timeout=30)
    assert staged_batches(old)
    new = tmp_path / "new" / "c.duckdb"
    new.parent.mkdir()
    for name in ("c.duckdb", "c.duckdb.staging"):
        shutil.move(old.parent / name, new.parent / name)
    with Store(new, read_only=True) as s:
        assert s.query("SELECT flow_run_id, count(*) FROM runs, generations GROUP BY ALL") == [("0b9e-flow", 40)]
    Store(new).close()  # the writer rewrites the views and folds
    out = subprocess.run(
        [SHELL, "-readonly", "-csv", "-noheader", str(new), "-c", "SELECT flow_run_id FROM runs"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.split() == ["0b9e-flow"], out.stderr
    assert not os.path.exists(old)


def test_a_new_cache_killed_before_its_first_checkpoint_opens(tmp_path):
    """A writer killed right after creating a file, before DuckDB wrote it from its log: the log replays. (DuckDB 1.5.6
    cannot replay a log that alters a table with a function default, such as COMMENT ON COLUMN on a table whose
    created_at defaults to current_timestamp: a new file gets no such default, and no ALTER.)"""
    cache = tmp_path / "c.duckdb"
    code = (
        "import os, duckdb\nfrom textadapt import store\n"
        "connect = duckdb.connect\n"
        "def keep_the_log(path, read_only=False):\n"
        "    con = connect(path, read_only=read_only)\n"
        "    if not read_only:\n"
        "        con.execute(\"SET checkpoint_threshold = '1TB'\")  # no checkpoint but ours\n"
        "    return con\n"
        "store.duckdb.connect = keep_the_log\n"
        "def killed(self, con):\n"
        "    self._install_views(con)\n"
        "    os.kill(os.getpid(), 9)  # before CHECKPOINT\n"
        "store.Store._end_session = killed\n"
        f"store.Store({str(cache)!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert Path(f"{cache}.wal").stat().st_size > 10_000  # the schema, views and comments are in the log only
    with Store(cache, read_only=True) as s:
        assert s.query("SELECT count(*) FROM run_descriptions") == [(0,)]
    with Store(cache) as s:
        s.start_run("r", "d", {})
    with Store(cache, read_only=True) as s:
        assert s.query("SELECT status FROM runs") == [("running",)]
