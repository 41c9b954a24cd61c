"""Significance and bucketing for the experiments: the paired bootstrap of the paper's Table 1 and the
perplexity buckets of its Table 2. Pure numpy over per-item scores, so any two runs on the same items compare."""

from __future__ import annotations

import numpy as np

from ..errors import KnnMoeError


def paired_bootstrap(scores: np.ndarray, baseline: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> float:
    """Two-sided p-value that `scores` and `baseline` (per-item, the same items in the same order) have equal means.

    Items are resampled with replacement, the same indices for both runs (paired); p is twice the smaller share of
    resampled mean differences on either side of zero. Seeded: the same inputs always give the same p.
    """
    scores, baseline = np.asarray(scores, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if scores.shape != baseline.shape or scores.ndim != 1:
        raise KnnMoeError(f"paired bootstrap needs two equal-length 1-d score arrays, got {scores.shape} and "
                          f"{baseline.shape}: were both runs on the same test items?")
    if scores.size == 0:
        raise KnnMoeError("paired bootstrap over zero items: the test split is empty")
    rng = np.random.default_rng(seed)
    diff = scores - baseline  # (n_items,)
    idx = rng.integers(0, diff.size, size=(n_resamples, diff.size))  # (n_resamples, n_items)
    means = diff[idx].mean(axis=1)  # (n_resamples,)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


BUCKETS = ("High", "Mid", "Low")


def perplexity_buckets(ppl: np.ndarray) -> np.ndarray:
    """Bucket name per item: three equal-sized groups by perplexity, as the paper's Table 2 (ties by item order)."""
    ppl = np.asarray(ppl, dtype=np.float64)
    order = np.argsort(-ppl, kind="stable")  # highest perplexity first
    names = np.empty(ppl.size, dtype=object)
    for bucket, chunk in zip(BUCKETS, np.array_split(order, 3)):
        names[chunk] = bucket
    return names
