"""The harness against clip_benchmark, and an exported classifier against its own run."""

import json
import re
from pathlib import Path

import numpy as np
import torch
from conftest import TINY
from test_flow import query, textadapt

from textadapt.config import Settings
from textadapt.datasets import load_test_images, restrict
from textadapt.encoders import encode_images
from textadapt.harness import evaluate, training_free
from textadapt.store import Store


def test_zero_shot_equals_clip_benchmark(tiny_backbone, fmnist, tmp_path):
    """Same model, images, class names and templates: the harness's zero-shot ensemble predicts exactly
    what clip_benchmark's zero-shot classifier predicts, image by image, so top-1, top-5 and mean
    per-class recall agree. (clip_benchmark 1.6.2's own ``evaluate`` cannot run with NumPy 2 -- its
    ``accuracy`` calls float() on a 1-element array -- so its classifier and logits are compared, and
    its metric, sklearn's balanced accuracy, is applied to its predictions.)"""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score

    spec, images = restrict(fmnist, load_test_images(fmnist, Settings().home), None, 300)
    templates = spec.zeroshot.templates
    assert templates, "fashion-mnist's spec lists its zero-shot templates"
    with Store(tmp_path / "c.duckdb") as store:
        classifiers, _ = training_free(tiny_backbone, spec, store, {}, set())
        emb, _ = encode_images(tiny_backbone, images, store)
    zero_shot = next(c for c in classifiers if c.method == "zero-shot:ensemble")
    ours = next(r for r in evaluate([zero_shot], emb, images.labels, 10, ["plain"], None))
    our_logits = emb @ zero_shot.weights[0].T

    pixels = torch.stack([tiny_backbone.preprocess(images.pil(i)) for i in range(len(images))])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, torch.as_tensor(images.labels)), batch_size=64)
    weights = zero_shot_classifier(
        tiny_backbone.model, tiny_backbone.tokenizer, spec.classes, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )
    logits, true = run_classification(tiny_backbone.model, weights, loader, "cpu", amp=False)
    theirs = logits.numpy()
    assert np.array_equal(theirs.argmax(axis=1), our_logits.argmax(axis=1))
    assert np.array_equal(np.sort(np.argsort(-theirs, axis=1)[:, :5]), np.sort(np.argsort(-our_logits, axis=1)[:, :5]))
    assert ours.score.top1 == float((theirs.argmax(axis=1) == true.numpy()).mean())
    assert np.isclose(ours.score.mean_per_class, balanced_accuracy_score(true.numpy(), theirs.argmax(axis=1)))
    assert 0 < ours.score.top1 < 1 and ours.score.top5 is not None


def test_exported_classifier_predicts_what_the_run_scored(home, tmp_path, fmnist):
    run = textadapt(
        "run",
        "fashion-mnist",
        "--backbone",
        TINY,
        "--max-classes",
        "4",
        "--samples",
        "1",
        "--max-images",
        "80",
        "--steps",
        "40",
        "--templates",
        "generic",
        "--methods",
        "tap,zs-head+ot",
        "--scoring",
        "all",
        "--seeds",
        "1",
    )
    run_id = Path(re.search(r"report: (\S+\.md)", run.stdout).group(1)).stem

    # The test images, as files in class folders: what a user points predict at.
    spec, images = restrict(fmnist, load_test_images(fmnist, Settings().home), 4, 80)
    from PIL import Image

    files = []
    for i in range(len(images)):
        path = tmp_path / "images" / spec.classes[images.labels[i]] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images.images[i]).save(path)
        files.append(path)

    for method in (None, "tap-head:generic/ig"):  # the default (best adapted) and an IG-scored one
        args = ["export", run_id, "--out", str(tmp_path / "clf")] + (["--method", method] if method else [])
        exported = textadapt(*args)
        js = Path(re.search(r"wrote (\S+\.json)", exported.stdout).group(1))
        meta = json.loads(js.read_text())
        method = meta["method"]
        assert meta["classes"] == spec.classes and meta["backbone_spec"] == TINY
        predicted = json.loads(textadapt("predict", str(js), str(tmp_path / "images"), "--top-k", "2", "--format", "json").stdout)
        assert len(predicted) == len(files)
        top = {p["path"]: p["top"][0]["class"] for p in predicted}
        hits = np.array([top[str(f)] == f.parent.name for f in files])
        labels = np.array([spec.classes.index(f.parent.name) for f in files])
        per_class = [hits[labels == c].mean() for c in range(4)]
        stored = dict(
            query(home, f"SELECT class_index, accuracy FROM class_results WHERE run_id = '{run_id}' AND method = '{method}'")
        )
        top1 = query(home, f"SELECT top1 FROM results WHERE run_id = '{run_id}' AND method = '{method}'")[0][0]
        assert hits.mean() == top1, method
        assert np.allclose(per_class, [stored[c] for c in range(4)]), method


def test_predict_refuses_what_it_cannot_use(tmp_path):
    p = textadapt("predict", str(tmp_path / "nope.json"), str(tmp_path), check=False)
    assert p.returncode == 2 and "nope.json: not found" in p.stderr
    p = textadapt("export", "no-such-run", check=False)
    assert p.returncode == 2 and "no cache file yet" in p.stderr
