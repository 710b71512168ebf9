"""The science, checked where untrained weights cannot: against reference implementations and on
synthetic embeddings whose right answer is known."""

import warnings
from dataclasses import replace

import numpy as np
import ot
import pytest
import torch

from textadapt import TextadaptError
from textadapt.adapters import TapRecipe, train_adapter
from textadapt.config import RunOptions
from textadapt.losses import sinkhorn
from textadapt.methods import method_name, parse_methods, parse_scorings
from textadapt.scoring import ig_logits, predict, score, score_logits


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("eps,iters", [(0.15, 5), (0.05, 200), (1.0, 3)])
def test_sinkhorn_equals_pot(eps, iters):
    """Same plan as POT's ot.sinkhorn on the same inputs, to 1e-12 (float64; ours runs in the log domain)."""
    rng = np.random.default_rng(0)
    cost = rng.random((40, 7))
    a, b = rng.random(40), rng.random(7)
    a, b = a / a.sum(), b / b.sum()
    ours = sinkhorn(torch.tensor(cost), eps, iters, torch.tensor(a), torch.tensor(b)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that a fixed number of iterations did not "converge"
        theirs = ot.sinkhorn(a, b, cost, reg=eps, numItermax=iters, stopThr=0)
    assert np.abs(ours - theirs).max() < 1e-12
    assert np.allclose(ours.sum(axis=1), a)  # rows are exact after the last u-update


def test_ig_scoring_removes_a_text_prior():
    """A classifier biased towards 3 classes along a direction every image shares over-predicts them;
    subtracting the log prior of a content-free input (sharing that direction as images do) removes it."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n, dim = 10, 64
        q, _ = np.linalg.qr(rng.normal(size=(dim, n + 2)))
        u, p, r = q[:, :n].T, q[:, n], q[:, n + 1]
        bias = np.where(np.arange(n) < 3, 0.6, 0.0)
        weight = 10 * (unit(u + 0.3 * rng.normal(size=u.shape) / np.sqrt(dim)) + bias[:, None] * p)
        y = np.repeat(np.arange(n), 50)
        images = unit(u[y] + p + rng.normal(scale=2 / np.sqrt(dim), size=(len(y), dim)))
        k = float(np.mean(images @ p))
        content_free = k * p + np.sqrt(1 - k * k) * r
        plain = images @ weight.T
        ig = ig_logits(plain, (weight @ content_free)[None, :])
        biased_share = lambda logits: np.isin(logits.argmax(axis=1), [0, 1, 2]).mean()  # noqa: E731
        assert biased_share(plain) > 0.45  # 3 of 10 classes take nearly half the predictions
        assert abs(biased_share(ig) - 0.3) < 0.05  # their fair share
        assert score_logits(ig, y, n).top1 > score_logits(plain, y, n).top1 + 0.1


def test_noise_augmentation_narrows_a_modality_gap():
    """Text clusters tight, images shifted by a shared offset: the TAP noise makes the head transfer better."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n, dim = 10, 64
        u = unit(rng.normal(size=(n, dim)))
        y = np.repeat(np.arange(n), 20)
        text = unit(u[y] + rng.normal(scale=0.2 / np.sqrt(dim), size=(len(y), dim))).astype(np.float32)
        y_img = np.repeat(np.arange(n), 100)
        gap = 0.8 * unit(rng.normal(size=dim))
        images = unit(u[y_img] + gap + rng.normal(scale=3.6 / np.sqrt(dim), size=(len(y_img), dim))).astype(np.float32)
        acc = {
            s: score(
                predict(images, train_adapter("tap-head", text, y, n, TapRecipe(steps=300, seed=seed, noise_std=s)).weight),
                y_img,
                n,
            ).top1
            for s in (0.0, 0.1)
        }
        assert acc[0.1] > acc[0.0], acc


@pytest.mark.parametrize("adapter", ["zs-head", "tap-residual"])
def test_zero_shot_started_adapters_equal_zero_shot_at_step_0(adapter):
    rng = np.random.default_rng(0)
    protos = unit(rng.normal(size=(6, 32))).astype(np.float32)
    text = unit(rng.normal(size=(30, 32))).astype(np.float32)
    images = unit(rng.normal(size=(200, 32))).astype(np.float32)
    head = train_adapter(adapter, text, np.arange(30) % 6, 6, TapRecipe(steps=0), protos, logit_scale=100.0)
    assert np.allclose(head.weight, 100 * protos, atol=1e-4)
    assert np.array_equal(predict(images, head.weight), predict(images, protos))
    trained = train_adapter(adapter, text, np.arange(30) % 6, 6, TapRecipe(steps=30), protos, logit_scale=100.0)
    assert not np.allclose(trained.weight, head.weight)


def test_tap_residual_trains_only_the_residual():
    rng = np.random.default_rng(1)
    protos = unit(rng.normal(size=(4, 16))).astype(np.float32)
    text = unit(np.repeat(protos, 10, axis=0) + 0.1 * rng.normal(size=(40, 16))).astype(np.float32)
    head = train_adapter("tap-residual", text, np.repeat(np.arange(4), 10), 4, TapRecipe(steps=50), protos, logit_scale=10.0)
    assert np.allclose(np.linalg.norm(head.weight, axis=1), 10.0, atol=1e-4)  # scale * normalise(t + alpha x)


def test_method_and_scoring_options():
    assert parse_methods(["tap", "zs-head+ot"]) == [("tap-head", "ce"), ("zs-head", "ot")]
    every = parse_methods(["all"])
    assert every == [
        ("tap-head", "ce"),
        ("tap-head", "ot"),
        ("zs-head", "ce"),
        ("zs-head", "ot"),
        ("tap-residual", "ce"),
        ("tap-residual", "ot"),
        ("taskres", "ce"),
        ("taskres", "ot"),
        ("tap-coop", "ce"),
        ("tap-coop", "ot"),
        ("protext", "l1"),
    ]
    names = [method_name(a, loss, "generic") for a, loss in every]
    assert len(set(names)) == len(names) and "protext:generic" in names and "taskres+ot:generic" in names
    # the old names are aliases: what is stored is the canonical name, so one recipe never has two names in results
    assert parse_methods(["residual", "prompt+ot", "tap-residual"]) == [("tap-residual", "ce"), ("tap-coop", "ot")]
    assert parse_scorings(["all"]) == ["plain", "ig"]
    with pytest.raises(TextadaptError, match="unknown adapter 'linear'"):
        parse_methods(["linear"])
    with pytest.raises(TextadaptError, match="unknown loss 'mse'"):
        parse_methods(["tap+mse"])
    with pytest.raises(TextadaptError, match="'protext\\+ot': protext .* OTTER's soft labels do not apply"):
        parse_methods(["protext+ot"])
    with pytest.raises(TextadaptError, match="unknown scoring 'bayes'"):
        parse_scorings(["bayes"])


def test_top5_and_mean_per_class():
    logits = np.array([[9, 8, 7, 6, 5, 4, 0], [0, 1, 2, 3, 4, 5, 9]], float)
    s = score_logits(logits, np.array([4, 0]), 7)
    assert s.top1 == 0 and s.top5 == 0.5
    assert score_logits(logits[:, :5], np.array([4, 0]), 5).top5 is None  # 5 classes or fewer: no top-5


def test_every_adapter_trains_through_the_harness(tiny_backbone, fmnist, home):
    """``--methods all`` on real pieces (the tiny backbone, a real DuckDB cache, Fashion-MNIST's classes): one
    classifier per method under its canonical name; taskres starts from its template's raw features, protext
    and tap-coop from the prompt learner; every +ot run logs how much of the plan its labelled class gets."""
    from textadapt import harness, pipeline
    from textadapt.datasets import restrict
    from textadapt.store import Store

    spec, _ = restrict(fmnist, None, 3, None)
    texts = {
        "T-shirt or top": ["a short-sleeved cotton top", "a plain t-shirt with a round neck", "a light summer top"],
        "trouser": ["long trousers with two legs", "a pair of pants with a waistband", "straight-leg jeans"],
        "pullover": ["a knitted pullover with long sleeves", "a warm wool sweater", "a thick jumper"],
    }
    entries = [("generic", f"{c}-{k}", spec.classes.index(c), t, None) for c, ts in texts.items() for k, t in enumerate(ts)]
    sets = pipeline.select(entries).sets
    store = Store(home / "textadapt.duckdb")
    options = RunOptions(dataset=spec.name, methods=["all"], seed=1, seeds=1)
    config = replace(harness.HarnessConfig.from_options(options, steps=6), prompt_steps=3, epochs=6)
    free, _ = harness.training_free(tiny_backbone, spec, store, sets, set())
    logged = []
    trained, _ = harness.adapted(tiny_backbone, spec, store, sets, harness.teacher_prototypes(free), config, log=logged.append)
    assert [c.method for c in trained] == [method_name(a, loss, "generic") for a, loss in config.methods]
    assert [(c.adapter, c.loss) for c in trained] == config.methods
    scale = tiny_backbone.logit_scale
    for c in trained:
        w = c.weights[0]
        assert w.shape == (3, tiny_backbone.embed_dim) and np.isfinite(w).all(), c.method
        if c.adapter in ("tap-residual", "taskres", "tap-coop", "protext"):  # scale * unit rows
            np.testing.assert_allclose(np.linalg.norm(w, axis=1), scale, rtol=1e-4, err_msg=c.method)
    ot_lines = [line for line in logged if "the OT plan gives the labelled class" in line]
    assert len(ot_lines) == sum(loss == "ot" for _, loss in config.methods)
    for line in ot_lines:
        first = float(line.split("labelled class ")[1].split(" ")[0])
        assert first > 1.5 / 3, line  # far from a uniform plan's 1/3
