"""The cache: one DuckDB file holding every generation, embedding, run and result.

The schema is a user interface (``docs/schema.md`` documents it; users query it with
``textadapt sql`` or the ``duckdb`` shell). It is versioned: ``MIGRATIONS[i]`` takes a file from
version i to i+1, and opening a file applies the missing ones in one transaction. Rows are
written as they arrive, so a crash loses only what was in flight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from textadapt import TextadaptError

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE generations (
        key VARCHAR PRIMARY KEY,          -- sha256 of dataset, model, template hash, prompt, params, sample index
        dataset VARCHAR NOT NULL,
        class_name VARCHAR NOT NULL,
        template VARCHAR NOT NULL,        -- SET/NAME of the prompt template
        template_hash VARCHAR NOT NULL,   -- sha256 of the template's source
        model VARCHAR NOT NULL,           -- LLM identity, e.g. llama-cpp:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:...
        prompt VARCHAR NOT NULL,          -- the rendered text sent to the LLM
        params JSON NOT NULL,             -- sampling parameters
        sample_index INTEGER NOT NULL,
        raw_text VARCHAR,                 -- the LLM's answer as received
        description VARCHAR,              -- the cleaned answer; NULL when rejected
        rejected VARCHAR,                 -- why the answer is not used (NULL: accepted)
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        seconds DOUBLE,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE VIEW descriptions AS
        SELECT key, dataset, class_name, template, model, description, created_at
        FROM generations WHERE rejected IS NULL;
    CREATE TABLE backbones (
        backbone VARCHAR PRIMARY KEY,     -- ARCH@sha256 of weights and preprocessing: the embedding cache key
        spec VARCHAR NOT NULL,            -- as asked for, e.g. ViT-B-32:openai
        arch VARCHAR NOT NULL,
        weights VARCHAR NOT NULL,         -- pretrained tag, hub id, file or 'random'
        untrained BOOLEAN NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp
    );
    CREATE TABLE text_embeddings (
        backbone VARCHAR NOT NULL,
        text_hash VARCHAR NOT NULL,       -- sha256 of the text
        text VARCHAR NOT NULL,
        embedding FLOAT[] NOT NULL,       -- L2-normalised
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (backbone, text_hash)
    );
    CREATE TABLE image_embeddings (
        backbone VARCHAR NOT NULL,
        image_hash VARCHAR NOT NULL,      -- sha256 of the image's bytes
        embedding FLOAT[] NOT NULL,       -- L2-normalised
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (backbone, image_hash)
    );
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY,
        dataset VARCHAR NOT NULL,
        status VARCHAR NOT NULL,          -- running, completed, failed, interrupted
        options JSON NOT NULL,
        backbone VARCHAR,
        llm VARCHAR,
        llm_calls INTEGER,                -- generations made by this run (0: all served from the cache)
        cached_generations INTEGER,
        text_encoder_calls INTEGER,       -- texts encoded by this run (0: all served from the cache)
        report_path VARCHAR,
        error VARCHAR,
        started_at TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP
    );
    CREATE TABLE run_generations (        -- which generations a run used, and as which class
        run_id VARCHAR NOT NULL,
        key VARCHAR NOT NULL,
        class_index INTEGER NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE TABLE results (
        run_id VARCHAR NOT NULL,
        method VARCHAR NOT NULL,          -- e.g. zero-shot:class-name, tap-head:targeted
        kind VARCHAR NOT NULL,            -- zero-shot or adapted
        top1 DOUBLE NOT NULL,
        mean_per_class DOUBLE NOT NULL,
        n_images INTEGER NOT NULL,
        n_texts INTEGER,                  -- training descriptions (adapted heads)
        train_seconds DOUBLE,
        losses DOUBLE[],                  -- training loss every 10 steps
        PRIMARY KEY (run_id, method)
    );
    CREATE TABLE class_results (
        run_id VARCHAR NOT NULL,
        method VARCHAR NOT NULL,
        class_index INTEGER NOT NULL,
        class_name VARCHAR NOT NULL,
        n_images INTEGER NOT NULL,
        accuracy DOUBLE,                  -- recall of the class
        delta DOUBLE,                     -- accuracy minus the best zero-shot baseline's on this class
        PRIMARY KEY (run_id, method, class_index)
    );
    """,
    # 1 -> 2: refresh rounds, per-run exclusions, multi-item answers
    """
    ALTER TABLE generations ADD COLUMN base_key VARCHAR;     -- the key of refresh round 0: shared by every round
    ALTER TABLE generations ADD COLUMN refresh INTEGER DEFAULT 0;  -- 0, then +1 for each --refresh
    UPDATE generations SET base_key = key, refresh = 0;
    ALTER TABLE run_generations ADD COLUMN excluded VARCHAR;  -- why the run did not train on it (duplicate ...)
    CREATE OR REPLACE VIEW descriptions AS
        SELECT key, dataset, class_name, template, model,
               unnest(string_split(description, chr(10))) AS description, created_at
        FROM generations WHERE rejected IS NULL;
    """,
    # 2 -> 3: the harness (adapters x losses x scorings over seeds) and the classifiers it trains
    """
    ALTER TABLE results ADD COLUMN top5 DOUBLE;                 -- NULL with 5 classes or fewer
    ALTER TABLE results ADD COLUMN top1_std DOUBLE;             -- spread over seeds (population std); NULL: one seed
    ALTER TABLE results ADD COLUMN mean_per_class_std DOUBLE;
    ALTER TABLE results ADD COLUMN seeds INTEGER[];             -- training seeds (adapted) or draws (waffle)
    ALTER TABLE results ADD COLUMN top1_per_seed DOUBLE[];
    ALTER TABLE results ADD COLUMN adapter VARCHAR;             -- tap-head, zs-head, residual, prompt; NULL: training-free
    ALTER TABLE results ADD COLUMN loss VARCHAR;                -- ce or ot
    ALTER TABLE results ADD COLUMN scoring VARCHAR;             -- plain or ig
    ALTER TABLE results ADD COLUMN text_set VARCHAR;            -- the description set it was built from
    UPDATE results SET scoring = 'plain',
        adapter = CASE WHEN method LIKE 'tap-head:%' THEN 'tap-head' END,
        loss = CASE WHEN method LIKE 'tap-head:%' THEN 'ce' END,
        text_set = CASE WHEN method LIKE 'tap-head:%' THEN split_part(method, ':', 2) END;
    CREATE TABLE classifiers (                                  -- what `textadapt export` writes out
        run_id VARCHAR NOT NULL,
        method VARCHAR NOT NULL,
        seed INTEGER NOT NULL,                                  -- the first seed's classifier
        n_classes INTEGER NOT NULL,
        dim INTEGER NOT NULL,
        classes VARCHAR[] NOT NULL,                             -- class names, in the order of the weight's rows
        weight FLOAT[] NOT NULL,                                -- (n_classes, dim) row-major: logits = v @ W.T
        log_prior FLOAT[],                                      -- IG scoring: logits - beta * log_prior; NULL: plain
        beta DOUBLE,
        PRIMARY KEY (run_id, method)
    );
    """,
    # 3 -> 4: per-image predictions (to compare methods and runs later), and an interval for every gain
    """
    CREATE TABLE run_images (                                   -- the test images a run scored, one row each, in scoring order
        run_id VARCHAR NOT NULL,
        image_index INTEGER NOT NULL,                           -- 0, 1, ... in the order every method was scored in
        image_hash VARCHAR NOT NULL,                            -- sha256 of the image (image_embeddings.image_hash)
        label INTEGER NOT NULL                                  -- the true class: class_results.class_index
    );
    CREATE TABLE predictions (                                  -- every scored method's prediction for every test image of a run
        run_id VARCHAR NOT NULL,                                -- one row per (run_id, method, image_index), without a primary
        method VARCHAR NOT NULL,                                -- key: an index over millions of rows per run (ImageNet) would
        image_index INTEGER NOT NULL,                           -- cost memory and time, and a run writes its rows once
        predicted INTEGER[] NOT NULL                            -- predicted class index per seed (results.seeds' order; one: no seed)
    );
    ALTER TABLE results ADD COLUMN baseline VARCHAR;            -- the best training-free method (plain scoring): what deltas are against
    ALTER TABLE results ADD COLUMN delta_top1 DOUBLE;           -- top1 minus the baseline's
    ALTER TABLE results ADD COLUMN delta_top1_low DOUBLE;       -- its 95% interval: paired bootstrap over the test images
    ALTER TABLE results ADD COLUMN delta_top1_high DOUBLE;
    ALTER TABLE results ADD COLUMN delta_mean_per_class DOUBLE; -- mean_per_class minus the baseline's
    ALTER TABLE results ADD COLUMN delta_mean_per_class_low DOUBLE;  -- its 95% interval (each class's images resampled)
    ALTER TABLE results ADD COLUMN delta_mean_per_class_high DOUBLE;
    ALTER TABLE class_results ADD COLUMN delta_low DOUBLE;      -- delta's 95% interval: paired bootstrap over the class's images
    ALTER TABLE class_results ADD COLUMN delta_high DOUBLE;
    """,
    # 4 -> 5: the Prefect flow run behind each run (the flow run is named after run_id)
    """
    ALTER TABLE runs ADD COLUMN flow_run_id VARCHAR;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Generation:
    """One LLM sample, as stored."""

    key: str
    dataset: str
    class_name: str
    template: str
    template_hash: str
    model: str
    prompt: str
    params: dict
    sample_index: int
    raw_text: str | None
    description: str | None
    rejected: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    base_key: str | None = None  # None: the key itself (refresh round 0)
    refresh: int = 0


@dataclass
class LlmUsage:
    """What the generations a run used cost when they were made (whether by this run or an earlier one)."""

    generations: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # LLM time, as the backend measured it


def _open_error(path: Path, e: Exception) -> TextadaptError:
    msg = str(e)
    if "could not set lock" in msg.lower() or "conflicting lock" in msg.lower():
        return TextadaptError(
            f"{path} is in use by another process (a run writing to it?). Wait for it to finish, "
            f"or point TEXTADAPT_DB / --db at another file. DuckDB said: {msg.splitlines()[0]}"
        )
    return TextadaptError(f"{path}: cannot open as a textadapt cache (DuckDB said: {msg.splitlines()[0]})")


class Store:
    """The DuckDB cache file. One writer process at a time (DuckDB's rule); readers use read_only."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise TextadaptError(f"{self.path}: no cache file yet; run `textadapt run DATASET` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except (duckdb.IOException, duckdb.Error) as e:
            raise _open_error(self.path, e) from None
        self.read_only = read_only
        self._migrate()
        if not read_only:
            # DuckDB lets one process write a file at a time, and this one now does: a run still
            # marked running was cut off (killed, power loss) and will never finish.
            self.con.execute("UPDATE runs SET status = 'interrupted', error = 'the process stopped before the run finished' "
                             "WHERE status = 'running'")

    def _migrate(self) -> None:
        tables = {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "textadapt_meta" in tables:
            version = int(self.con.execute("SELECT value FROM textadapt_meta WHERE key = 'schema_version'").fetchone()[0])
        elif tables:
            self.con.close()
            raise TextadaptError(f"{self.path} is a DuckDB file but not a textadapt cache (it has tables {sorted(tables)[:5]}); refusing to touch it")
        else:
            version = 0
        if version > SCHEMA_VERSION:
            raise TextadaptError(f"{self.path} has schema version {version}, newer than this textadapt's {SCHEMA_VERSION}: upgrade textadapt")
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise TextadaptError(f"{self.path} has schema version {version}; open it once for writing to migrate it to {SCHEMA_VERSION}")
        self.con.execute("BEGIN TRANSACTION")
        if version == 0:
            self.con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            self.con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '0')")
        for sql in MIGRATIONS[version:]:
            self.con.execute(sql)
        self.con.execute("UPDATE textadapt_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        self.con.execute("COMMIT")
        # Put the schema in the file itself, not only in the write-ahead log: DuckDB 1.5.6 cannot
        # replay a log holding our views' definitions after a crash, and would refuse the file.
        self.con.execute("CHECKPOINT")

    def close(self) -> None:
        self.con.close()

    def __reduce__(self):
        # A Store sent to another process (a Dask worker, a subprocess) would be a second writer.
        raise TextadaptError(
            f"the cache {self.path} is written by one process only (DuckDB allows one writing process per file): "
            "a task that runs elsewhere must return its rows to the flow, which writes them"
        )

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- generations -----------------------------------------------------------------------

    def existing_generations(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        self.con.register("_wanted", pa.table({"key": keys}))
        try:
            return {r[0] for r in self.con.execute("SELECT g.key FROM generations g JOIN _wanted w USING (key)").fetchall()}
        finally:
            self.con.unregister("_wanted")

    def add_generation(self, g: Generation) -> None:
        """Insert one generation at once (autocommit): it survives a crash of what follows."""
        self.con.execute(
            "INSERT INTO generations (key, dataset, class_name, template, template_hash, model, prompt, params, "
            "sample_index, raw_text, description, rejected, prompt_tokens, completion_tokens, seconds, base_key, refresh) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [g.key, g.dataset, g.class_name, g.template, g.template_hash, g.model, g.prompt, json.dumps(g.params, sort_keys=True),
             g.sample_index, g.raw_text, g.description, g.rejected, g.prompt_tokens, g.completion_tokens, g.seconds,
             g.base_key or g.key, g.refresh],
        )

    def add_generations(self, rows: list[Generation]) -> None:
        """Insert many generations in one statement (imports: DuckDB is fast in bulk, slow row by row)."""
        if not rows:
            return
        cols = ["key", "dataset", "class_name", "template", "template_hash", "model", "prompt", "params", "sample_index",
                "raw_text", "description", "rejected", "prompt_tokens", "completion_tokens", "seconds", "base_key", "refresh"]
        data = {c: [getattr(g, c) for g in rows] for c in cols}
        data["params"] = [json.dumps(p, sort_keys=True) for p in data["params"]]
        data["base_key"] = [g.base_key or g.key for g in rows]
        types = {"sample_index": pa.int32(), "prompt_tokens": pa.int32(), "completion_tokens": pa.int32(), "seconds": pa.float64(),
                 "refresh": pa.int32()}
        self.con.register("_new", pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in data.items()}))
        try:
            self.con.execute(f"INSERT INTO generations ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _new ON CONFLICT DO NOTHING")
        finally:
            self.con.unregister("_new")

    def latest_rounds(self, base_keys: list[str]) -> dict[str, tuple[str, int]]:
        """base_key -> (key, refresh) of the newest stored round of each generation."""
        if not base_keys:
            return {}
        self.con.register("_wanted", pa.table({"base_key": base_keys}))
        try:
            rows = self.con.execute(
                "SELECT g.base_key, arg_max(g.key, g.refresh), max(g.refresh) FROM generations g JOIN _wanted w USING (base_key) "
                "GROUP BY g.base_key"
            ).fetchall()
        finally:
            self.con.unregister("_wanted")
        return {b: (k, r) for b, k, r in rows}

    def imported(self, dataset: str, source: str) -> list[tuple[str, str, str | None, str | None]]:
        """(key, class_name, description, rejected) of the latest file imported as ``source`` for ``dataset``."""
        return self.con.execute(
            "SELECT key, class_name, description, rejected FROM generations WHERE dataset = ? AND template = ? AND template_hash = "
            "(SELECT arg_max(template_hash, created_at) FROM generations WHERE dataset = ? AND template = ?) "
            "ORDER BY class_name, sample_index",
            [dataset, f"import/{source}", dataset, f"import/{source}"],
        ).fetchall()

    def generations(self, keys: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """key -> (description, rejected) for the given keys."""
        self.con.register("_wanted", pa.table({"key": keys}))
        try:
            rows = self.con.execute(
                "SELECT g.key, g.description, g.rejected FROM generations g JOIN _wanted w USING (key)"
            ).fetchall()
        finally:
            self.con.unregister("_wanted")
        return {k: (d, r) for k, d, r in rows}

    # -- embeddings ------------------------------------------------------------------------

    def get_embeddings(self, kind: str, backbone: str, hashes: list[str]) -> dict[str, np.ndarray]:
        table, col = _embedding_table(kind)
        if not hashes:
            return {}
        self.con.register("_wanted", pa.table({"h": hashes}))
        try:
            tbl = self.con.execute(
                f"SELECT e.{col}, e.embedding FROM {table} e JOIN _wanted w ON e.{col} = w.h WHERE e.backbone = ?", [backbone]
            ).fetch_arrow_table()
        finally:
            self.con.unregister("_wanted")
        if tbl.num_rows == 0:
            return {}
        emb = tbl.column("embedding").combine_chunks()
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        matrix = flat.reshape(tbl.num_rows, -1)
        return dict(zip(tbl.column(col).to_pylist(), matrix))

    def put_embeddings(self, kind: str, backbone: str, hashes: list[str], embeddings: np.ndarray, texts: list[str] | None = None) -> None:
        table, col = _embedding_table(kind)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        lists = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1]).cast(pa.list_(pa.float32()))
        data = {"backbone": [backbone] * len(hashes), col: hashes, "embedding": lists}
        if kind == "text":
            data["text"] = texts
        self.con.register("_new", pa.table(data))
        try:
            cols = ", ".join(data)
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _new ON CONFLICT DO NOTHING")
        finally:
            self.con.unregister("_new")

    def add_backbone(self, backbone: str, spec: str, arch: str, weights: str, untrained: bool) -> None:
        self.con.execute(
            "INSERT INTO backbones (backbone, spec, arch, weights, untrained) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [backbone, spec, arch, weights, untrained],
        )

    # -- runs and results ------------------------------------------------------------------

    def start_run(self, run_id: str, dataset: str, options: dict) -> None:
        self.con.execute(
            "INSERT INTO runs (run_id, dataset, status, options) VALUES (?, ?, 'running', ?)", [run_id, dataset, json.dumps(options)]
        )

    def update_run(self, run_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        self.con.execute("UPDATE runs SET status = ?, error = ?, finished_at = current_timestamp WHERE run_id = ?", [status, error, run_id])

    def link_generations(self, run_id: str, links: list[tuple[str, int, str | None]]) -> None:
        """Record which generations a run used: (key, class_index, excluded reason or None)."""
        keys, class_indices, excluded = (list(col) for col in zip(*links)) if links else ([], [], [])
        self.con.register("_links", pa.table({"run_id": pa.array([run_id] * len(keys), pa.string()), "key": pa.array(keys, pa.string()),
                                              "class_index": pa.array(class_indices, pa.int32()), "excluded": pa.array(excluded, pa.string())}))
        try:
            self.con.execute("INSERT INTO run_generations (run_id, key, class_index, excluded) "
                             "SELECT run_id, key, class_index, excluded FROM _links ON CONFLICT DO NOTHING")
        finally:
            self.con.unregister("_links")

    def llm_usage(self, run_id: str) -> dict[str, LlmUsage]:
        """Template set (``meta``, ``targeted``, ``import``...) -> tokens and LLM time of the generations the run used."""
        rows = self.con.execute(
            "SELECT split_part(g.template, '/', 1) AS template_set, count(*), coalesce(sum(g.prompt_tokens), 0), "
            "coalesce(sum(g.completion_tokens), 0), coalesce(sum(g.seconds), 0) "
            "FROM run_generations r JOIN generations g USING (key) WHERE r.run_id = ? GROUP BY ALL ORDER BY template_set",
            [run_id],
        ).fetchall()
        return {s: LlmUsage(int(n), int(p), int(c), float(t)) for s, n, p, c, t in rows}

    def save_result(self, run_id: str, method: str, kind: str, top1: float, mean_per_class: float, n_images: int,
                    per_class: list[tuple], **extra) -> None:
        """One method's row of ``results`` (``extra``: any other column, e.g. top5, losses) and its ``class_results``:
        (class_index, class_name, n_images, accuracy, delta[, delta_low, delta_high])."""
        row = {"run_id": run_id, "method": method, "kind": kind, "top1": top1, "mean_per_class": mean_per_class,
               "n_images": n_images, **extra}
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute(
            f"INSERT OR REPLACE INTO results ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )
        cols = ["run_id", "method", "class_index", "class_name", "n_images", "accuracy", "delta", "delta_low", "delta_high"]
        cols = cols[: 2 + len(per_class[0])] if per_class else cols
        self.con.executemany(
            f"INSERT OR REPLACE INTO class_results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [[run_id, method, *row] for row in per_class],
        )
        self.con.execute("COMMIT")

    def save_classifier(self, run_id: str, method: str, seed: int, weight: np.ndarray, classes: list[str],
                        log_prior: np.ndarray | None, beta: float | None) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO classifiers (run_id, method, seed, n_classes, dim, classes, weight, log_prior, beta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, method, seed, weight.shape[0], weight.shape[1], classes, weight.astype(np.float32).ravel().tolist(),
             None if log_prior is None else log_prior.astype(np.float32).tolist(), beta],
        )

    def classifier(self, run_id: str, method: str) -> tuple[int, np.ndarray, list[str], np.ndarray | None, float | None]:
        """(seed, weight, classes, log_prior, beta) of one stored classifier."""
        row = self.con.execute("SELECT seed, n_classes, dim, weight, classes, log_prior, beta FROM classifiers "
                               "WHERE run_id = ? AND method = ?", [run_id, method]).fetchone()
        if row is None:
            raise KeyError((run_id, method))
        seed, n, d, weight, classes, log_prior, beta = row
        log_prior = None if log_prior is None else np.asarray(log_prior, np.float32)
        return seed, np.asarray(weight, np.float32).reshape(n, d), classes, log_prior, beta

    def save_predictions(self, run_id: str, image_hashes: list[str], labels: np.ndarray,
                         predicted: dict[str, np.ndarray]) -> None:
        """A run's test images (``run_images``) and every method's (seeds, images) predicted classes (``predictions``),
        in one transaction, replacing what the run had stored. Bulk, through Arrow: ImageNet's 50,000 images x 30
        methods are 1.5 million rows."""
        n, methods = len(image_hashes), list(predicted)
        images = pa.table({"image_index": pa.array(np.arange(n, dtype=np.int32)),
                           "image_hash": pa.array(image_hashes, pa.string()), "label": pa.array(np.asarray(labels, np.int32))})
        per_image = [np.asarray(predicted[m], np.int32).reshape(-1, n).T for m in methods]  # (images, seeds) each
        values = np.concatenate([p.ravel() for p in per_image] or [np.zeros(0, np.int32)])
        lengths = np.concatenate([np.full(n, p.shape[1], np.int32) for p in per_image] or [np.zeros(0, np.int32)])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        rows = pa.table({
            "method": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(methods), dtype=np.int32), n)),
                                                     pa.array(methods, pa.string())),
            "image_index": pa.array(np.tile(np.arange(n, dtype=np.int32), len(methods))),
            "predicted": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        })
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute("DELETE FROM run_images WHERE run_id = ?", [run_id])
            self.con.execute("DELETE FROM predictions WHERE run_id = ?", [run_id])
            self.con.register("_images", images)
            self.con.execute("INSERT INTO run_images SELECT ?, image_index, image_hash, label FROM _images", [run_id])
            self.con.register("_predictions", rows)
            self.con.execute("INSERT INTO predictions SELECT ?, method, image_index, predicted FROM _predictions", [run_id])
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        finally:
            for name in ("_images", "_predictions"):
                self.con.unregister(name)

    def run_images(self, run_id: str) -> tuple[list[str], np.ndarray]:
        """(image hashes, labels) of the test images a run scored, in scoring order; ([], empty) if none is stored."""
        tbl = self.con.execute("SELECT image_hash, label FROM run_images WHERE run_id = ? ORDER BY image_index",
                               [run_id]).fetch_arrow_table()
        return tbl.column("image_hash").to_pylist(), tbl.column("label").to_numpy().astype(np.int64)

    def predictions(self, run_id: str, method: str) -> np.ndarray | None:
        """(seeds, images): a method's predicted class of every test image of the run, per seed; None if not stored."""
        tbl = self.con.execute("SELECT predicted FROM predictions WHERE run_id = ? AND method = ? ORDER BY image_index",
                               [run_id, method]).fetch_arrow_table()
        if tbl.num_rows == 0:
            return None
        lists = tbl.column("predicted").combine_chunks()
        return lists.flatten().to_numpy().astype(np.int64).reshape(tbl.num_rows, -1).T

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        try:
            cur = self.con.execute(query)
        except duckdb.Error as e:
            raise TextadaptError(f"SQL error: {e}") from None
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()


