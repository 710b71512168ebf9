"""Trained heads are content-addressed in the cache (textadapt/head_cache.py): a re-run with the same inputs reads its
heads back and trains none; a change to any input trains exactly the heads it changes. Real parts: the tiny open_clip
backbone, a real DuckDB cache file reopened between runs as a new run would."""

from dataclasses import replace

import numpy as np
import torch

from textadapt import harness, head_cache, pipeline
from textadapt.adapters import TapRecipe
from textadapt.datasets import restrict
from textadapt.head_cache import HeadInputs, head_key
from textadapt.losses import OTTERSoftLabels
from textadapt.store import Store

TEXTS = {
    "T-shirt or top": ["a short-sleeved cotton top", "a plain t-shirt with a round neck", "a light summer top"],
    "trouser": ["long trousers with two legs", "a pair of pants with a waistband", "straight-leg jeans"],
    "pullover": ["a knitted pullover with long sleeves", "a warm wool sweater", "a thick jumper"],
}
CONFIG = harness.HarnessConfig(
    methods=[("tap-head", "ce"), ("zs-head", "ot"), ("tap-coop", "ce")],
    scorings=["plain"],
    seeds=[1, 2],
    steps=6,
    prior="empty-text",
    beta=1.0,
    ot_alpha=0.5,
    ot_eps=0.15,
    ot_iters=5,
    prompt_steps=3,
)


def _sets(spec, texts):
    entries = [("generic", f"{c}-{k}", spec.classes.index(c), t, None) for c, ts in texts.items() for k, t in enumerate(ts)]
    return pipeline.select(entries).sets


def _run(backbone, spec, cache, texts=TEXTS, config=CONFIG, spy=None):
    """One run's adapted stage on a fresh Store of ``cache``: (classifiers, log lines, (method, seed) trained)."""
    trained, logged = [], []
    real = harness._train

    def counting(h, bb):
        trained.append((harness.method_name(h.adapter, h.loss, "generic"), h.recipe.seed))
        return real(h, bb)

    spy.setattr(harness, "_train", counting)
    with Store(cache) as store:
        sets = _sets(spec, texts)
        free, _ = harness.training_free(backbone, spec, store, sets, set())
        out, _ = harness.adapted(backbone, spec, store, sets, harness.teacher_prototypes(free), config, log=logged.append)
    return out, logged, trained


def test_a_rerun_reads_every_head_back_and_a_changed_input_trains_exactly_its_heads(tiny_backbone, fmnist, home, monkeypatch):
    spec, _ = restrict(fmnist, None, 3, None)
    cache = home / "textadapt.duckdb"
    first, logged, trained = _run(tiny_backbone, spec, cache, spy=monkeypatch)
    assert len(trained) == 6  # 3 methods x 2 seeds
    assert "tap-head:generic: trained 2 seed(s) in" in "\n".join(logged)

    # Unchanged: nothing trains; the same weights, losses, seconds and device; the log says where they came from.
    again, logged, trained = _run(tiny_backbone, spec, cache, spy=monkeypatch)
    assert trained == []
    for a, b in zip(first, again):
        assert a.method == b.method
        for x, y in zip(a.heads, b.heads):
            assert np.array_equal(x.weight, y.weight) and x.weight.dtype == y.weight.dtype == np.float32
            assert (x.losses, x.seconds, x.device, x.seed, x.labelled_mass) == (
                y.losses,
                y.seconds,
                y.device,
                y.seed,
                y.labelled_mass,
            )
            assert not x.cached and y.cached
    for method in ("tap-head:generic", "zs-head+ot:generic", "tap-coop:generic"):
        assert any(line.startswith(f"{method}: 2 seed(s) from the cache (trained in ") for line in logged), logged
    ot_lines = [line for line in logged if "the OT plan gives the labelled class" in line]
    assert len(ot_lines) == 2 and all(line.endswith("(from the cache)") for line in ot_lines)
    with Store(cache, read_only=True) as s:
        assert s.query("SELECT count(*), count(DISTINCT key), count(labelled_mass) FROM trained_heads") == [(6, 6, 2)]

    # Another seed: only that seed's heads train.
    _, _, trained = _run(tiny_backbone, spec, cache, config=replace(CONFIG, seeds=[2, 3]), spy=monkeypatch)
    assert sorted(trained) == [("tap-coop:generic", 3), ("tap-head:generic", 3), ("zs-head+ot:generic", 3)]
    # Steps: the heads with TAP's recipe train again; tap-coop has its own steps.
    _, _, trained = _run(tiny_backbone, spec, cache, config=replace(CONFIG, steps=7), spy=monkeypatch)
    assert sorted(trained) == [
        ("tap-head:generic", 1),
        ("tap-head:generic", 2),
        ("zs-head+ot:generic", 1),
        ("zs-head+ot:generic", 2),
    ]
    # An OT setting: only the +ot heads.
    _, logged, trained = _run(tiny_backbone, spec, cache, config=replace(CONFIG, ot_eps=0.2), spy=monkeypatch)
    assert sorted(trained) == [("zs-head+ot:generic", 1), ("zs-head+ot:generic", 2)]
    assert "tap-head:generic: 2 seed(s) from the cache" in "\n".join(logged)
    # One description edited (so its embedding): every head trains again.
    edited = {**TEXTS, "trouser": ["long trousers with two legs", "a pair of pants with a belt", "straight-leg jeans"]}
    _, _, trained = _run(tiny_backbone, spec, cache, texts=edited, spy=monkeypatch)
    assert len(trained) == 6


