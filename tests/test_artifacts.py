"""A run against a real Prefect server (``prefect server start`` on 127.0.0.1) publishes its results
as artifacts, and what the server holds matches DuckDB."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
        "shapes": {"T-shirt or top": ["a short-sleeved top with a round neck", "a plain cotton t-shirt"],
                   "trouser": ["two long trouser legs side by side", "a pair of long pants with a waistband"]},
        "photos": {"T-shirt or top": ["a greyscale photo of a t-shirt laid flat"],
                   "trouser": ["a greyscale photo of trousers seen from the front"]},
    }
    with Store(home / "textadapt.duckdb") as store:
        for source, mapping in described.items():
            (tmp_path / f"{source}.json").write_text(json.dumps(mapping))
            import_descriptions(tmp_path / f"{source}.json", fmnist, source, store)
    args = ["run", "fashion-mnist", "--backbone", TINY, "--templates", "", "--sources", "shapes,photos", "--max-classes", "2",
            "--max-images", "20", "--steps", "10", "--seeds", "2"]
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env={**os.environ, "PREFECT_API_URL": prefect_server},
                       timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    md = Path(re.search(r"report: (\S+\.md)", p.stdout).group(1))
    run_id = md.stem

    artifacts, runs = read_artifacts(prefect_server, "textadapt-fashion-mnist-%")
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {artifact_key("fashion-mnist", w) for w in ("gains", "per-class", "report")}
    assert all(a.type == "markdown" and run_id in a.data for a in artifacts)
    [flow_run] = runs.values()  # all three belong to this run's flow run, which the server saw complete
    assert flow_run.state.is_completed() and flow_run.parameters["dataset"] == "fashion-mnist"
    # the flow run is named after the run, and the run records the flow run's id
    assert flow_run.name == run_id
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        assert s.sql(f"SELECT flow_run_id FROM runs WHERE run_id = '{run_id}'")[1] == [(str(flow_run.id),)]

    # The gains table holds exactly DuckDB's results for this run, every method the harness scored.
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        results = s.sql("SELECT method, kind, scoring, n_texts, top1, top1_std, mean_per_class, mean_per_class_std, "
                        "delta_top1_low, delta_top1_high, delta_mean_per_class_low, delta_mean_per_class_high "
                        f"FROM results WHERE run_id = '{run_id}'")[1]
    gains = by_key[artifact_key("fashion-mnist", "gains")].data
    pattern = r"^\| `([^`]+)` \| (\S+) \| (\S+) \| (\d*) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$"
    rows = {m: cells for m, *cells in re.findall(pattern, gains, re.M)}
    assert set(rows) == {m for m, *_ in results} and len(results) > 5
    assert {"tap-head:import:shapes", "tap-head:import:photos", "zero-shot:class-name"} <= set(rows)
    best = re.search(r"Best training-free baseline: `([^`]+)`", gains).group(1)
    by_method = {m: rest for m, *rest in results}
    _, _, _, best_top1, _, best_mean, *_ = by_method[best]
    assert best_top1 == max(t for m, k, sc, _, t, *_ in results if k != "adapted" and sc == "plain")

    def pm(x, std):
        return f"{100 * x:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")

    def gain(method, delta, low, high):  # every delta with its 95% interval, as DuckDB holds it
        return "reference" if method == best else f"{100 * delta:+.1f} ({100 * low:+.1f}, {100 * high:+.1f})"

    for method, kind, scoring, n_texts, top1, top1_std, mean, mean_std, top1_low, top1_high, mean_low, mean_high in results:
        assert rows[method] == [kind, scoring, "" if n_texts is None else str(n_texts), pm(top1, top1_std), pm(mean, mean_std),
                                gain(method, top1 - best_top1, top1_low, top1_high),
                                gain(method, mean - best_mean, mean_low, mean_high)]
    assert rows["tap-head:import:shapes"][2] == "4" and rows["tap-head:import:photos"][2] == "2"  # training texts
    assert " ± " in rows["tap-head:import:shapes"][3]  # two seeds: mean and spread
    assert "UNTRAINED BACKBONE" in gains

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
