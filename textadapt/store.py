"""The cache: one DuckDB file holding every generation, embedding, run and result, readable while a run writes.

The schema is a user interface (``docs/schema.md``, generated from this module by ``scripts/schema_doc.py``;
users query it with ``textadapt sql`` or any DuckDB client). It is versioned: ``MIGRATIONS[i]`` takes a
file from version i to i+1, and opening a file for writing applies the missing ones in one transaction.

DuckDB locks a file for a connection's whole life: a read-write connection shuts every other process
out, and read-only ones shut a writer out. A run writes for minutes to hours, exactly when users want
to look. So the writer never keeps the file open for writing. Beside the cache file ``CACHE``:

    CACHE             the stored rows (tables in schema ``stored``) and what users query (views in ``main``)
    CACHE.staging/    the rows written since the last fold, as Parquet files: one folder per batch
    CACHE.lock        held (POSIX lock) by the one process that writes; its pid and run are inside

The writer opens ``CACHE`` read-only, like any reader, and publishes each batch of rows atomically as
a new folder of Parquet files (written in ``staging/tmp``, fsynced, then renamed). Each table users query
(``generations``, ``runs``, ...) is a view: the stored rows plus the staged ones, one row per primary key
(``TABLES`` says which row a key keeps), so every client sees each batch as soon as it is published.
When no other process has the file open, at the writer's start and end (or ``fold()``), the writer takes
DuckDB's write lock to move the staged rows into the stored tables, oldest first, in transactions of at
most ``FOLD_BYTES`` of staged files, removing them as it goes; a reader arriving meanwhile waits for one
such step. It never waits for a reader: what it cannot fold now is folded later. Meanwhile it merges
staged batches (``FANOUT`` into 1, per level) to keep the number of files small, removing the merged ones
only while no other process has the file open. A crash loses at most the batch being written; a fold cut
short is redone (the views and the fold keep one row per key, so nothing is counted twice).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from textadapt import TextadaptError

STORED_V6 = """
    -- The content-addressed tables (TABLES: keep "first") have no PRIMARY KEY: the one writer keeps one row per key as
    -- it folds (DuckDB 1.5.6 rewrites an index whole at every checkpoint: folding into a table of a million rows would
    -- hold the file for seconds per step). The others keep theirs (a newer row replaces the stored one).
    CREATE SCHEMA stored;
    CREATE TABLE stored.generations (
        key VARCHAR NOT NULL, dataset VARCHAR NOT NULL, class_name VARCHAR NOT NULL, template VARCHAR NOT NULL,
        template_hash VARCHAR NOT NULL, model VARCHAR NOT NULL, prompt VARCHAR NOT NULL, params JSON NOT NULL,
        sample_index INTEGER NOT NULL, raw_text VARCHAR, description VARCHAR, rejected VARCHAR, prompt_tokens INTEGER,
        completion_tokens INTEGER, seconds DOUBLE, created_at TIMESTAMP, base_key VARCHAR,
        refresh INTEGER DEFAULT 0, run_id VARCHAR
    );
    CREATE TABLE stored.backbones (
        backbone VARCHAR NOT NULL, spec VARCHAR NOT NULL, arch VARCHAR NOT NULL, weights VARCHAR NOT NULL,
        untrained BOOLEAN NOT NULL, created_at TIMESTAMP
    );
    CREATE TABLE stored.text_embeddings (
        backbone VARCHAR NOT NULL, text_hash VARCHAR NOT NULL, text VARCHAR NOT NULL, embedding FLOAT[] NOT NULL,
        created_at TIMESTAMP
    );
    CREATE TABLE stored.image_embeddings (
        backbone VARCHAR NOT NULL, image_hash VARCHAR NOT NULL, embedding FLOAT[] NOT NULL,
        created_at TIMESTAMP
    );
    CREATE TABLE stored.runs (
        run_id VARCHAR PRIMARY KEY, dataset VARCHAR NOT NULL, status VARCHAR NOT NULL, options JSON NOT NULL,
        backbone VARCHAR, llm VARCHAR, llm_calls INTEGER, cached_generations INTEGER, text_encoder_calls INTEGER,
        report_path VARCHAR, error VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP,
        flow_run_id VARCHAR
    );
    CREATE TABLE stored.run_generations (
        run_id VARCHAR NOT NULL, key VARCHAR NOT NULL, class_index INTEGER NOT NULL, excluded VARCHAR,
        excluded_items INTEGER[]
    );
    CREATE TABLE stored.results (
        run_id VARCHAR NOT NULL, method VARCHAR NOT NULL, kind VARCHAR NOT NULL, top1 DOUBLE NOT NULL,
        mean_per_class DOUBLE NOT NULL, n_images INTEGER NOT NULL, n_texts INTEGER, train_seconds DOUBLE, losses DOUBLE[],
        top5 DOUBLE, top1_std DOUBLE, mean_per_class_std DOUBLE, seeds INTEGER[], top1_per_seed DOUBLE[], adapter VARCHAR,
        loss VARCHAR, scoring VARCHAR, text_set VARCHAR, baseline VARCHAR, delta_top1 DOUBLE, delta_top1_low DOUBLE,
        delta_top1_high DOUBLE, delta_mean_per_class DOUBLE, delta_mean_per_class_low DOUBLE, delta_mean_per_class_high DOUBLE,
        PRIMARY KEY (run_id, method)
    );
    CREATE TABLE stored.class_results (
        run_id VARCHAR NOT NULL, method VARCHAR NOT NULL, class_index INTEGER NOT NULL, class_name VARCHAR NOT NULL,
        n_images INTEGER NOT NULL, accuracy DOUBLE, delta DOUBLE, delta_low DOUBLE, delta_high DOUBLE,
        PRIMARY KEY (run_id, method, class_index)
    );
    CREATE TABLE stored.classifiers (
        run_id VARCHAR NOT NULL, method VARCHAR NOT NULL, seed INTEGER NOT NULL, n_classes INTEGER NOT NULL,
        dim INTEGER NOT NULL, classes VARCHAR[] NOT NULL, weight FLOAT[] NOT NULL, log_prior FLOAT[], beta DOUBLE,
        PRIMARY KEY (run_id, method)
    );
    -- Per-run tables (TABLES: keep "run"), without a primary key: an index over millions of rows per run (ImageNet) would
    -- cost memory and time, and a run's rows are written once, together (newer ones replace all of the run's).
    CREATE TABLE stored.run_images (
        run_id VARCHAR NOT NULL, image_index INTEGER NOT NULL, image_hash VARCHAR NOT NULL, label INTEGER NOT NULL
    );
    CREATE TABLE stored.predictions (
        run_id VARCHAR NOT NULL, method VARCHAR NOT NULL, image_index INTEGER NOT NULL, predicted INTEGER[] NOT NULL
    );
"""

# 6 -> 7: trained heads, content-addressed like generations and embeddings (TABLES: keep "first"; textadapt/head_cache.py)
TRAINED_HEADS_V7 = """
    CREATE TABLE stored.trained_heads (
        key VARCHAR NOT NULL, adapter VARCHAR NOT NULL, loss VARCHAR NOT NULL, seed INTEGER NOT NULL,
        backbone VARCHAR NOT NULL, settings JSON NOT NULL, n_classes INTEGER NOT NULL, dim INTEGER NOT NULL,
        weight FLOAT[] NOT NULL, losses DOUBLE[], labelled_mass DOUBLE[], seconds DOUBLE, device VARCHAR,
        run_id VARCHAR, created_at TIMESTAMP
    );