def test_the_key_hashes_every_input(monkeypatch):
    """Each input of a head changes its key; equal inputs (other arrays, same bytes) give the same key."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 8)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    start = rng.normal(size=(3, 8)).astype(np.float32)
    base = HeadInputs("zs-head", "ot", TapRecipe(steps=5, seed=1), OTTERSoftLabels(0.5, 0.15, 5), emb, labels, start, 100.0,
                      ["a", "b", "c"], "ARCH@abc", "cpu")  # fmt: skip
    key = head_key(base)
    same = replace(
        base, embeddings=emb.copy(), labels=labels.astype(np.int32), start=start.copy(), recipe=TapRecipe(steps=5, seed=1)
    )
    assert head_key(same) == key
    flipped = emb.copy()
    flipped[3, 5] = np.nextafter(flipped[3, 5], np.float32(np.inf))  # one bit of one embedding
    changes = {
        "adapter": replace(base, adapter="tap-residual"),
        "loss": replace(base, loss="ce", ot=None),
        "seed": replace(base, recipe=TapRecipe(steps=5, seed=2)),
        "steps": replace(base, recipe=TapRecipe(steps=6, seed=1)),
        "a recipe field": replace(base, recipe=TapRecipe(steps=5, seed=1, noise_std=0.2)),
        "an OT setting": replace(base, ot=OTTERSoftLabels(0.5, 0.15, 6)),
        "an embedding": replace(base, embeddings=flipped),
        "a label": replace(base, labels=np.array([0, 0, 1, 2, 2, 2])),
        "the start weights": replace(base, start=start * 2),
        "no start weights": replace(base, start=None),
        "the logit scale": replace(base, logit_scale=50.0),
        "a class name": replace(base, classes=["a", "b", "d"]),
        "the backbone": replace(base, backbone="ARCH@abd"),
        "the device": replace(base, device="cuda"),
    }
    keys = {name: head_key(h) for name, h in changes.items()}
    assert all(k != key for k in keys.values()), [name for name, k in keys.items() if k == key]
    assert len(set(keys.values())) == len(keys)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert head_key(base) != key
    monkeypatch.undo()
    monkeypatch.setattr(head_cache, "TRAINING_SCHEME", head_cache.TRAINING_SCHEME + 1)
    assert head_key(base) != key


def test_heads_round_trip_through_the_cache_and_the_first_stays(tmp_path):
    from textadapt.store import StoredHead

    w = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    head = StoredHead("k1", "tap-head", "ce", 7, "A@1", {"recipe": {"steps": 5}}, w, [1.5, 0.25], 0.75, "cpu")
    with Store(tmp_path / "c.duckdb") as s:
        s.start_run("r1", "d", {})
        s.put_trained_heads([head])
        s.put_trained_heads([replace(head, weight=w * 2, seconds=9.0)])  # the same key again: the first row stays
        with Store(tmp_path / "c.duckdb", read_only=True) as reader:  # a reader sees the staged row
            assert set(reader.trained_heads(["k1", "k2"])) == {"k1"}
    with Store(tmp_path / "c.duckdb", read_only=True) as s:  # folded into the file
        got = s.trained_heads(["k1"])["k1"]
        assert np.array_equal(got.weight, w) and got.weight.dtype == np.float32
        assert (got.losses, got.seconds, got.settings, got.labelled_mass, got.run_id) == (
            [1.5, 0.25],
            0.75,
            {"recipe": {"steps": 5}},
            None,
            "r1",
        )
