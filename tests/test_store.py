import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from textadapt import TextadaptError
from textadapt.store import SCHEMA_VERSION, Store


def test_new_file_gets_the_current_schema(tmp_path):
    with Store(tmp_path / "c.duckdb") as s:
        assert s.sql("SELECT value FROM textadapt_meta WHERE key = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
        tables = {r[0] for r in s.sql("SELECT table_name FROM information_schema.tables")[1]}
    assert {
        "generations",
        "descriptions",
        "text_embeddings",
        "image_embeddings",
        "runs",
        "run_generations",
        "results",
        "class_results",
    } <= tables


def test_embeddings_round_trip_and_are_keyed_by_backbone(tmp_path):
    e = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with Store(tmp_path / "c.duckdb") as s:
        s.put_embeddings("text", "A@1", list("abcde"), e, list("abcde"))
        s.put_embeddings("text", "A@1", ["a"], e[1:2], ["a"])  # already there: kept, not replaced
        got = s.get_embeddings("text", "A@1", ["a", "c", "zz"])
        assert set(got) == {"a", "c"}
        assert np.array_equal(got["a"], e[0]) and np.array_equal(got["c"], e[2])
        assert s.get_embeddings("text", "B@2", ["a"]) == {}


def test_foreign_duckdb_file_is_refused_untouched(tmp_path):
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.close()
    with pytest.raises(TextadaptError, match="not a textadapt cache"):
        Store(path)
    con = duckdb.connect(str(path))
    assert [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()] == ["invoices"]
    con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.duckdb"]  # nothing left beside it


def test_not_a_database_is_refused(tmp_path):
    path = tmp_path / "junk.duckdb"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TextadaptError, match="cannot open as a textadapt cache"):
        Store(path)


def test_second_writer_process_gets_a_clear_message(tmp_path):
    path = tmp_path / "c.duckdb"
    with Store(path):
        code = f"from textadapt.store import Store\nfrom textadapt import TextadaptError\ntry:\n    Store({str(path)!r})\nexcept TextadaptError as e:\n    print(e)\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "in use by another process" in out


def test_read_only_store_refuses_writes(tmp_path):
    Store(tmp_path / "c.duckdb").close()
    with Store(tmp_path / "c.duckdb", read_only=True) as s:
        with pytest.raises(TextadaptError, match="read-only"):
            s.sql("DELETE FROM runs")


