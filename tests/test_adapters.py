import numpy as np

from textadapt.adapters import TapRecipe, train_tap_head
from textadapt.scoring import predict, score


def clusters(rng, n_classes=5, dim=32, per_class=40, spread=0.3, shift=None):
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per_class, axis=0) + rng.normal(scale=spread / np.sqrt(dim), size=(n_classes * per_class, dim))
    if shift is not None:
        x = x + shift
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(n_classes), per_class), centres


def test_tap_head_trained_on_text_classifies_shifted_images():
    rng = np.random.default_rng(0)
    text, y, centres = clusters(rng)
    # "Images": the same classes seen through a modality gap (a shared offset), as CLIP's are.
    gap = rng.normal(scale=0.5 / np.sqrt(32), size=32)
    images = np.repeat(centres, 40, axis=0) + gap + rng.normal(scale=0.3 / np.sqrt(32), size=(200, 32))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    head = train_tap_head(text, y, 5, TapRecipe(steps=300))
    assert head.weight.shape == (5, 32)
    assert head.losses[-1] < head.losses[0]
    assert score(predict(images, head.weight), y, 5).top1 > 0.9


def test_training_is_seeded():
    text, y, _ = clusters(np.random.default_rng(1))
    a = train_tap_head(text, y, 5, TapRecipe(steps=20, seed=3))
    b = train_tap_head(text, y, 5, TapRecipe(steps=20, seed=3))
    c = train_tap_head(text, y, 5, TapRecipe(steps=20, seed=4))
    assert np.array_equal(a.weight, b.weight)
    assert not np.array_equal(a.weight, c.weight)


def test_score_per_class():
    s = score(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 4)
    assert s.top1 == 4 / 6
    assert np.allclose(s.per_class[:3], [1 / 2, 1 / 2, 1.0]) and np.isnan(s.per_class[3])
    assert np.isclose(s.mean_per_class, 2 / 3)
