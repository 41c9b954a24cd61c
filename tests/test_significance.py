"""Paired bootstrap and perplexity buckets (experiments/significance.py), and Selective's lowest-perplexity share."""

import numpy as np
import pytest

from knnmoe_eval.errors import KnnMoeError
from knnmoe_eval.experiments.significance import paired_bootstrap, perplexity_buckets
from knnmoe_eval.harness.selective import lowest_fraction


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 60).astype(float)
    better = base.copy()
    better[rng.choice(60, 6, replace=False)] = 1.0  # a few items flipped to correct
    p = paired_bootstrap(better, base, 1000, seed=0)
    assert p == paired_bootstrap(better, base, 1000, seed=0)
    assert p != paired_bootstrap(better, base, 1000, seed=1)
    assert paired_bootstrap(base, base, 1000, seed=0) == 1.0  # identical runs: no difference in any resample


def test_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float)
    gain = np.where(rng.random(400) < 0.3, 1.0, base)  # ~+15 points, same items
    noise = np.where(rng.random(400) < 0.05, 1.0 - base, base)  # a few items flipped both ways
    assert paired_bootstrap(gain, base) < 0.05
    assert paired_bootstrap(noise, base) > 0.05


def test_bootstrap_refuses_unpaired_runs():
    with pytest.raises(KnnMoeError, match="same test items"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(KnnMoeError, match="empty"):
        paired_bootstrap(np.ones(0), np.ones(0))


def test_perplexity_buckets_are_equal_thirds_by_perplexity():
    ppl = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    assert list(perplexity_buckets(ppl)) == ["Mid", "Low", "High", "Mid", "High", "Low"]
    assert lowest_fraction(ppl, 1 / 3).tolist() == [False, True, False, False, False, True]