def test_migration_from_version_1_keeps_every_row(tmp_path):
    from textadapt.store import MIGRATIONS

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))  # a cache as textadapt 0.1.0 (schema 1) wrote it
    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '1')")
    con.execute(MIGRATIONS[0])
    con.execute(
        "INSERT INTO generations (key, dataset, class_name, template, template_hash, model, prompt, params, sample_index, "
        "description) VALUES ('k1', 'd', 'bag', 'generic/look', 'h', 'm', 'p', '{}', 0, 'a bag with handles.')"
    )
    con.execute("INSERT INTO run_generations VALUES ('r1', 'k1', 8)")
    con.close()
    with Store(path) as s:
        assert s.sql("SELECT value FROM textadapt_meta WHERE key = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
        assert s.sql("SELECT key, base_key, refresh, description FROM generations")[1] == [("k1", "k1", 0, "a bag with handles.")]
        assert s.sql("SELECT run_id, key, class_index, excluded FROM run_generations")[1] == [("r1", "k1", 8, None)]
        assert s.sql("SELECT description FROM descriptions")[1] == [("a bag with handles.",)]


def test_descriptions_view_has_one_row_per_list_item(tmp_path):
    from textadapt.store import Generation

    with Store(tmp_path / "c.duckdb") as s:
        s.add_generations(
            [Generation("k", "d", "shirt", "attributes/x", "h", "m", "p", {}, 0, "raw", "long sleeves\na collar", None)]
        )
        assert s.sql("SELECT description FROM descriptions ORDER BY 1")[1] == [("a collar",), ("long sleeves",)]


def test_the_duckdb_shell_opens_the_cache(tmp_path):
    """PyPI's duckdb-cli (the `duckdb` shell, pinned to the library's version) reads the same file."""
    import shutil

    from textadapt.store import Generation

    with Store(tmp_path / "c.duckdb") as s:
        s.add_generations(
            [Generation("k", "d", "bag", "generic/look", "h", "m", "p", {}, 0, "raw", "A bag with two handles.", None)]
        )
    shell = shutil.which("duckdb", path=str(Path(sys.executable).parent))
    assert shell, "the duckdb shell (duckdb-cli) is not installed"
    out = subprocess.run(
        [shell, "-readonly", "-csv", str(tmp_path / "c.duckdb"), "-c", "SELECT class_name, description FROM descriptions"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["class_name,description", "bag,A bag with two handles."]


def test_predictions_round_trip_and_answer_sql(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    hashes = [f"{i:064x}" for i in range(50)]
    predicted = {"zero-shot:a-photo-of": rng.integers(0, 4, (1, 50)), "tap-head:targeted": rng.integers(0, 4, (3, 50))}
    with Store(tmp_path / "c.duckdb") as s:
        s.save_predictions("r1", hashes, labels, {m: p + 1 for m, p in predicted.items()})
        s.save_predictions("r1", hashes, labels, predicted)  # saved again: replaces, never doubles
        s.save_predictions("r2", hashes[:10], labels[:10], {"waffle": predicted["tap-head:targeted"][:, :10]})
        got_hashes, got_labels = s.run_images("r1")
        assert got_hashes == hashes and (got_labels == labels).all()
        for method, p in predicted.items():
            assert np.array_equal(s.predictions("r1", method), p)
        assert s.predictions("r1", "waffle") is None and s.run_images("nope")[0] == []
        assert s.sql("SELECT count(*) FROM predictions WHERE run_id = 'r1'")[1] == [(100,)]
        # per-seed accuracy in SQL, as docs/schema.md shows it, is numpy's
        rows = s.sql(
            "SELECT s.seed, avg((p.predicted[s.seed] = i.label)::INT) FROM predictions p "
            "JOIN run_images i USING (run_id, image_index), range(1, 4) s(seed) "
            "WHERE p.run_id = 'r1' AND p.method = 'tap-head:targeted' GROUP BY ALL ORDER BY 1"
        )[1]
        assert [a for _, a in rows] == pytest.approx((predicted["tap-head:targeted"] == labels).mean(axis=1).tolist())


def test_migration_to_predictions_keeps_results(tmp_path):
    from textadapt.store import MIGRATIONS

    path = tmp_path / "v3.duckdb"
    con = duckdb.connect(str(path))  # a cache as schema 3 wrote it, with one result
    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '3')")
    for sql in MIGRATIONS[:3]:
        con.execute(sql)
    con.execute(
        "INSERT INTO results (run_id, method, kind, top1, mean_per_class, n_images) "
        "VALUES ('r', 'waffle', 'zero-shot', 0.5, 0.4, 9)"
    )
    con.execute("INSERT INTO class_results VALUES ('r', 'waffle', 0, 'bag', 9, 0.5, 0.0)")
    con.close()
    with Store(path) as s:
        assert s.sql("SELECT top1, baseline, delta_top1, delta_top1_low FROM results")[1] == [(0.5, None, None, None)]
        assert s.sql("SELECT delta, delta_low, delta_high FROM class_results")[1] == [(0.0, None, None)]
        assert s.sql("SELECT count(*) FROM predictions")[1] == [(0,)] and s.run_images("r")[0] == []


def test_every_table_view_and_column_says_what_it_means_inside_the_file(tmp_path):
    with Store(tmp_path / "c.duckdb") as s:
        missing = s.query(
            "SELECT schema_name, table_name, column_name FROM duckdb_columns() "
            "WHERE schema_name IN ('main', 'stored') AND NOT internal AND comment IS NULL"
        )
        assert missing == []
        views = dict(s.query("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal"))
    wanted = {"run_descriptions", "run_results", "latest_results", "run_llm_usage", "current_descriptions", "descriptions"}
    assert wanted <= set(views)
    assert all(views.values())


def test_the_schema_doc_is_what_the_code_writes():
    """docs/schema.md's tables and views are generated from a fresh cache by scripts/schema_doc.py."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("schema_doc", REPO / "scripts" / "schema_doc.py")
    schema_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema_doc)
    doc = (REPO / "docs" / "schema.md").read_text(encoding="utf-8")
    assert doc == schema_doc.updated(doc), "docs/schema.md is not what scripts/schema_doc.py writes: run it"
    assert "one by one" not in doc


def test_a_new_file_and_a_migrated_one_have_the_same_schema(tmp_path):
    """A new file gets the current schema whole (store.SCHEMA); an older one gets the migrations: the same tables."""
    from textadapt.store import MIGRATIONS

    old = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(old))
    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '1')")
    con.execute(MIGRATIONS[0])
    con.close()
    columns = (
        "SELECT schema_name, table_name, column_name, data_type, is_nullable, column_default FROM duckdb_columns() "
        "WHERE schema_name = 'stored' ORDER BY ALL"
    )
    keys = "SELECT schema_name, table_name, constraint_type, constraint_column_names FROM duckdb_constraints() ORDER BY ALL"
    with Store(old) as migrated, Store(tmp_path / "new.duckdb") as new:
        for sql in (columns, keys):
            assert migrated.query(sql) == new.query(sql)


def test_migration_from_version_6_folds_its_staged_rows_and_adds_trained_heads(tmp_path):
    """A cache as schema 6 wrote it (stored tables, views, and a batch its writer staged but did not fold, as when it was
    killed): the staged rows are folded with the schema they were written with, then the file gets trained_heads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from textadapt.store import STORED_V6, StoredHead

    path = tmp_path / "v6.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '6')")
    con.execute(STORED_V6)
    con.execute("INSERT INTO stored.text_embeddings VALUES ('A@1', 'h1', 'a bag', [0.6, 0.8], '2026-01-01 10:00')")
    con.execute("INSERT INTO stored.runs (run_id, dataset, status, options) VALUES ('r1', 'd', 'completed', '{}')")
    con.close()
    batch = Path(f"{path}.staging") / "000000000001-0"
    batch.mkdir(parents=True)
    staged = pa.table(
        {
            "backbone": ["A@1"],
            "text_hash": ["h2"],
            "text": ["a shoe"],
            "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32())),
            "created_at": pa.array([None], pa.timestamp("us")),
            "_seq": pa.array([1], pa.int64()),
            "_copy": pa.array([1], pa.int64()),
        }
    )
    pq.write_table(staged, batch / "text_embeddings.parquet")
    with Store(path) as s:
        assert s.sql("SELECT value FROM textadapt_meta WHERE key = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
        assert s.query("SELECT text_hash, text FROM text_embeddings ORDER BY text_hash") == [("h1", "a bag"), ("h2", "a shoe")]
        assert s.query("SELECT count(*) FROM stored.text_embeddings") == [(2,)]  # folded before the migration
        assert s.query("SELECT count(*) FROM trained_heads") == [(0,)]
        w = np.eye(2, dtype=np.float32)
        s.put_trained_heads([StoredHead("k", "tap-head", "ce", 7, "A@1", {}, w, [0.5], 0.1, "cpu")])
    with Store(path, read_only=True) as s:
        assert np.array_equal(s.trained_heads(["k"])["k"].weight, np.eye(2))
        assert s.query("SELECT run_id, status FROM runs") == [("r1", "completed")]
