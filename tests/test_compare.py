"""`textadapt compare`: stored predictions with a known answer, every refusal, and two real runs through the CLI."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from textadapt import TextadaptError, stats
from textadapt.compare import compare
from textadapt.store import Store

CLI = str(Path(sys.executable).parent / "textadapt")
N = 100
LABELS = np.arange(N) % 2  # two classes, alternating
HASHES = [f"{i:064x}" for i in range(N)]
CLASSES = ["cat", "dog"]


def store_run(
    store: Store,
    run_id: str,
    methods: dict[str, np.ndarray],
    labels=LABELS,
    hashes=HASHES,
    classes=CLASSES,
    kinds: dict[str, str] | None = None,
) -> None:
    """A scored run as harness.save leaves it: results, class_results and every method's (seeds, images) predictions."""
    store.start_run(run_id, "toy", {})
    for method, predicted in methods.items():
        correct = stats.correctness(predicted, labels)
        recall = [correct[labels == k].mean() for k in range(len(classes))]
        per_class = [(k, c, int((labels == k).sum()), float(recall[k]), None) for k, c in enumerate(classes)]
        kind = (kinds or {}).get(method, "adapted")
        store.save_result(run_id, method, kind, float(correct.mean()), float(np.mean(recall)), len(labels), per_class)
    store.save_predictions(run_id, hashes, labels, methods)


def right_where(mask: np.ndarray, seeds: int = 1) -> np.ndarray:
    """Predictions right exactly on ``mask`` (for every seed)."""
    return np.tile(np.where(mask, LABELS, 1 - LABELS), (seeds, 1))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "c.duckdb") as s:
        yield s


def test_a_known_gain_on_stored_predictions(store):
    i = np.arange(N)
    store_run(
        store,
        "before",
        {"head:x": right_where(i % 10 < 6), "zero-shot": right_where(i % 10 < 3)},
        kinds={"zero-shot": "zero-shot"},
    )
    store_run(store, "after", {"head:x": right_where(i % 10 < 8, seeds=3)})
    c = compare(store, "before", "after")  # bare runs: their best adapted method
    assert (c.a.method, c.b.method, c.a.seeds, c.b.seeds) == ("head:x", "head:x", 1, 3)
    assert (c.a.top1, c.b.top1, c.images) == (0.6, 0.8, N)
    # B is right wherever A is, and on 20 more images: McNemar's exact p is 2 / 2**20
    assert (c.mcnemar.only_a, c.mcnemar.only_b) == (0, 20) and c.mcnemar.p_value == pytest.approx(2 / 2**20)
    a, b = (i % 10 < 6).astype(float), (i % 10 < 8).astype(float)
    alone = stats.paired_bootstrap(b, a)  # the same resamples as the plain function
    assert (c.top1.value, c.top1.low, c.top1.high) == pytest.approx((alone.value, alone.low, alone.high))
    assert c.top1.value == pytest.approx(0.2) and c.top1.sign == 1
    for k in c.classes:  # each class: 3 of 5 right in every ten images before, 4 of 5 after
        assert (k.name, k.images, k.a, k.b) == (CLASSES[k.index], 50, 0.6, 0.8)
        assert k.difference.value == pytest.approx(0.2) and 0 < k.difference.low < 0.2 < k.difference.high
    assert c.mean_per_class.value == pytest.approx(0.2)
    data = json.loads(json.dumps(c.to_dict()))
    assert data["top1"]["value"] == pytest.approx(0.2) and data["mcnemar"]["only_b"] == 20 and data["b"]["seeds"] == 3

    # two methods of one run, named; and the other way round
    c = compare(store, "before:zero-shot", "before:head:x")
    assert c.top1.value == pytest.approx(0.3) and (c.mcnemar.only_a, c.mcnemar.only_b) == (0, 30)
    assert compare(store, "after", "before").top1.value == pytest.approx(-0.2)
    same = compare(store, "after", "after")
    assert same.top1 == stats.Interval(0.0, 0.0, 0.0) and same.mcnemar.p_value == 1.0


def test_the_same_images_in_another_order_are_paired_by_hash(store):
    i = np.arange(N)
    store_run(store, "a", {"m": right_where(i % 3 == 0)})
    store_run(store, "b", {"m": right_where(i % 4 != 0)})
    perm = np.random.default_rng(0).permutation(N)
    store_run(store, "b-shuffled", {"m": right_where(i % 4 != 0)[:, perm]}, labels=LABELS[perm], hashes=[HASHES[j] for j in perm])
    plain, shuffled = compare(store, "a", "b"), compare(store, "a", "b-shuffled")
    assert shuffled.top1 == plain.top1 and shuffled.mcnemar == plain.mcnemar
    assert [k.difference for k in shuffled.classes] == [k.difference for k in plain.classes]


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(hashes=HASHES[:-1] + ["f" * 64]), r"different test images \(100 and 100; 1 of A's images are not among B's"),
        (dict(labels=LABELS[::-1].copy()), "the same images carry different labels"),
        (dict(classes=["cat", "wolf"]), r"different classes \(2 and 2; the first difference is class 1\)"),
    ],
)
def test_sides_scored_differently_are_refused(store, other, message):
    store_run(store, "a", {"m": right_where(np.arange(N) < 50)})
    store_run(store, "b", {"m": right_where(np.arange(N) < 50)}, **other)
    with pytest.raises(TextadaptError, match=message):
        compare(store, "a", "b")


