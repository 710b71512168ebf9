import subprocess
import sys

import duckdb
import numpy as np
import pytest

from textadapt import TextadaptError
from textadapt.store import SCHEMA_VERSION, Store


def test_new_file_gets_the_current_schema(tmp_path):
    with Store(tmp_path / "c.duckdb") as s:
        assert s.sql("SELECT value FROM textadapt_meta")[1] == [(str(SCHEMA_VERSION),)]
        tables = {r[0] for r in s.sql("SELECT table_name FROM information_schema.tables")[1]}
    assert {"generations", "descriptions", "text_embeddings", "image_embeddings", "runs", "run_generations", "results", "class_results"} <= tables


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
