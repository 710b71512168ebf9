"""The statistics behind every interval: checked against scipy and on synthetic classifiers with known answers."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from textadapt import stats


def classifiers(n: int, acc_a: float, acc_b: float, n_classes: int = 4, seed: int = 0):
    """Labels and two classifiers' per-image correctness, drawn independently with the given accuracies."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    return labels, (rng.random(n) < acc_a).astype(float), (rng.random(n) < acc_b).astype(float)


def test_two_identical_classifiers_gain_nothing_for_sure():
    labels, a, _ = classifiers(500, 0.6, 0.6)
    d = stats.differences(a[None], a, labels, 4, ["same"], "ref")
    for arr in (
        d.top1,
        d.top1_low,
        d.top1_high,
        d.mean_per_class,
        d.mean_per_class_low,
        d.mean_per_class_high,
        d.per_class,
        d.per_class_low,
        d.per_class_high,
    ):
        assert np.all(arr == 0)
    assert stats.paired_bootstrap(a, a) == stats.Interval(0.0, 0.0, 0.0)
    assert stats.mcnemar(a > 0, a > 0) == stats.McNemar(0, 0, 1.0)


def test_two_equally_good_classifiers_have_an_interval_around_zero():
    labels, a, b = classifiers(2000, 0.6, 0.6, seed=1)
    gain = stats.paired_bootstrap(a, b)
    assert gain.low < 0 < gain.high and gain.sign == 0
    assert stats.mcnemar(a > 0, b > 0).p_value > 0.05


def test_a_clearly_better_classifier_has_an_interval_above_zero():
    labels, worse, better = classifiers(1000, 0.5, 0.8, seed=2)
    d = stats.differences(np.stack([better, worse]), worse, labels, 4, ["better", "worse"], "worse")
    gain = d.top1_interval("better")
    assert gain.value == pytest.approx(better.mean() - worse.mean())
    assert 0.2 < gain.low < gain.value < gain.high < 0.4 and gain.sign == 1
    assert d.mean_per_class_interval("better").sign == 1
    assert all(d.class_interval("better", k).sign == 1 for k in range(4))
    assert stats.paired_bootstrap(worse, better).sign == -1  # the other way round
    test = stats.mcnemar(better > 0, worse > 0)
    assert test.only_a > test.only_b and test.p_value < 1e-10


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 1), (3, 3), (7, 2), (2, 11), (40, 60), (480, 520), (20000, 20400)])
def test_mcnemar_is_scipys_exact_binomial_test(only_a, only_b):
    # McNemar's exact test is the two-sided binomial test of the discordant pairs at 1/2.
    both, neither = 17, 5
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, bool)
    test = stats.mcnemar(a, b)
    assert (test.only_a, test.only_b) == (only_a, only_b)
    expected = 1.0 if only_a + only_b == 0 else scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert test.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_top1_interval_agrees_with_scipys_paired_bootstrap():
    labels, a, b = classifiers(400, 0.55, 0.65, seed=3)
    ours = stats.paired_bootstrap(b, a, n_resamples=20000)
    ref = scipy_stats.bootstrap(
        (b, a),
        lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20000,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(7),
    ).confidence_interval
    # Two Monte Carlo estimates of the same percentiles: each off by about 0.05 points at this size.
    assert ours.low == pytest.approx(ref.low, abs=0.003) and ours.high == pytest.approx(ref.high, abs=0.003)
    assert ours.value == pytest.approx(b.mean() - a.mean())


def test_every_method_gets_the_interval_it_would_get_alone():
    # One call for many methods uses one resample for all of them; each interval is still that pair's interval.
    labels, a, b = classifiers(300, 0.5, 0.7, seed=4)
    _, c, _ = classifiers(300, 0.6, 0.6, seed=5)
    d = stats.differences(np.stack([b, c]), a, labels, 4, ["b", "c"], "a", n_resamples=4000)
    for name, x in (("b", b), ("c", c)):
        alone = stats.paired_bootstrap(x, a, n_resamples=4000, seed=11)
        got = d.top1_interval(name)
        assert got.value == alone.value
        assert got.low == pytest.approx(alone.low, abs=0.01) and got.high == pytest.approx(alone.high, abs=0.01)