def _embedding_table(kind: str) -> tuple[str, str]:
    if kind == "text":
        return "text_embeddings", "text_hash"
    if kind == "image":
        return "image_embeddings", "image_hash"
    raise ValueError(kind)


@dataclass
class RunSummary:
    """One past run and its gain: best adapted top-1 minus best training-free top-1 (None if not scored)."""

    run_id: str
    dataset: str
    status: str
    started_at: object
    untrained: bool | None
    best_adapted: str | None
    adapted_top1: float | None
    best_zero_shot: str | None
    zero_shot_top1: float | None

    @property
    def gain(self) -> float | None:
        if self.adapted_top1 is None or self.zero_shot_top1 is None:
            return None
        return self.adapted_top1 - self.zero_shot_top1


def run_summaries(store: Store, dataset: str | None = None, limit: int = 20) -> list[RunSummary]:
    """The latest runs, newest first, from the ``runs``, ``results`` and ``backbones`` tables."""
    rows = store.con.execute(
        """
        SELECT r.run_id, r.dataset, r.status, r.started_at, b.untrained,
               arg_max(x.method, x.top1) FILTER (x.kind = 'adapted'), max(x.top1) FILTER (x.kind = 'adapted'),
               -- the baseline, as the harness picks it: training-free (zero-shot or descriptions), plain scoring
               arg_max(x.method, x.top1) FILTER (x.kind <> 'adapted' AND coalesce(x.scoring, 'plain') = 'plain'),
               max(x.top1) FILTER (x.kind <> 'adapted' AND coalesce(x.scoring, 'plain') = 'plain')
        FROM runs r LEFT JOIN results x USING (run_id) LEFT JOIN backbones b ON b.backbone = r.backbone
        WHERE ?::VARCHAR IS NULL OR r.dataset = ?
        GROUP BY ALL ORDER BY r.started_at DESC LIMIT ?
        """,
        [dataset, dataset, limit],
    ).fetchall()
    return [RunSummary(*row) for row in rows]