def test_unknown_runs_methods_and_runs_without_predictions_are_refused(store):
    store_run(store, "a", {"zero-shot": right_where(np.arange(N) < 50)}, kinds={"zero-shot": "zero-shot"})
    store.start_run("old", "toy", {})
    store.save_result("old", "m", "adapted", 0.5, 0.5, N, [(0, "cat", 50, 0.5, None), (1, "dog", 50, 0.5, None)])
    with pytest.raises(TextadaptError, match="no run 'nope'"):
        compare(store, "nope", "a:zero-shot")
    with pytest.raises(TextadaptError, match="run 'a' has no scored method 'm'; its methods: zero-shot"):
        compare(store, "a:m", "a:zero-shot")
    with pytest.raises(TextadaptError, match="run 'a' has no scored adapted method; name one as a:METHOD"):
        compare(store, "a", "a:zero-shot")
    with pytest.raises(TextadaptError, match="run 'old' has no per-image predictions stored"):
        compare(store, "old", "a:zero-shot")


def textadapt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env=os.environ.copy(), timeout=900, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"textadapt {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_compare_two_real_runs_before_and_after_an_edit(home, tmp_path, fmnist):
    """Two real runs (tiny backbone, imported descriptions: no LLM), the second after editing one description file:
    compare's numbers are DuckDB's, in every format."""
    from textadapt.descriptions import import_descriptions

    files = {
        "shapes": {
            "T-shirt or top": ["a short-sleeved top with a round neck", "a plain cotton t-shirt"],
            "trouser": ["two long trouser legs side by side", "a pair of long pants with a waistband"],
        },
        "photos": {
            "T-shirt or top": ["a greyscale photo of a t-shirt laid flat"],
            "trouser": ["a greyscale photo of trousers seen from the front"],
        },
    }

    def imported(edit: str = "") -> None:
        with Store(home / "textadapt.duckdb") as store:
            for source, mapping in files.items():
                mapping = {c: [t + edit for t in texts] for c, texts in mapping.items()} if source == "photos" else mapping
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
        "40",
        "--steps",
        "10",
        "--seeds",
        "2",
    ]
    imported()
    before = re.search(r"report: \S+/(\S+)\.md", textadapt(*args).stdout).group(1)
    imported(edit=", on a plain background")  # the "template edit": the photos descriptions changed
    after = re.search(r"report: \S+/(\S+)\.md", textadapt(*args).stdout).group(1)

    p = textadapt("compare", before, after, "--method", "tap-head:import:photos", "--format", "json")
    data = json.loads(p.stdout)
    with Store(home / "textadapt.duckdb", read_only=True) as s:
        top1 = dict(s.sql("SELECT run_id, top1 FROM results WHERE method = 'tap-head:import:photos'")[1])
        n = s.sql(f"SELECT count(*) FROM run_images WHERE run_id = '{before}'")[1][0][0]
    assert (data["a"]["run_id"], data["b"]["run_id"], data["a"]["seeds"], data["images"]) == (before, after, 2, n) and n == 40
    assert data["a"]["top1"] == pytest.approx(top1[before]) and data["b"]["top1"] == pytest.approx(top1[after])
    assert data["top1"]["value"] == pytest.approx(top1[after] - top1[before])
    assert data["top1"]["low"] <= data["top1"]["value"] <= data["top1"]["high"]
    assert [k["name"] for k in data["classes"]] == ["T-shirt or top", "trouser"]
    assert sum(k["images"] for k in data["classes"]) == 40

    # two methods of one run, as a table and as CSV
    p = textadapt("compare", f"{before}:tap-head:import:shapes", f"{before}:tap-head:import:photos")
    assert f"A: {before}:tap-head:import:shapes" in p.stdout and "B - A on 40 test images: top-1" in p.stdout
    assert "McNemar's exact test" in p.stdout and "trouser" in p.stdout and "UNTRAINED BACKBONE" in p.stderr
    p = textadapt("compare", f"{before}:tap-head:import:shapes", f"{before}:tap-head:import:photos", "--format", "csv")
    assert "\r" not in p.stdout
    rows = list(csv.reader(io.StringIO(p.stdout)))
    assert rows[0][:3] == ["class_index", "class", "images"] and [r[1] for r in rows[1:]] == [
        "(top-1)",
        "(mean per class)",
        "T-shirt or top",
        "trouser",
    ]

    p = textadapt("compare", before, "nope", check=False)
    assert p.returncode == 2 and "no run 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = textadapt("compare", before, after, "--format", "yaml", check=False)
    assert p.returncode == 2 and "Invalid value for '--format'" in p.stderr  # refused as the command line is read