"""
STORED_V7 = STORED_V6 + TRAINED_HEADS_V7

# The tables of a new file: the current schema, written whole. DuckDB 1.5.6 cannot replay a write-ahead log that alters a
# table with a function default (ADD COLUMN, COMMENT ON COLUMN: "GetDefaultDatabase with no default database set") and
# then refuses the file, so a new file replays no history, and the stored tables have no current_timestamp default (the
# writer sets created_at and started_at: STORED_AT). A migration that changes the tables writes the new whole schema
# here too; tests/test_store.py checks that a new file and a migrated one have the same.
SCHEMA = STORED_V7

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
    # 5 -> 6: the stored rows move to schema `stored` (STORED_V6), and the names users query become views (installed by
    # Store: the stored rows plus the staged ones). New: generations.run_id (the run that asked the LLM; for
    # older rows, the run that was writing when the row was stored and used it, where there is one: only one
    # process wrote at a time), runs.flow_run_id, run_generations.excluded_items. Column meanings: TABLE_DOCS.
    "DROP VIEW descriptions;\n"
    + STORED_V6
    + """
    INSERT INTO stored.generations BY NAME
        SELECT g.*, w.run_id FROM main.generations g LEFT JOIN (
            SELECT rg.key, arg_max(r.run_id, r.started_at) AS run_id
            FROM main.run_generations rg JOIN main.runs r USING (run_id) JOIN main.generations x USING (key)
            WHERE x.template NOT LIKE 'import/%' AND x.created_at >= r.started_at
              AND (r.finished_at IS NULL OR x.created_at <= r.finished_at)
            GROUP BY rg.key
        ) w USING (key);
    INSERT INTO stored.backbones BY NAME SELECT * FROM main.backbones;
    INSERT INTO stored.text_embeddings BY NAME SELECT * FROM main.text_embeddings;
    INSERT INTO stored.image_embeddings BY NAME SELECT * FROM main.image_embeddings;
    INSERT INTO stored.runs BY NAME SELECT * FROM main.runs;
    INSERT INTO stored.run_generations BY NAME SELECT * FROM main.run_generations;
    INSERT INTO stored.results BY NAME SELECT * FROM main.results;
    INSERT INTO stored.class_results BY NAME SELECT * FROM main.class_results;
    INSERT INTO stored.classifiers BY NAME SELECT * FROM main.classifiers;
    INSERT INTO stored.run_images BY NAME SELECT * FROM main.run_images;
    INSERT INTO stored.predictions BY NAME SELECT * FROM main.predictions;
    DROP TABLE main.generations; DROP TABLE main.backbones; DROP TABLE main.text_embeddings; DROP TABLE main.image_embeddings;
    DROP TABLE main.runs; DROP TABLE main.run_generations; DROP TABLE main.results; DROP TABLE main.class_results;
    DROP TABLE main.classifiers; DROP TABLE main.run_images; DROP TABLE main.predictions;
    """,
    # 6 -> 7: trained heads (Store.trained_heads), so that a head whose inputs are unchanged is read back, not retrained
    TRAINED_HEADS_V7,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class StagedTable:
    """A stored table that writers stage rows for, and how one row per primary key is chosen."""

    key: tuple[str, ...]
    keep: str  # "first": content-addressed, the row stored first stays; "last": a newer row replaces it; "run": a run's
    #            rows are written together, and a newer batch of them replaces all the run's rows (key: run_id)


TABLES: dict[str, StagedTable] = {
    "generations": StagedTable(("key",), "first"),
    "backbones": StagedTable(("backbone",), "first"),
    "text_embeddings": StagedTable(("backbone", "text_hash"), "first"),
    "image_embeddings": StagedTable(("backbone", "image_hash"), "first"),
    "runs": StagedTable(("run_id",), "last"),
    "run_generations": StagedTable(("run_id", "key"), "first"),
    "results": StagedTable(("run_id", "method"), "last"),
    "class_results": StagedTable(("run_id", "method", "class_index"), "last"),
    "classifiers": StagedTable(("run_id", "method"), "last"),
    "run_images": StagedTable(("run_id",), "run"),
    "predictions": StagedTable(("run_id",), "run"),
    "trained_heads": StagedTable(("key",), "first"),
}

# What each table and column means: written into the file (COMMENT ON) and into docs/schema.md.
TABLE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "generations": (
        "Every LLM sample, accepted or not, and every imported description.",
        {
            "key": "content address: sha256 of dataset, LLM identity, template hash, prompt, sampling parameters and sample index "
            "(round r of --refresh: sha256(base_key + ':refresh:' + r)); imports: sha256 of dataset, source, file hash, "
            "class, position",
            "dataset": "dataset spec name",
            "class_name": "the class asked about ('' for a meta-prompting stage-1 row, template meta/questions)",
            "template": "prompt template SET/NAME (targeted/look); meta/questions/N: a question the LLM wrote; import/SOURCE: an "
            "imported file",
            "template_hash": "sha256 of the template's source (of the file, for imports): editing a template changes it",
            "model": "LLM identity, e.g. llama-cpp:SmolLM2-135M-Instruct.Q4_1.gguf@sha256:...; import:SOURCE for imports",
            "prompt": "the exact text sent to the LLM ('' for imports)",
            "params": "sampling parameters (temperature, max tokens, stop strings)",
            "sample_index": "0 .. samples-1",
            "raw_text": "the answer as received (bytes that were not UTF-8 as U+FFFD; an answer over 20,000 characters is cut there "
            "and ends with [... cut: N characters in all])",
            "description": "the cleaned answer, one item per line for parse: list and parse: questions templates; NULL when rejected",
            "rejected": "why it is not used (empty, refusal, too short, too long, no answer, no items, no questions ...); "
            "NULL: accepted",
            "prompt_tokens": "prompt tokens, as the LLM server counted them",
            "completion_tokens": "completion tokens, as the LLM server counted them",
            "seconds": "time the LLM took for this answer",
            "created_at": "when it was stored",
            "base_key": "the key of refresh round 0 (equal to key unless refreshed)",
            "refresh": "the refresh round: 0, then 1, 2 ... for each --refresh",
            "run_id": "the run that asked the LLM for it; NULL for imports, and for rows stored before schema 6 by no run that "
            "used them",
        },
    ),
    "backbones": (
        "Every image/text encoder a run used; its identity keys the embedding cache.",
        {
            "backbone": "identity: ARCH@sha256 of the weights (every tensor) and the image preprocessing",
            "spec": "as asked for, e.g. ViT-B-32:openai",
            "arch": "open_clip architecture",
            "weights": "pretrained tag, hub id, file, or random",
            "untrained": "random weights: accuracies measured with it mean nothing",
            "created_at": "when it was first stored",
        },
    ),
    "text_embeddings": (
        "Cached text embeddings, by backbone and text.",
        {
            "backbone": "backbones.backbone",
            "text_hash": "sha256 of the text",
            "text": "the text encoded",
            "embedding": "L2-normalised",
            "created_at": "when it was stored",
        },
    ),
    "image_embeddings": (
        "Cached image embeddings, by backbone and image bytes.",
        {
            "backbone": "backbones.backbone",
            "image_hash": "sha256 of the image's bytes",
            "embedding": "L2-normalised",
            "created_at": "when it was stored",
        },
    ),
    "runs": (
        "One row per textadapt run.",
        {
            "run_id": "DATASET-YYYYMMDD-HHMMSS-xxxx (also the report's file name)",
            "dataset": "dataset spec name",
            "status": "running, completed, failed, or interrupted (the process stopped: the next writer marks it, as it holds the "
            "cache's writer lock, so no other run is alive)",
            "options": "every run option",
            "backbone": "backbones.backbone",
            "llm": "LLM identity ('none (no template set)' when no LLM was needed)",
            "llm_calls": "generations this run asked the LLM for (0: all from the cache)",
            "cached_generations": "generations served from the cache",
            "text_encoder_calls": "texts this run had to encode (0: all from the cache)",
            "report_path": "the Markdown report (the HTML page is beside it: same name, .html)",
            "error": "why it failed",
            "started_at": "when it started",
            "finished_at": "when it completed or failed",
            "flow_run_id": "the Prefect flow run's id",
        },
    ),
    "run_generations": (
        "Which generations a run used, as which class; any past run can be reproduced from these rows.",
        {
            "run_id": "runs.run_id",
            "key": "generations.key (the refresh round the run used)",
            "class_index": "the class in the dataset spec's order (-1: a meta-prompting question row); labels always come from "
            "the spec",
            "excluded": "why the run trained on none of it: 'duplicate of KEY' when every item repeats, after normalising case and "
            "punctuation, an earlier description of the same class and template set; NULL otherwise",
            "excluded_items": "the items (1-based lines of the description) the run left out as such duplicates; NULL: none",
        },
    ),
    "results": (
        "One row per method per run.",
        {
            "run_id": "runs.run_id",
            "method": "e.g. zero-shot:class-name, waffle, cupl:SET, tap-head:SET, zs-head+ot:SET/ig, captioner (README, methods)",
            "kind": "zero-shot, descriptions (CuPL, DCLIP) or adapted",
            "top1": "top-1 accuracy, mean over seeds",
            "mean_per_class": "mean per-class recall, mean over seeds",
            "n_images": "test images scored",
            "n_texts": "training descriptions (adapted heads)",
            "train_seconds": "training time, all seeds",
            "losses": "the first seed's training loss, every 10 steps and the last",
            "top5": "top-5 accuracy; NULL with 5 classes or fewer",
            "top1_std": "population standard deviation of top-1 over seeds; NULL for one seed",
            "mean_per_class_std": "the same for mean_per_class",
            "seeds": "training seeds, or WaffleCLIP's draws",
            "top1_per_seed": "top-1 of each seed",
            "adapter": "tap-head, zs-head, residual, prompt; NULL when training-free",
            "loss": "ce or ot",
            "scoring": "plain or ig",
            "text_set": "the description set or source it was built from",
            "baseline": "the best training-free method (plain scoring): what the deltas are against",
            "delta_top1": "top1 minus the baseline's",
            "delta_top1_low": "its 95% interval, low end: paired bootstrap over the test images",
            "delta_top1_high": "its high end",
            "delta_mean_per_class": "mean_per_class minus the baseline's",
            "delta_mean_per_class_low": "its 95% interval, low end (each class's images resampled)",
            "delta_mean_per_class_high": "its high end",
        },
    ),
    "class_results": (
        "Per class, per method, per run.",
        {
            "run_id": "runs.run_id",
            "method": "results.method",
            "class_index": "the class in the dataset spec's order",
            "class_name": "the class",
            "n_images": "test images of the class",
            "accuracy": "recall of the class, mean over seeds",
            "delta": "accuracy minus the best training-free baseline's on this class (training-free, plain scoring, best top-1)",
            "delta_low": "delta's 95% interval, low end: paired bootstrap over the class's images",
            "delta_high": "its high end",
        },
    ),
    "classifiers": (
        "Every classifier a run built: what `textadapt export` writes.",
        {
            "run_id": "runs.run_id",
            "method": "results.method, /ig included (also for --train-only runs, which have no results)",
            "seed": "the first seed's classifier is kept",
            "n_classes": "rows of weight",
            "dim": "columns of weight",
            "classes": "class names, in the order of the weight's rows",
            "weight": "(n_classes, dim) row-major: logits = normalised image embedding @ weight.T",
            "log_prior": "IG scoring subtracts beta times it; NULL: plain scoring",
            "beta": "IG scoring's weight",
        },
    ),
    "run_images": (
        "The test images a run scored, one row each, in scoring order.",
        {
            "run_id": "runs.run_id",
            "image_index": "0, 1, ... in the order every method was scored in",
            "image_hash": "image_embeddings.image_hash",
            "label": "the true class: class_results.class_index",
        },
    ),
    "predictions": (
        "Every scored method's prediction for every test image of a run (`textadapt compare`).",
        {
            "run_id": "runs.run_id",
            "method": "results.method",
            "image_index": "run_images.image_index",
            "predicted": "predicted class index per seed (results.seeds' order; one: no seed)",
        },
    ),
    "trained_heads": (
        "Every adapter head a run trained, by the inputs that determine its weights: a run whose head has the same key "
        "reads it back instead of training it (textadapt/head_cache.py).",
        {
            "key": "content address: sha256 of settings (training scheme, adapter, loss, recipe with its seed, OT settings, "
            "logit scale, classes, backbone, torch version, device type) and the exact bytes of the training embeddings, "
            "labels and the weights it starts from (head_cache.head_key)",
            "adapter": "tap-head, zs-head, tap-residual, taskres, tap-coop or protext",
            "loss": "ce, ot or l1 (results.loss)",
            "seed": "the training seed",
            "backbone": "backbones.backbone",
            "settings": "everything in the key but the arrays, readable: the recipe's fields, OT settings, torch version ...",
            "n_classes": "rows of weight",
            "dim": "columns of weight",
            "weight": "(n_classes, dim) row-major: logits = normalised image embedding @ weight.T (logit scale included)",
            "losses": "the training loss every 10 steps and the last, when it was trained",
            "labelled_mass": "+ot only: per step, the mean share of a description's OT plan row on its labelled class",
            "seconds": "training time, when it was trained",
            "device": "where it was trained (cpu, cuda:0 ...)",
            "run_id": "the run that trained it (NULL: trained outside a run)",
            "created_at": "when it was stored",
        },
    ),
}

META_DOC = (
    "textadapt's own bookkeeping.",
    {
        "key": "schema_version (MIGRATIONS applied), staging (the folder of staged rows the views read), views (hash of their "
        "definitions)",
        "value": "its value",
    },
)


@dataclass(frozen=True)
class View:
    """A view shaped for one question users ask."""

    name: str
    doc: str
    columns: dict[str, str]
    sql: str


RUN_RESULTS_COLUMNS = {
    "run_id": "runs.run_id",
    "dataset": "dataset",
    "status": "runs.status",
    "started_at": "runs.started_at",
    "finished_at": "runs.finished_at",
    "backbone": "backbone identity",
    "backbone_spec": "as asked for, e.g. ViT-B-32:openai",
    "untrained": "random weights: the accuracies mean nothing",
    "llm": "LLM identity",
    "method": "results.method",
    "kind": "zero-shot, descriptions or adapted",
    "adapter": "results.adapter",
    "loss": "results.loss",
    "scoring": "results.scoring",
    "text_set": "results.text_set",
    "top1": "mean over seeds",
    "top1_std": "over seeds",
    "top5": "top-5 accuracy",
    "mean_per_class": "mean over seeds",
    "mean_per_class_std": "over seeds",
    "top1_per_seed": "per seed",
    "seeds": "results.seeds",
    "n_images": "test images",
    "n_texts": "training descriptions",
    "train_seconds": "all seeds",
    "options": "every run option",
}

VIEWS: list[View] = [
    View(
        "descriptions",
        "The accepted generations, one row per description (a list answer gives several); every version.",
        {
            "key": "generations.key",
            "dataset": "dataset",
            "class_name": "class",
            "template": "SET/NAME",
            "model": "LLM identity",
            "description": "one description",
            "created_at": "when its generation was stored",
        },
        """
    SELECT key, dataset, class_name, template, model, unnest(string_split(description, chr(10))) AS description, created_at
    FROM generations WHERE rejected IS NULL
    """,
    ),
    View(
        "current_descriptions",
        "The descriptions of the current version of each template: for each dataset and template, the template version "
        "(template_hash) and LLM last generated or used by a run, and of each generation its newest --refresh round. What a "
        "run with the same templates and LLM would train on; after a template edit, only the edited version's.",
        {
            "key": "generations.key",
            "dataset": "dataset",
            "class_name": "class",
            "template": "SET/NAME",
            "template_hash": "the current version of the template",
            "model": "the LLM identity of the current version",
            "refresh": "the newest refresh round",
            "item": "the description's line in its generation (1-based)",
            "description": "one description",
            "created_at": "when its generation was stored",
        },
        """
    WITH version_seen AS (  -- each (template version, LLM) of a dataset's template, and when it was last generated or used
        SELECT dataset, template, template_hash, model, max(seen_at) AS seen_at FROM (
            SELECT dataset, template, template_hash, model, created_at AS seen_at FROM generations
            UNION ALL
            SELECT g.dataset, g.template, g.template_hash, g.model, r.started_at
            FROM run_generations rg JOIN runs r USING (run_id) JOIN generations g USING (key)
        ) GROUP BY ALL
    ), current_version AS (
        SELECT * FROM version_seen
        QUALIFY row_number() OVER (PARTITION BY dataset, template ORDER BY seen_at DESC, template_hash, model) = 1
    ), newest_round AS (
        SELECT g.* FROM generations g JOIN current_version USING (dataset, template, template_hash, model)
        QUALIFY refresh = max(refresh) OVER (PARTITION BY base_key)
    )
    SELECT key, dataset, class_name, template, template_hash, model, refresh,
           generate_subscripts(string_split(description, chr(10)), 1) AS item,
           unnest(string_split(description, chr(10))) AS description, created_at
    FROM newest_round WHERE rejected IS NULL
    """,
    ),
    View(
        "run_descriptions",
        "Every description each run was given for a class, and whether it trained on it.",
        {
            "run_id": "runs.run_id",
            "dataset": "dataset",
            "class_index": "the class in the spec's order",
            "class_name": "class",
            "template_set": "targeted, generic, ..., import for imported sources",
            "template": "SET/NAME or import/SOURCE",
            "key": "generations.key",
            "item": "the description's line in its generation (1-based)",
            "description": "one description",
            "used": "the run trained on it (false: left out as a duplicate)",
            "excluded": "why not: run_generations.excluded, or 'duplicate' for one item of a list answer",
        },
        """
    SELECT rg.run_id, g.dataset, rg.class_index, g.class_name, split_part(g.template, '/', 1) AS template_set, g.template,
           g.key, g.item, g.description,
           rg.excluded IS NULL AND NOT list_contains(coalesce(rg.excluded_items, []::INTEGER[]), g.item) AS used,
           coalesce(rg.excluded, CASE WHEN list_contains(rg.excluded_items, g.item) THEN 'duplicate' END) AS excluded
    FROM run_generations rg JOIN (
        SELECT key, dataset, class_name, template, unnest(string_split(description, chr(10))) AS description,
               generate_subscripts(string_split(description, chr(10)), 1) AS item
        FROM generations WHERE rejected IS NULL
    ) g USING (key)
    WHERE rg.class_index >= 0
    """,
    ),
    View(
        "run_results",
        "results, with each run's dataset, backbone, LLM, times and status.",
        RUN_RESULTS_COLUMNS,
        """
    SELECT x.run_id, r.dataset, r.status, r.started_at, r.finished_at, r.backbone, b.spec AS backbone_spec, b.untrained, r.llm,
           x.method, x.kind, x.adapter, x.loss, x.scoring, x.text_set, x.top1, x.top1_std, x.top5, x.mean_per_class,
           x.mean_per_class_std, x.top1_per_seed, x.seeds, x.n_images, x.n_texts, x.train_seconds, r.options
    FROM results x JOIN runs r USING (run_id) LEFT JOIN backbones b ON b.backbone = r.backbone
    """,
    ),
    View(
        "latest_results",
        "For each dataset, backbone and method, its result in the newest completed run.",
        RUN_RESULTS_COLUMNS,
        """
    SELECT * FROM run_results WHERE status = 'completed'
    QUALIFY row_number() OVER (PARTITION BY dataset, backbone, method ORDER BY started_at DESC, run_id DESC) = 1
    """,
    ),
    View(
        "run_llm_usage",
        "What each run itself spent on the LLM: the generations it asked for (a run served entirely from the cache spent 0).",
        {
            "run_id": "runs.run_id",
            "dataset": "dataset",
            "status": "runs.status",
            "llm": "LLM identity",
            "llm_calls": "answers it asked the LLM for and stored (accepted or not)",
            "rejected": "of which rejected by cleaning",
            "prompt_tokens": "prompt tokens",
            "completion_tokens": "completion tokens",
            "llm_seconds": "LLM time",
        },
        """
    SELECT r.run_id, r.dataset, r.status, r.llm, count(g.key) AS llm_calls,
           count(g.key) FILTER (g.rejected IS NOT NULL) AS rejected,
           coalesce(sum(g.prompt_tokens), 0)::BIGINT AS prompt_tokens,
           coalesce(sum(g.completion_tokens), 0)::BIGINT AS completion_tokens,
           coalesce(sum(g.seconds), 0) AS llm_seconds
    FROM runs r LEFT JOIN generations g ON g.run_id = r.run_id
    GROUP BY r.run_id, r.dataset, r.status, r.llm
    """,
    ),
]


# The columns of generations a Generation fills (the others: created_at, the writer's)
GENERATION_COLUMNS = [
    "key",
    "dataset",
    "class_name",
    "template",
    "template_hash",
    "model",
    "prompt",
    "params",
    "sample_index",
    "raw_text",
    "description",
    "rejected",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "base_key",
    "refresh",
    "run_id",
]


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
    run_id: str | None = None  # the run that asked the LLM for it (None: an import)


@dataclass
class StoredHead:
    """One trained adapter head, as stored in ``trained_heads`` (textadapt/head_cache.py makes and reads them)."""

    key: str
    adapter: str
    loss: str
    seed: int
    backbone: str
    settings: dict
    weight: np.ndarray  # (classes, dim), float32
    losses: list[float]
    seconds: float
    device: str
    labelled_mass: list[float] | None = None
    run_id: str | None = None  # None: this writer's run, if it has one started


@dataclass
class LlmUsage:
    """Generations, tokens and LLM time (as the backend measured it)."""

    generations: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def _lock_conflict(e: Exception) -> bool:
    msg = str(e).lower()
    return (
        "could not set lock" in msg or "conflicting lock" in msg or "different configuration than existing connections" in msg
    )  # this process has it open read-only


def _open_error(path: Path, e: Exception) -> TextadaptError:
    msg = str(e)
    if _lock_conflict(e):
        return TextadaptError(
            f"{path} is in use by another process, which has it open for writing (DuckDB said: {msg.splitlines()[0]}). "
            f"Close that program, or point TEXTADAPT_DB / --db at another file."
        )
    return TextadaptError(f"{path}: cannot open as a textadapt cache (DuckDB said: {msg.splitlines()[0]})")


def _literal(value: object) -> str:
    """A SQL string literal (for what DuckDB takes no parameter in: file names in read_parquet, COMMENT ON)."""
    return "'" + str(value).replace("'", "''") + "'"


def _other_process_has_open(fd: int) -> bool:
    """Whether another process holds a DuckDB lock on the file open as ``fd`` (DuckDB locks a file with fcntl for a
    connection's whole life: shared when read-only). F_GETLK asks without taking a lock, so no reader is ever refused
    by asking. Where the layout of ``struct flock`` is not known here, assume one does."""
    if not sys.platform.startswith("linux"):
        return True
    layout = "hhqqi4x"  # short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (x86_64, aarch64)
    got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    return struct.unpack(layout, got)[0] != fcntl.F_UNLCK


class _WriterLock:
    """The one-writer guarantee across processes: a POSIX lock on CACHE.lock, held for the writer's whole life and
    released by the system when the process ends, however it ends. Not inherited by child processes."""

    _held: set[str] = set()  # in this process (POSIX locks do not exclude the process that holds them)

    def __init__(self, path: Path):
        self.path = Path(f"{path}.lock")
        if str(self.path) in self._held:
            raise TextadaptError(f"{path} is in use by another process: this process is already writing to it")
        self.created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace")
            os.close(self.fd)
            raise TextadaptError(
                f"{path} is in use by another process: {self._describe(holder)} is writing to it (one writer at "
                "a time). Wait for it to finish, or point TEXTADAPT_DB / --db at another file."
            ) from None
        self._held.add(str(self.path))
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
        }
        self._write()

    @staticmethod
    def _describe(holder: str) -> str:
        try:
            h = json.loads(holder)
            return (
                f"pid {h['pid']} on {h['host']} ({h['command']!r}, since {h['since']}"
                + (f", run {h['run_id']}" if h.get("run_id") else "")
                + ")"
            )
        except (ValueError, KeyError, TypeError):
            return "a textadapt process"

    def _write(self) -> None:
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def note(self, **info) -> None:
        self.info.update(info)
        self._write()

    def release(self, remove: bool = False) -> None:
        """``remove``: the file too (a cache refused at opening: not ours to write, so no writer can be there)."""
        os.ftruncate(self.fd, 0)
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # releases the lock
        self._held.discard(str(self.path))


FANOUT = 16  # staged batches merged into one, per level
FOLD_BYTES = 16 << 20  # staged Parquet folded per hold of DuckDB's write lock: what a reader may wait for
STORED_AT = {"created_at", "started_at"}  # set to the time a row is written, when not given
ANCHOR = "anchor"  # a staged folder holding an empty file per table: a glob that matches no file is an error in DuckDB


class Store:
    """The DuckDB cache file. ``Store(path)`` is the one writer (refused while another process writes);
    ``Store(path, read_only=True)`` is a reader. Both see every row written so far."""

    def __init__(self, path: Path, read_only: bool = False, wait: float = 60.0):
        self.path = Path(path).absolute()
        self.staging = Path(f"{self.path}.staging")
        self.read_only = read_only
        self.wait = wait  # seconds to wait while another process holds the file for writing (a fold)
        self._lock = threading.RLock()  # one statement at a time on the connection
        self._writer: _WriterLock | None = None
        self._probe: int | None = None
        self._run: str | None = None  # the run this writer is writing (start_run .. finish_run)
        self.con: duckdb.DuckDBPyConnection | None = None
        if read_only:
            if not self.path.exists():
                raise TextadaptError(f"{self.path}: no cache file yet; run `textadapt run DATASET` first")
            self.con = self._connect(read_only=True, wait=wait)
            try:
                self._check_version(self.con)
                self._use_current_views(self.con)
            except BaseException:
                self.con.close()
                raise
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _WriterLock(self.path)
        try:
            self._upgrade(wait)
            self.con = self._connect(read_only=True, wait=wait)
            self._probe = os.open(self.path, os.O_RDONLY)  # for F_GETLK; closed only after DuckDB's connection (POSIX locks)
            self._load_columns(self.con)
            self._use_current_views(self.con)
            self._scan_staging()
            self.fold()  # what an earlier writer could not fold (a reader had the file open, or it was killed)
            # This process holds the writer lock, so a run still marked running was cut off (killed, power loss) and will
            # never finish.
            running = [r for (r,) in self.con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()]
            if running:
                marked = self._query_rows(
                    "SELECT * REPLACE ('interrupted' AS status, 'the process stopped before the run "
                    "finished' AS error) FROM runs WHERE list_contains(?, run_id)",
                    [running],
                )
                self._stage(("runs", marked))
        except BaseException:
            self._release(refused=True)
            raise

    # -- opening, versions and views -------------------------------------------------------------

    def _connect(self, read_only: bool, wait: float) -> duckdb.DuckDBPyConnection:
        """A connection, waiting up to ``wait`` seconds while another process holds the file for writing."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as e:
                if not _lock_conflict(e) or time.monotonic() >= deadline:
                    raise _open_error(self.path, e) from None
                time.sleep(0.02)

    def _load_columns(self, con: duckdb.DuckDBPyConnection) -> None:
        """(name, type, default) of each stored table's columns, in order: what a staged file holds."""
        self._columns: dict[str, list[tuple[str, str, str | None]]] = {}
        for t, *column in con.execute(
            "SELECT table_name, column_name, data_type, column_default FROM duckdb_columns() "
            "WHERE schema_name = 'stored' ORDER BY table_name, column_index"
        ).fetchall():
            self._columns.setdefault(t, []).append(tuple(column))
        self._schemas = {t: con.execute(f"SELECT * FROM stored.{t} LIMIT 0").to_arrow_table().schema for t in TABLES}
        self._defaults = {
            t: {c: con.execute(f"SELECT CAST({d} AS {ty})").fetchone()[0] for c, ty, d in columns if d is not None}
            for t, columns in self._columns.items()
        }

    def _version(self, con: duckdb.DuckDBPyConnection) -> int:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
        if "textadapt_meta" in tables:
            return int(con.execute("SELECT value FROM textadapt_meta WHERE key = 'schema_version'").fetchone()[0])
        if tables:
            raise TextadaptError(
                f"{self.path} is a DuckDB file but not a textadapt cache (it has tables {sorted(tables)[:5]}); "
                "refusing to touch it"
            )
        return 0

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> int:
        version = self._version(con)
        if version > SCHEMA_VERSION:
            raise TextadaptError(
                f"{self.path} has schema version {version}, newer than this textadapt's {SCHEMA_VERSION}: upgrade textadapt"
            )
        if version < SCHEMA_VERSION and self.read_only:
            raise TextadaptError(
                f"{self.path} has schema version {version}; open it once for writing to migrate it to {SCHEMA_VERSION}"
            )
        return version

    def _upgrade(self, wait: float) -> None:
        """Create or migrate the file, fold what earlier writers staged, and install the views: with DuckDB's write lock,
        which a new or older file needs (waiting up to ``wait`` seconds for readers), and the rest takes only if free now."""
        needed = not self.path.exists()
        if not needed:
            con = self._connect(read_only=True, wait=wait)
            try:
                needed = self._check_version(con) < SCHEMA_VERSION
            finally:
                con.close()
        con = self._exclusive(wait if needed else 0)
        if con is None:
            return
        try:
            version = self._check_version(con)
            if 6 <= version < SCHEMA_VERSION:  # fold first, with the schema the staged rows were written with
                self._fold_into(con, *self._staged())
            if version < SCHEMA_VERSION:
                con.execute("BEGIN TRANSACTION")
                if version == 0:
                    con.execute("CREATE TABLE textadapt_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
                    con.execute("INSERT INTO textadapt_meta VALUES ('schema_version', '0')")
                    con.execute(SCHEMA)
                else:
                    for sql in MIGRATIONS[version:]:
                        con.execute(sql)
                con.execute("UPDATE textadapt_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
                con.execute("COMMIT")
                con.execute("CHECKPOINT")  # at once: DuckDB 1.5.6 cannot replay a log holding a migration's ALTER TABLE
            self._load_columns(con)
            self._end_session(con)
        finally:
            con.close()

    def _end_session(self, con: duckdb.DuckDBPyConnection) -> None:
        """Before giving up DuckDB's write lock: this textadapt's views, if the file lacks them, and everything in the file
        itself, not only in its write-ahead log."""
        if self._views_hash() != self._meta(con, "views"):
            self._install_views(con)
        con.execute("CHECKPOINT")

    @staticmethod
    def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
        row = con.execute("SELECT value FROM textadapt_meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def _view_sqls(self) -> list[tuple[str, str]]:
        """(name, SELECT) of every view, in dependency order: the staged tables' first.

        A staged row carries _seq (the batch that wrote it) and _copy (the file holding it: a merge copies rows, and
        merged batches stay until no reader has the file open). A content-addressed table's rows are picked per key on
        the key columns alone (the first write, its oldest copy), then read whole: cheaper than ranking wide rows (the two
        reads list the folder separately, so a batch published in between may show at the next query only). The other
        tables are small, and one read of their staged rows both hides the stored rows they replace and shows them."""
        out = []
        for name, t in TABLES.items():
            key = ", ".join(t.key)
            files = f"read_parquet({_literal(self.staging / '*' / f'{name}.parquet')})"
            if t.keep == "first":  # a stored row stays; staged rows add the keys not stored yet
                # the first write; of its copies the oldest, which every read of the folder that lists the newer lists too
                pick = f"SELECT {key}, min(struct_pack(s := _seq, c := _copy)).c AS _copy FROM {files} GROUP BY ALL"
                sql = (
                    f"SELECT * FROM stored.{name} UNION ALL BY NAME SELECT s.* EXCLUDE (_seq, _copy) FROM {files} s "
                    f"SEMI JOIN ({pick}) p USING ({key}, _copy) ANTI JOIN stored.{name} t USING ({key})"
                )
            elif t.keep == "run":  # a run's newest staged batch replaces all its stored rows
                sql = (
                    f"WITH staged AS MATERIALIZED ({self._dedup(name, None)}) "
                    f"SELECT t.* FROM stored.{name} t ANTI JOIN (SELECT DISTINCT run_id FROM staged) USING (run_id) "
                    f"UNION ALL BY NAME SELECT * EXCLUDE (_seq, _copy) FROM staged"
                )
            else:  # a staged row replaces the stored one
                sql = (
                    f"WITH staged AS MATERIALIZED (SELECT * FROM {files} QUALIFY row_number() OVER "
                    f"(PARTITION BY {key} ORDER BY _seq DESC, _copy) = 1) "
                    f"SELECT t.* FROM stored.{name} t ANTI JOIN staged USING ({key}) "
                    f"UNION ALL BY NAME SELECT * EXCLUDE (_seq, _copy) FROM staged"
                )
            out.append((name, sql))
        return out + [(v.name, textwrap.dedent(v.sql).strip()) for v in VIEWS]

    def _views_hash(self) -> str:
        docs = json.dumps([TABLE_DOCS, META_DOC, [(v.name, v.doc, v.columns) for v in VIEWS]], sort_keys=True)
        return hashlib.sha256((json.dumps(self._view_sqls()) + docs).encode()).hexdigest()[:16]

    def _install_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """The views users query, their COMMENTs, and the staging folder's anchor (a fold has just emptied it)."""
        self._write_anchor(con)
        con.execute("BEGIN TRANSACTION")
        for name, sql in self._view_sqls():
            con.execute(f"CREATE OR REPLACE VIEW main.{name} AS {sql}")
        comments = []
        for name, (doc, columns) in TABLE_DOCS.items():
            for schema, kind in (("stored", "TABLE"), ("main", "VIEW")):
                text = doc if schema == "main" else f"{doc} (The stored rows: query the view main.{name}.)"
                comments += [(f"{kind} {schema}.{name}", text)] + [(f"COLUMN {schema}.{name}.{c}", t) for c, t in columns.items()]
        comments += [("TABLE textadapt_meta", META_DOC[0])] + [(f"COLUMN textadapt_meta.{c}", t) for c, t in META_DOC[1].items()]
        for v in VIEWS:
            comments += [(f"VIEW main.{v.name}", v.doc)] + [(f"COLUMN main.{v.name}.{c}", t) for c, t in v.columns.items()]
        con.execute(";\n".join(f"COMMENT ON {what} IS {_literal(text)}" for what, text in comments))
        for key, value in (("staging", str(self.staging)), ("views", self._views_hash())):
            con.execute("INSERT OR REPLACE INTO textadapt_meta VALUES (?, ?)", [key, value])
        con.execute("COMMIT")

    def _use_current_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """If the file's views are not this textadapt's for this path (the file was moved, or a newer textadapt reads a
        file whose writer could not yet install them), use this textadapt's own, as temporary views of this connection."""
        if self._meta(con, "views") == self._views_hash():
            return
        for name, sql in self._view_sqls():
            con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")

    def _write_anchor(self, con: duckdb.DuckDBPyConnection) -> None:
        """An empty file per table, with the stored table's columns (a fold has just emptied the staging folder)."""
        tmp = self.staging / "tmp" / ANCHOR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in TABLES:
            empty = con.execute(f"SELECT * FROM stored.{name} LIMIT 0").to_arrow_table()
            self._parquet(name, empty, tmp / f"{name}.parquet", copy=0, seq=0)
        if (self.staging / ANCHOR).exists():
            (self.staging / "trash").mkdir(exist_ok=True)
            os.rename(self.staging / ANCHOR, self.staging / "trash" / ANCHOR)
        os.rename(tmp, self.staging / ANCHOR)
        shutil.rmtree(self.staging / "trash", ignore_errors=True)

    def _exclusive(self, wait: float) -> duckdb.DuckDBPyConnection | None:
        """DuckDB's write lock on the file, or None if another process has the file open (after ``wait`` seconds: an error)."""
        if self.con is not None:
            self.con.close()
            self.con = None
        try:
            return self._connect(read_only=False, wait=wait)
        except TextadaptError:
            if wait > 0:
                raise
            return None

    def _reopen(self) -> None:
        self.con = self._connect(read_only=True, wait=self.wait)
        self._use_current_views(self.con)

    def close(self) -> None:
        with self._lock:
            if self._writer is not None and self.con is not None:
                try:
                    self.fold()
                except (duckdb.Error, OSError, TextadaptError):
                    pass  # folded by the next writer
            self._release()

    def _release(self, refused: bool = False) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None
        if self._probe is not None:  # after DuckDB's connection: closing any descriptor of the file drops the process's locks
            os.close(self._probe)
            self._probe = None
        if self._writer is not None:
            self._writer.release(remove=refused and self._writer.created)
            self._writer = None

    def __reduce__(self):
        # A Store sent to another process (a Dask worker, a subprocess) would be a second writer.
        raise TextadaptError(
            f"the cache {self.path} is written by one process only: "
            "a task that runs elsewhere must return its rows to the flow, which writes them"
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- staging and folding -----------------------------------------------------------------

    def _staged(self) -> tuple[list[str], list[str]]:
        """The published batch folders: (live, oldest rows first; superseded: merged into a live one, to remove)."""
        names = sorted(d.name for d in self.staging.iterdir() if d.name[:1].isdigit()) if self.staging.exists() else []
        superseded = {
            line
            for b in names
            if (self.staging / b / "supersedes").exists()
            for line in (self.staging / b / "supersedes").read_text().split()
        }
        live = [b for b in names if b not in superseded]
        # a higher level holds older rows; within a level, creation order is the rows' order
        live.sort(key=lambda b: (-int(b.split("-")[1]), b))
        return live, [b for b in names if b in superseded]

    def _scan_staging(self) -> None:
        """What earlier writers left: finish their clean-up, and find the batches still to merge and to remove."""
        for junk in ("tmp", "trash"):  # this process holds the writer lock: nothing else writes there
            shutil.rmtree(self.staging / junk, ignore_errors=True)
        (self.staging / "tmp").mkdir(parents=True, exist_ok=True)
        if not (self.staging / ANCHOR).exists():  # (a staging folder removed by hand)
            self._write_anchor(self.con)
        live, self._superseded = self._staged()
        self._levels: dict[int, list[str]] = {}
        for b in sorted(live):
            self._levels.setdefault(int(b.split("-")[1]), []).append(b)
        self._next_seq = 1 + max((int(b.split("-")[0]) for b in live + self._superseded), default=0)
        self._drop_superseded()

    def _stage(self, *parts: tuple[str, pa.Table]) -> None:
        """Publish one batch: (table, its rows) for each part, all appearing together (at the rename) or not at all."""
        if self._writer is None:
            raise TextadaptError(f"{self.path} is open read-only")
        seq = self._next_seq
        self._next_seq += 1
        name = f"{seq:012d}-0"
        tmp = self.staging / "tmp" / name
        tmp.mkdir(parents=True)
        for table, rows in parts:
            self._parquet(table, rows, tmp / f"{table}.parquet", copy=seq, seq=seq)
        self._publish(tmp, name)
        self._levels.setdefault(0, []).append(name)
        self._merge()

    def _publish(self, tmp: Path, name: str) -> None:
        """Make a written batch durable, then visible (one rename)."""
        for f in [*tmp.iterdir(), tmp]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(tmp, self.staging / name)
        fd = os.open(self.staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _parquet(self, table: str, rows: pa.Table, path: Path, copy: int, seq: int | None = None) -> None:
        """Write rows of ``table`` as a Parquet file, with _copy = ``copy`` (its batch folder's number), and _seq = ``seq``
        (new rows) or as they have it (rows a merge copies). One row per key in a file: the first or the newest given.
        pyarrow's writer: DuckDB's COPY costs 8-40x more per small batch here. JSON columns keep their type, as Parquet's
        JSON logical type."""
        keys = [] if TABLES[table].keep == "run" else list(zip(*(rows.column(k).to_pylist() for k in TABLES[table].key)))
        if len(set(keys)) < len(keys):
            keep: dict[tuple, int] = {}
            for i, k in enumerate(keys):
                if TABLES[table].keep == "last" or k not in keep:
                    keep[k] = i
            rows = rows.take(sorted(keep.values()))
        if seq is not None:
            rows = rows.append_column("_seq", pa.array([seq] * rows.num_rows, pa.int64()))
        rows = rows.drop_columns([c for c in ("_copy",) if c in rows.column_names])
        rows = rows.append_column("_copy", pa.array([copy] * rows.num_rows, pa.int64()))
        for column, type_, _ in self._columns[table]:
            if type_ == "JSON":
                i = rows.schema.get_field_index(column)
                data = rows.column(i).combine_chunks().cast(pa.string())
                rows = rows.set_column(i, pa.field(column, pa.json_()), pa.ExtensionArray.from_storage(pa.json_(), data))
        pq.write_table(rows, path)

    def _new_rows(self, table: str, data: dict) -> pa.Table:
        """Whole rows of ``table`` from some of its columns (lists or Arrow arrays); the others get their default, or NULL."""
        schema = self._schemas[table]
        unknown = set(data) - set(schema.names)
        if unknown:
            raise ValueError(f"{table} has no column {sorted(unknown)}")
        n = len(next(iter(data.values())))
        now = datetime.now()  # = DuckDB's CAST(current_timestamp AS TIMESTAMP): both in the local time zone
        arrays = []
        for f in schema:
            if f.name in data:
                v = data[f.name]
                arrays.append(v.cast(f.type) if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v, f.type))
            else:
                arrays.append(pa.array([now if f.name in STORED_AT else self._defaults[table].get(f.name)] * n, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def _query_rows(self, sql: str, params: list | None = None) -> pa.Table:
        return self._execute(sql, params).to_arrow_table()

    def _insert(self, table: str, data: dict) -> None:
        self._stage((table, self._new_rows(table, data)))

    def _dedup(self, table: str, files: list[Path] | None) -> str:
        """One row per key of the staged ``files`` (None: every staged file of the table); for a per-run table, each run's
        newest batch (of its copies, the oldest)."""
        t = TABLES[table]
        if files is None:
            source = f"read_parquet({_literal(self.staging / '*' / f'{table}.parquet')})"
        else:
            source = f"read_parquet([{', '.join(_literal(f) for f in files)}])"
        if t.keep == "run":
            return (
                f"SELECT s.* FROM {source} s SEMI JOIN (SELECT run_id, max(struct_pack(s := _seq, c := -_copy)) AS b "
                f"FROM {source} GROUP BY run_id) p ON s.run_id = p.run_id AND s._seq = p.b.s AND s._copy = -p.b.c"
            )
        return (
            f"SELECT * FROM {source} QUALIFY row_number() OVER "
            f"(PARTITION BY {', '.join(t.key)} ORDER BY _seq {'ASC' if t.keep == 'first' else 'DESC'}) = 1"
        )

    def _merge(self) -> None:
        """Merge FANOUT batches of a level into one of the next level, at most a fold step's worth (a fold takes whole
        batches: a batch that big stays as it is); the merged ones go when no other process has the file open."""
        level = 0
        while level in self._levels:
            todo = self._levels[level]
            while len(todo) >= FANOUT:
                inputs, size = [], 0
                for b in todo:
                    size += self._size(b)
                    if inputs and size > FOLD_BYTES:
                        break
                    inputs.append(b)
                del todo[: len(inputs)]
                if len(inputs) > 1:
                    self._merge_into(inputs, level + 1)
            level += 1
        self._drop_superseded()

    def _size(self, batch: str) -> int:
        return sum(f.stat().st_size for f in (self.staging / batch).glob("*.parquet"))

    def _merge_into(self, inputs: list[str], level: int) -> None:
        copy = self._next_seq
        name = f"{copy:012d}-{level}"
        self._next_seq += 1
        tmp = self.staging / "tmp" / name
        tmp.mkdir(parents=True)
        for table in TABLES:
            files = [self.staging / b / f"{table}.parquet" for b in inputs if (self.staging / b / f"{table}.parquet").exists()]
            if files:
                self._parquet(table, self._query_rows(self._dedup(table, files)), tmp / f"{table}.parquet", copy=copy)
        (tmp / "supersedes").write_text("\n".join(inputs) + "\n")
        self._publish(tmp, name)
        self._levels.setdefault(level, []).append(name)
        self._superseded += inputs

    def _drop_superseded(self) -> None:
        """Remove merged batches, but only while no other process has the file open: a reader lists the files of a query
        once, then reads them (the views read each row once, whichever copies it finds)."""
        if not self._superseded or _other_process_has_open(self._probe):
            return
        trash = self.staging / "trash"
        trash.mkdir(exist_ok=True)
        for b in self._superseded:
            os.rename(self.staging / b, trash / b)
        self._superseded = []
        shutil.rmtree(trash, ignore_errors=True)

    def fold(self) -> bool:
        """Move the staged rows into the stored tables while no other process has the file open (never waiting for one),
        FOLD_BYTES of staged files per hold of DuckDB's write lock: a reader that comes meanwhile waits for one such
        step, then gets the file, and the rest is folded later. True when nothing is left staged."""
        with self._lock:
            if self._writer is None:
                raise TextadaptError(f"{self.path} is open read-only")
            while True:
                live, superseded = self._staged()
                if not live and not superseded:
                    return True
                chunk, size = [], 0
                for b in live:
                    size += self._size(b)
                    if chunk and size > FOLD_BYTES:
                        break
                    chunk.append(b)
                con = self._exclusive(0)
                if con is None:
                    self._reopen()
                    return False
                try:
                    self._fold_into(con, chunk, superseded)
                    self._end_session(con)
                finally:
                    con.close()
                    self._reopen()
                    self._scan_staging()

    def _fold_into(self, con: duckdb.DuckDBPyConnection, batches: list[str], superseded: list[str]) -> None:
        """Fold in one transaction: the content-addressed tables' rows of ``batches`` (live, oldest rows first), and the
        other tables' rows of every live batch (small; a newer row replaces an older one, so they go at once, whatever
        order the batches have). Then, still holding the file (no reader can be between listing files and reading them),
        ``batches`` and the ``superseded`` copies leave the staging folder, and so do the folded files of the others."""
        live = self._staged()[0]
        con.execute("BEGIN TRANSACTION")
        for table, t in TABLES.items():
            files = [
                self.staging / b / f"{table}.parquet"
                for b in (batches if t.keep == "first" else live)
                if (self.staging / b / f"{table}.parquet").exists()
            ]
            if not files:
                continue
            if t.keep == "run":  # a run's newest batch replaces its stored rows
                con.execute(f"CREATE OR REPLACE TEMP TABLE _fold AS {self._dedup(table, files)}")
                con.execute(f"DELETE FROM stored.{table} WHERE run_id IN (SELECT DISTINCT run_id FROM _fold)")
                con.execute(f"INSERT INTO stored.{table} BY NAME SELECT * EXCLUDE (_seq, _copy) FROM _fold")
                con.execute("DROP TABLE _fold")
            elif t.keep == "first":  # what the view shows: the staged rows whose key is not stored yet
                con.execute(
                    f"INSERT INTO stored.{table} BY NAME SELECT s.* EXCLUDE (_seq, _copy) "
                    f"FROM ({self._dedup(table, files)}) s ANTI JOIN stored.{table} USING ({', '.join(t.key)})"
                )
            else:
                con.execute(
                    f"INSERT OR REPLACE INTO stored.{table} BY NAME SELECT * EXCLUDE (_seq, _copy) "
                    f"FROM ({self._dedup(table, files)})"
                )
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
        trash = self.staging / "trash"
        trash.mkdir(exist_ok=True)
        for b in batches + superseded:
            os.rename(self.staging / b, trash / b)
        for b in set(live) - set(batches):
            for table, t in TABLES.items():
                if t.keep != "first":
                    (self.staging / b / f"{table}.parquet").unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """Rows of a read-only query, through the views (stored and staged rows alike)."""
        with self._lock:
            return self._execute(sql, params).fetchall()

    def _execute(self, sql: str, params: list | None = None) -> duckdb.DuckDBPyConnection:
        for attempt in range(3):
            try:
                return self.con.execute(sql, params)
            except duckdb.IOException as e:
                if str(self.staging) not in str(e):
                    raise
                if attempt == 2:
                    raise TextadaptError(
                        f"{self.path}: cannot read its staged rows in {self.staging} "
                        f"({str(e).splitlines()[0]}); "
                        "if that folder was removed, open the cache once for writing to recreate it "
                        "(`textadapt sql --write CHECKPOINT`)"
                    ) from None
                time.sleep(0.05)  # the writer removed merged batches while this query listed them (it saw no reader open)
        raise AssertionError

    def _with(self, name: str, table: pa.Table, sql: str, params: list | None = None) -> list[tuple]:
        with self._lock:
            self.con.register(name, table)
            try:
                return self._execute(sql, params).fetchall()
            finally:
                self.con.unregister(name)

    # -- generations -----------------------------------------------------------------------

    def existing_generations(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        rows = self._with("_wanted", pa.table({"key": keys}), "SELECT g.key FROM generations g JOIN _wanted w USING (key)")
        return {r[0] for r in rows}

    def add_generation(self, g: Generation) -> None:
        """Store one generation at once: it survives a crash of what follows."""
        self.add_generations([g])

    def add_generations(self, rows: list[Generation]) -> None:
        """Store many generations as one batch (a key already stored keeps its first row). A generation without a
        ``run_id`` stored while this writer has a run started (``start_run`` .. ``finish_run``) is that run's: only one
        process writes at a time, and it is the run's."""
        if not rows:
            return
        data = {c: [getattr(g, c) for g in rows] for c in GENERATION_COLUMNS}
        data["params"] = [json.dumps(p, sort_keys=True) for p in data["params"]]
        data["base_key"] = [g.base_key or g.key for g in rows]
        data["run_id"] = [g.run_id or self._run for g in rows]
        types = {
            "sample_index": pa.int32(),
            "prompt_tokens": pa.int32(),
            "completion_tokens": pa.int32(),
            "seconds": pa.float64(),
            "refresh": pa.int32(),
        }
        with self._lock:
            self._insert("generations", {c: pa.array(v, types.get(c, pa.string())) for c, v in data.items()})

    def latest_rounds(self, base_keys: list[str]) -> dict[str, tuple[str, int]]:
        """base_key -> (key, refresh) of the newest stored round of each generation."""
        if not base_keys:
            return {}
        rows = self._with(
            "_wanted",
            pa.table({"base_key": base_keys}),
            "SELECT g.base_key, arg_max(g.key, g.refresh), max(g.refresh) FROM generations g "
            "JOIN _wanted w USING (base_key) GROUP BY g.base_key",
        )
        return {b: (k, r) for b, k, r in rows}

    def imported(self, dataset: str, source: str) -> list[tuple[str, str, str | None, str | None]]:
        """(key, class_name, description, rejected) of the latest file imported as ``source`` for ``dataset``."""
        return self.query(
            "SELECT key, class_name, description, rejected FROM generations WHERE dataset = ? AND template = ? AND template_hash = "
            "(SELECT arg_max(template_hash, created_at) FROM generations WHERE dataset = ? AND template = ?) "
            "ORDER BY class_name, sample_index",
            [dataset, f"import/{source}", dataset, f"import/{source}"],
        )

    def generations(self, keys: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """key -> (description, rejected) for the given keys."""
        rows = self._with(
            "_wanted",
            pa.table({"key": pa.array(keys, pa.string())}),
            "SELECT g.key, g.description, g.rejected FROM generations g JOIN _wanted w USING (key)",
        )
        return {k: (d, r) for k, d, r in rows}

    # -- embeddings ------------------------------------------------------------------------

    def get_embeddings(self, kind: str, backbone: str, hashes: list[str]) -> dict[str, np.ndarray]:
        table, col = _embedding_table(kind)
        if not hashes:
            return {}
        with self._lock:
            self.con.register("_wanted", pa.table({"h": hashes}))
            try:
                tbl = self._execute(
                    f"SELECT e.{col}, e.embedding FROM {table} e JOIN _wanted w ON e.{col} = w.h WHERE e.backbone = ?", [backbone]
                ).to_arrow_table()
            finally:
                self.con.unregister("_wanted")
        if tbl.num_rows == 0:
            return {}
        emb = tbl.column("embedding").combine_chunks()
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        matrix = flat.reshape(tbl.num_rows, -1)
        return dict(zip(tbl.column(col).to_pylist(), matrix))

    def put_embeddings(
        self, kind: str, backbone: str, hashes: list[str], embeddings: np.ndarray, texts: list[str] | None = None
    ) -> None:
        table, col = _embedding_table(kind)
        if not len(hashes):
            return
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        lists = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1]).cast(pa.list_(pa.float32()))
        data = {
            "backbone": pa.array([backbone] * len(hashes), pa.string()),
            col: pa.array(hashes, pa.string()),
            "embedding": lists,
        }
        if kind == "text":
            data["text"] = pa.array(texts, pa.string())
        with self._lock:
            self._insert(table, data)

    # -- trained heads -----------------------------------------------------------------------

    def trained_heads(self, keys: list[str]) -> dict[str, StoredHead]:
        """key -> the stored head, for those of ``keys`` in the cache."""
        if not keys:
            return {}
        with self._lock:
            self.con.register("_wanted", pa.table({"key": pa.array(keys, pa.string())}))
            try:
                tbl = self._execute(
                    "SELECT h.* EXCLUDE (created_at) FROM trained_heads h JOIN _wanted w USING (key)"
                ).to_arrow_table()
            finally:
                self.con.unregister("_wanted")
        flat = tbl.column("weight").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        heads, start = {}, 0
        for row in tbl.drop_columns(["weight"]).to_pylist():
            n, dim = row.pop("n_classes"), row.pop("dim")
            weight, start = flat[start : start + n * dim].reshape(n, dim), start + n * dim
            heads[row["key"]] = StoredHead(**{**row, "settings": json.loads(row["settings"])}, weight=weight)
        return heads

    def put_trained_heads(self, heads: list[StoredHead]) -> None:
        """Store trained heads as one batch (a key already stored keeps its first row). A head without a ``run_id``
        stored while this writer has a run started is that run's."""
        if not heads:
            return
        weights = [np.ascontiguousarray(h.weight, dtype=np.float32) for h in heads]
        data = {
            "key": pa.array([h.key for h in heads], pa.string()),
            "adapter": pa.array([h.adapter for h in heads], pa.string()),
            "loss": pa.array([h.loss for h in heads], pa.string()),
            "seed": pa.array([h.seed for h in heads], pa.int32()),
            "backbone": pa.array([h.backbone for h in heads], pa.string()),
            "settings": pa.array([json.dumps(h.settings, sort_keys=True) for h in heads], pa.string()),
            "n_classes": pa.array([w.shape[0] for w in weights], pa.int32()),
            "dim": pa.array([w.shape[1] for w in weights], pa.int32()),
            "weight": pa.array([w.ravel() for w in weights], pa.list_(pa.float32())),
            "losses": pa.array([h.losses for h in heads], pa.list_(pa.float64())),
            "labelled_mass": pa.array([h.labelled_mass for h in heads], pa.list_(pa.float64())),
            "seconds": pa.array([h.seconds for h in heads], pa.float64()),
            "device": pa.array([h.device for h in heads], pa.string()),
            "run_id": pa.array([h.run_id or self._run for h in heads], pa.string()),
        }
        with self._lock:
            self._insert("trained_heads", data)

    def add_backbone(self, backbone: str, spec: str, arch: str, weights: str, untrained: bool) -> None:
        with self._lock:
            if not self.query("SELECT 1 FROM backbones WHERE backbone = ?", [backbone]):
                self._insert(
                    "backbones",
                    {"backbone": [backbone], "spec": [spec], "arch": [arch], "weights": [weights], "untrained": [untrained]},
                )

    # -- runs and results ------------------------------------------------------------------

    def start_run(self, run_id: str, dataset: str, options: dict) -> None:
        with self._lock:
            self._insert(
                "runs", {"run_id": [run_id], "dataset": [dataset], "status": ["running"], "options": [json.dumps(options)]}
            )
            self._writer.note(run_id=run_id)
            self._run = run_id

    def update_run(self, run_id: str, **fields) -> None:
        """Set columns of a run's row, e.g. ``update_run(run_id, backbone=..., flow_run_id=...)``."""
        types = {c: t for c, t, _ in self._columns["runs"]}
        unknown = set(fields) - set(types)
        if unknown:
            raise ValueError(f"runs has no column {sorted(unknown)}")
        sets = ", ".join(f"CAST(? AS {types[c]}) AS {c}" for c in fields)
        with self._lock:
            row = self._query_rows(f"SELECT * REPLACE ({sets}) FROM runs WHERE run_id = ?", [*fields.values(), run_id])
            self._stage(("runs", row))

    def finish_run(self, run_id: str, status: str, error: str | None = None) -> None:
        with self._lock:
            self._run = None if self._run == run_id else self._run
            row = self._query_rows(
                "SELECT * REPLACE (? AS status, ? AS error, CAST(current_timestamp AS TIMESTAMP) AS "
                "finished_at) FROM runs WHERE run_id = ?",
                [status, error, run_id],
            )
            self._stage(("runs", row))

    def link_generations(self, run_id: str, links: list[tuple]) -> None:
        """Record which generations a run used: (key, class_index, excluded reason or None[, items left out, 1-based])."""
        links = [(*link, None) if len(link) == 3 else tuple(link) for link in links]
        keys, class_indices, excluded, items = (list(col) for col in zip(*links)) if links else ([], [], [], [])
        with self._lock:
            self._insert(
                "run_generations",
                {
                    "run_id": pa.array([run_id] * len(keys), pa.string()),
                    "key": pa.array(keys, pa.string()),
                    "class_index": pa.array(class_indices, pa.int32()),
                    "excluded": pa.array(excluded, pa.string()),
                    "excluded_items": pa.array(items, pa.list_(pa.int32())),
                },
            )

    def llm_usage(self, run_id: str) -> dict[str, LlmUsage]:
        """Template set (``meta``, ``targeted``, ``import``...) -> what the generations the run used cost when they were made,
        whether by this run or an earlier one (``llm_spent``: what this run itself spent)."""
        rows = self.query(
            "SELECT split_part(g.template, '/', 1) AS template_set, count(*), coalesce(sum(g.prompt_tokens), 0), "
            "coalesce(sum(g.completion_tokens), 0), coalesce(sum(g.seconds), 0) "
            "FROM run_generations r JOIN generations g USING (key) WHERE r.run_id = ? GROUP BY ALL ORDER BY template_set",
            [run_id],
        )
        return {s: LlmUsage(int(n), int(p), int(c), float(t)) for s, n, p, c, t in rows}

    def llm_spent(self, run_id: str) -> dict[str, LlmUsage]:
        """Template set -> the generations this run itself asked the LLM for, their tokens and LLM time (empty: it asked
        for none, everything came from the cache). The view ``run_llm_usage`` gives the totals."""
        rows = self.query(
            "SELECT split_part(template, '/', 1) AS template_set, count(*), coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0), coalesce(sum(seconds), 0) FROM generations WHERE run_id = ? "
            "GROUP BY ALL ORDER BY template_set",
            [run_id],
        )
        return {s: LlmUsage(int(n), int(p), int(c), float(t)) for s, n, p, c, t in rows}

    def save_result(
        self,
        run_id: str,
        method: str,
        kind: str,
        top1: float,
        mean_per_class: float,
        n_images: int,
        per_class: list[tuple],
        **extra,
    ) -> None:
        """One method's row of ``results`` (``extra``: any other column, e.g. top5, losses) and its ``class_results``:
        (class_index, class_name, n_images, accuracy, delta[, delta_low, delta_high]), in one batch."""
        row = {
            "run_id": run_id,
            "method": method,
            "kind": kind,
            "top1": top1,
            "mean_per_class": mean_per_class,
            "n_images": n_images,
            **extra,
        }
        columns = ("class_index", "class_name", "n_images", "accuracy", "delta", "delta_low", "delta_high")
        columns = columns[: len(per_class[0])] if per_class else columns
        per_class_rows = {
            "run_id": [run_id] * len(per_class),
            "method": [method] * len(per_class),
            **{c: [r[i] for r in per_class] for i, c in enumerate(columns)},
        }
        with self._lock:
            result = self._new_rows("results", {c: [v.tolist() if isinstance(v, np.ndarray) else v] for c, v in row.items()})
            self._stage(("results", result), ("class_results", self._new_rows("class_results", per_class_rows)))

    def save_classifier(
        self,
        run_id: str,
        method: str,
        seed: int,
        weight: np.ndarray,
        classes: list[str],
        log_prior: np.ndarray | None,
        beta: float | None,
    ) -> None:
        with self._lock:
            self._insert(
                "classifiers",
                {
                    "run_id": [run_id],
                    "method": [method],
                    "seed": [seed],
                    "n_classes": [weight.shape[0]],
                    "dim": [weight.shape[1]],
                    "classes": [classes],
                    "weight": [weight.astype(np.float32).ravel()],
                    "log_prior": [None if log_prior is None else log_prior.astype(np.float32)],
                    "beta": [beta],
                },
            )

    def classifier(self, run_id: str, method: str) -> tuple[int, np.ndarray, list[str], np.ndarray | None, float | None]:
        """(seed, weight, classes, log_prior, beta) of one stored classifier."""
        rows = self.query(
            "SELECT seed, n_classes, dim, weight, classes, log_prior, beta FROM classifiers WHERE run_id = ? AND method = ?",
            [run_id, method],
        )
        if not rows:
            raise KeyError((run_id, method))
        seed, n, d, weight, classes, log_prior, beta = rows[0]
        log_prior = None if log_prior is None else np.asarray(log_prior, np.float32)
        return seed, np.asarray(weight, np.float32).reshape(n, d), classes, log_prior, beta

    def save_predictions(
        self, run_id: str, image_hashes: list[str], labels: np.ndarray, predicted: dict[str, np.ndarray]
    ) -> None:
        """A run's test images (``run_images``) and every method's (seeds, images) predicted classes (``predictions``), in
        one batch that replaces what the run had stored. Bulk, through Arrow: ImageNet's 50,000 images x 30 methods are
        1.5 million rows."""
        n, methods = len(image_hashes), list(predicted)
        images = {
            "run_id": pa.array([run_id] * n, pa.string()),
            "image_index": pa.array(np.arange(n, dtype=np.int32)),
            "image_hash": pa.array(image_hashes, pa.string()),
            "label": pa.array(np.asarray(labels, np.int32)),
        }
        per_image = [np.asarray(predicted[m], np.int32).reshape(-1, n).T for m in methods]  # (images, seeds) each
        values = np.concatenate([p.ravel() for p in per_image] or [np.zeros(0, np.int32)])
        lengths = np.concatenate([np.full(n, p.shape[1], np.int32) for p in per_image] or [np.zeros(0, np.int32)])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        rows = {
            "run_id": pa.array([run_id] * (n * len(methods)), pa.string()),
            "method": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(np.arange(len(methods), dtype=np.int32), n)), pa.array(methods, pa.string())
            ).cast(pa.string()),
            "image_index": pa.array(np.tile(np.arange(n, dtype=np.int32), len(methods))),
            "predicted": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        }
        with self._lock:
            self._stage(
                ("run_images", self._new_rows("run_images", images)), ("predictions", self._new_rows("predictions", rows))
            )

    def run_images(self, run_id: str) -> tuple[list[str], np.ndarray]:
        """(image hashes, labels) of the test images a run scored, in scoring order; ([], empty) if none is stored."""
        with self._lock:
            tbl = self._query_rows("SELECT image_hash, label FROM run_images WHERE run_id = ? ORDER BY image_index", [run_id])
        return tbl.column("image_hash").to_pylist(), tbl.column("label").to_numpy().astype(np.int64)

    def predictions(self, run_id: str, method: str) -> np.ndarray | None:
        """(seeds, images): a method's predicted class of every test image of the run, per seed; None if not stored."""
        with self._lock:
            tbl = self._query_rows(
                "SELECT predicted FROM predictions WHERE run_id = ? AND method = ? ORDER BY image_index", [run_id, method]
            )
        if tbl.num_rows == 0:
            return None
        lists = tbl.column("predicted").combine_chunks()
        return lists.flatten().to_numpy().astype(np.int64).reshape(tbl.num_rows, -1).T

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        """(columns, rows) of any statement. A writer runs a statement that writes with DuckDB's write lock, after folding
        every staged row (waiting up to ``wait`` seconds for readers to close the file); ``generations`` and the other
        staged tables' names then mean the stored tables (schema ``stored``)."""
        with self._lock:
            try:
                cur = self._execute(query)
            except duckdb.Error as e:
                if not _writes(query):
                    raise TextadaptError(f"SQL error: {e}") from None
                if self._writer is None:
                    raise TextadaptError(f"SQL error: the cache is open read-only, and this statement writes ({e})") from None
                return self._sql_exclusive(query)
            if cur.description is None:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()

    def _sql_exclusive(self, query: str) -> tuple[list[str], list[tuple]]:
        con = self._exclusive(self.wait)
        try:
            self._fold_into(con, *self._staged())
            con.execute("SET search_path = 'stored,main'")
            try:
                cur = con.execute(query)
            except duckdb.Error as e:
                raise TextadaptError(f"SQL error: {e}") from None
            result = ([d[0] for d in cur.description], cur.fetchall()) if cur.description else ([], [])
            con.execute("SET search_path = 'main'")
            self._end_session(con)
            return result
        finally:
            con.close()
            self._reopen()
            self._scan_staging()


def _writes(query: str) -> bool:
    """Whether a statement would change the file (DuckDB refuses it on a read-only connection, or on a view)."""
    reads = {
        duckdb.StatementType.SELECT,
        duckdb.StatementType.EXPLAIN,
        duckdb.StatementType.PRAGMA,
        duckdb.StatementType.SET,
        duckdb.StatementType.VARIABLE_SET,
        duckdb.StatementType.PREPARE,
        duckdb.StatementType.EXECUTE,
    }
    try:
        return any(s.type not in reads for s in duckdb.extract_statements(query))
    except duckdb.Error:
        return False


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
    rows = store.query(
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
    )
    return [RunSummary(*row) for row in rows]
