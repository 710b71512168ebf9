"""A run against a real Prefect server (``prefect server start`` on 127.0.0.1) publishes its results
as artifacts, and what the server holds matches DuckDB."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from textadapt.flows.artifacts import artifact_key
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")


def read_artifacts(api: str, key_prefix: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=key_prefix)))
        runs = {a.flow_run_id: client.read_flow_run(a.flow_run_id) for a in artifacts if a.flow_run_id}
    return artifacts, runs


def test_a_run_shows_its_gains_plot_and_report_paths_as_artifacts(prefect_server, home, tmp_path, fmnist):
    # Two imported description files (no LLM: the artifacts do not depend on where descriptions come
    # from, and the LLM paths have tests of their own), two heads, scored on 20 real images.
    from textadapt.descriptions import import_descriptions

    described = {
        "shapes": {
            "T-shirt or top": ["a short-sleeved top with a round neck", "a plain cotton t-shirt"],
            "trouser": ["two long trouser legs side by side", "a pair of long pants with a waistband"],
        },
        "photos": {
            "T-shirt or top": ["a greyscale photo of a t-shirt laid flat"],
            "trouser": ["a greyscale photo of trousers seen from the front"],
        },
    }
    with Store(home / "textadapt.duckdb") as store:
        for source, mapping in described.items():
            (tmp_path / f"{source}.json").write_text(json.dumps(mapping))
            import_descriptions(tmp_path / f"{source}.json", fmnist, source, store)
    args = [
        "run",
        "fashion-mnist",
        "--backbone",
        TINY,
        "--templates",
        "",
        "--sources",
        "shapes,photos",
        "--max-classes",
        "2",
        "--max-images",
        "20",
        "--steps",
        "10",
        "--seeds",
        "2",
    ]
    p = subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    md = Path(re.search(r"report: (\S+\.md)", p.stdout).group(1))
    run_id = md.stem

    artifacts, runs = read_artifacts(prefect_server, "textadapt-fashion-mnist-%")
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {artifact_key("fashion-mnist", w) for w in ("gains", "per-class", "report")}
    gains_key = artifact_key("fashion-mnist", "gains")
    assert {k: a.type for k, a in by_key.items()} == {
        gains_key: "table",
        artifact_key("fashion-mnist", "per-class"): "markdown",
        artifact_key("fashion-mnist", "report"): "markdown",
    }
    assert all(run_id in (a.description if a.type == "table" else a.data) for a in artifacts)
    [flow_run] = runs.values()  # all three belong to this run's flow run, which the server saw complete
    assert flow_run.state.is_completed() and flow_run.parameters["dataset"] == "fashion-mnist"
    # the flow run is named after the run, and the run records the flow run's id
    assert flow_run.name == run_id
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql(f"SELECT flow_run_id FROM runs WHERE run_id = '{run_id}'")[1] == [(str(flow_run.id),)]

    # The gains table (Prefect's table artifact: one row per method) holds exactly DuckDB's results for this run, every
    # method the harness scored, in % and points, each gain with its interval.
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        results = s.sql(
            "SELECT method, kind, scoring, n_texts, top1, top1_std, mean_per_class, mean_per_class_std, "
            "delta_top1_low, delta_top1_high, delta_mean_per_class_low, delta_mean_per_class_high "
            f"FROM results WHERE run_id = '{run_id}'"
        )[1]
    table = by_key[gains_key]
    rows = {r["method"]: r for r in (json.loads(table.data) if isinstance(table.data, str) else table.data)}
    assert set(rows) == {m for m, *_ in results} and len(results) > 5
    assert {"tap-head:import:shapes", "tap-head:import:photos", "zero-shot:class-name"} <= set(rows)
    best = re.search(r"baseline `([^`]+)`", table.description).group(1)
    by_method = {m: rest for m, *rest in results}
    _, _, _, best_top1, _, best_mean, *_ = by_method[best]
    assert best_top1 == max(t for m, k, sc, _, t, *_ in results if k != "adapted" and sc == "plain")

    def pts(x):
        return None if x is None else round(100 * x, 2)

    for method, kind, scoring, n_texts, top1, top1_std, mean, mean_std, top1_low, top1_high, mean_low, mean_high in results:
        ref = method == best
        assert rows[method] == pytest.approx(
            {
                "method": method,
                "kind": kind,
                "scoring": scoring,
                "training texts": n_texts,
                "top-1 %": pts(top1),
                "top-1 sd": pts(top1_std),
                "mean per-class %": pts(mean),
                "mean per-class sd": pts(mean_std),
                "top-1 gain": None if ref else pts(top1 - best_top1),
                "top-1 gain low": None if ref else pts(top1_low),
                "top-1 gain high": None if ref else pts(top1_high),
                "mean per-class gain": None if ref else pts(mean - best_mean),
                "mean per-class gain low": None if ref else pts(mean_low),
                "mean per-class gain high": None if ref else pts(mean_high),
            },
            abs=0.011,
        ), method
    assert rows["tap-head:import:shapes"]["training texts"] == 4 and rows["tap-head:import:photos"]["training texts"] == 2
    assert rows["tap-head:import:shapes"]["top-1 sd"] is not None  # two seeds: a spread
    assert "UNTRAINED BACKBONE" in table.description

    plot = by_key[artifact_key("fashion-mnist", "per-class")].data
    png = base64.b64decode(re.search(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", plot).group(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    where = by_key[artifact_key("fashion-mnist", "report")].data
    html = md.with_suffix(".html")
    assert f"`{html}`" in where and f"`{md}`" in where
    assert html.read_text().startswith("<!DOCTYPE html>")


def test_artifact_keys_are_valid_for_any_dataset_name():
    from prefect.client.schemas.actions import ArtifactCreate

    for name in ("fashion-mnist", "ImageNet_1k", "my data.v2", "___"):
        key = artifact_key(name, "per-class")
        assert re.fullmatch(r"[a-z0-9-]+", key)
        ArtifactCreate(key=key, type="markdown", data="x")  # Prefect's own validation accepts it
