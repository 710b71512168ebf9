import numpy as np
import pytest

from textadapt.adapters import CHUNK_BYTES, TapRecipe, chunk_size, train_adapter, train_tap_head
from textadapt.losses import OTTERSoftLabels
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


# ---------------------------------------------------------------------------------------------
# Bounded memory: a full-batch step over the descriptions in chunks equals the one-pass step.


@pytest.mark.parametrize("adapter", ["tap-head", "zs-head", "tap-residual"])
def test_chunked_steps_give_the_full_batch_weights(adapter):
    """Chunks of 48 descriptions (500 in all, so the last chunk is short), gradients accumulated, the noise
    drawn chunk by chunk from the same generator: the same weights as one pass over all 500, to float
    summation order."""
    text, y, centres = clusters(np.random.default_rng(2), per_class=100)
    recipe = TapRecipe(steps=40, seed=5)
    whole = train_adapter(adapter, text, y, 5, recipe, centres.astype(np.float32))
    chunked = train_adapter(adapter, text, y, 5, TapRecipe(steps=40, seed=5, chunk=48), centres.astype(np.float32))
    np.testing.assert_allclose(chunked.weight, whole.weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-5)
    other_noise = train_adapter(adapter, text, y, 5, TapRecipe(steps=40, seed=6, chunk=48), centres.astype(np.float32))
    assert np.abs(other_noise.weight - whole.weight).max() > 1e-3  # the tolerance would see another noise stream


def test_chunked_steps_with_otter_plans_give_the_full_batch_weights():
    """+ot: the step's shuffled order and its plan blocks do not depend on the chunking."""
    text, y, centres = clusters(np.random.default_rng(3), per_class=100)
    runs = [
        train_adapter(
            "zs-head",
            text,
            y,
            5,
            TapRecipe(steps=20, seed=1, chunk=chunk),
            centres.astype(np.float32),
            loss=OTTERSoftLabels(block=64),
        )
        for chunk in (None, 128)
    ]
    np.testing.assert_allclose(runs[1].weight, runs[0].weight, rtol=1e-5, atol=1e-5)


def test_chunk_size_bounds_the_working_memory():
    for n, dim, classes, block in [(1_000_000, 512, 1000, None), (1_000_000, 512, 10, 512), (1000, 512, 10, None)]:
        rows = chunk_size(n, dim, classes, block)
        assert rows % 16 == 0 and (block is None or rows % block == 0)
        assert rows * 4 * (2 * dim + 4 * classes) <= CHUNK_BYTES or rows == max(16, block or 16)
        assert rows <= n + 15  # never more than the descriptions (rounded up to whole noise runs)
    assert chunk_size(1_000_000, 512, 1000) < 20_000 < chunk_size(1_000_000, 512, 10)
    with pytest.raises(ValueError, match="multiple of the loss's plan block 512"):
        train_adapter(
            "tap-head", *clusters(np.random.default_rng(0))[:2], 5, TapRecipe(steps=1, chunk=100), loss=OTTERSoftLabels()
        )