def test_per_class_intervals_resample_each_class_on_its_own():
    labels, a, b = classifiers(600, 0.5, 0.7, n_classes=3, seed=6)
    d = stats.differences(b[None], a, labels, 3, ["b"], "a", n_resamples=20000)
    rng = np.random.default_rng(8)
    mean_per_class = np.zeros(20000)
    for k in range(3):
        x, y = b[labels == k], a[labels == k]
        ref = scipy_stats.bootstrap(
            (x, y),
            lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=20000,
            method="percentile",
            random_state=np.random.default_rng(k),
        ).confidence_interval
        got = d.class_interval("b", k)
        assert got.value == pytest.approx(x.mean() - y.mean())
        assert got.low == pytest.approx(ref.low, abs=0.006) and got.high == pytest.approx(ref.high, abs=0.006)
        # by hand: the mean over classes of each class's resampled difference
        idx = rng.integers(0, len(x), size=(20000, len(x)))
        mean_per_class += (x[idx] - y[idx]).mean(axis=1) / 3
    low, high = np.percentile(mean_per_class, [2.5, 97.5])
    got = d.mean_per_class_interval("b")
    assert got.value == pytest.approx(np.mean([b[labels == k].mean() - a[labels == k].mean() for k in range(3)]))
    assert got.low == pytest.approx(low, abs=0.004) and got.high == pytest.approx(high, abs=0.004)


def test_a_class_without_images_has_no_interval():
    labels, a, b = classifiers(200, 0.5, 0.7, n_classes=3, seed=9)
    d = stats.differences(b[None], a, labels, 5, ["b"], "a")  # classes 3 and 4 have no image
    assert np.isnan(d.per_class[0, 3:]).all() and np.isnan(d.per_class_low[0, 3:]).all()
    assert not np.isnan(d.per_class[0, :3]).any() and not np.isnan(d.mean_per_class_low[0])


def test_intervals_are_seeded_and_deterministic():
    labels, a, b = classifiers(300, 0.5, 0.6, seed=10)
    one = stats.differences(b[None], a, labels, 4, ["b"], "a", seed=3)
    again = stats.differences(b[None], a, labels, 4, ["b"], "a", seed=3)
    other = stats.differences(b[None], a, labels, 4, ["b"], "a", seed=4)
    assert one.top1_low == again.top1_low and (one.per_class_high == again.per_class_high).all()
    assert one.top1_low != other.top1_low and one.top1 == other.top1


def test_the_interval_covers_the_true_gain_about_95_times_in_100():
    # Many test sets drawn from two classifiers whose true accuracies differ by 5 points (correlated errors, as real
    # methods have): the 95% interval should hold +5 about 95% of the time.
    rng, covered, trials = np.random.default_rng(12), 0, 300
    for t in range(trials):
        hard = rng.random(400) < 0.4  # images both tend to get wrong
        a = (rng.random(400) < np.where(hard, 0.25, 0.85)).astype(float)
        b = (rng.random(400) < np.where(hard, 0.25, 0.85) + 0.05 / 0.6 * ~hard).astype(float)
        gain = stats.paired_bootstrap(b, a, n_resamples=500, seed=t)
        covered += gain.low <= 0.05 <= gain.high
    assert 0.90 <= covered / trials <= 0.99


def test_correctness_is_the_share_of_seeds_right():
    labels = np.array([0, 1, 2, 1])
    predicted = np.array([[0, 1, 0, 0], [0, 0, 2, 0], [0, 1, 2, 0]])  # three seeds
    np.testing.assert_allclose(stats.correctness(predicted, labels), [1, 2 / 3, 2 / 3, 0])
    np.testing.assert_allclose(stats.correctness(predicted[0], labels), [1, 1, 0, 0])
