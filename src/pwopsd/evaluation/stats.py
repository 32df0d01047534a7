"""Statistics over problems: (stratified) bootstrap percentile intervals and the paired sign-flip permutation test.

Why over problems: a benchmark is a sample of problems, and most of the uncertainty of a score (and of a difference
between two methods evaluated on the same problems) comes from which problems were drawn. Each function takes one
array of per-problem values per benchmark ("stratum"); a statistic over several benchmarks is the equal-weight mean of
the per-benchmark means, and resampling happens within each benchmark, so every benchmark keeps its size.

The unit of resampling is the problem. A problem's value is already the mean over its seeds, so all seeds of a
resampled problem travel with it; for a paired difference the value is (method − baseline) on that problem, so the
difficulty of the problem is shared by both methods.

What these intervals do not contain: the variance of training. Each method is trained once; another training run
(another data order, another rollout seed) can move a score or a difference beyond its interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def rng_for(seed: int, *key: str) -> np.random.Generator:
    """A generator fixed by `seed` and the cell's key (run, benchmark, metric ...).

    Keyed rather than shared so a cell's interval does not change when other result files are added or removed.
    """
    return np.random.default_rng([seed, *(zlib.crc32(k.encode("utf-8")) for k in key)])


def _strata(strata: Sequence[Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(s, dtype=float) for s in strata]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("every stratum needs at least one value")
    return arrays


def point_estimate(strata: Sequence[Sequence[float]]) -> float:
    """Equal-weight mean over strata of each stratum's mean."""
    return float(np.mean([a.mean() for a in _strata(strata)]))


def bootstrap_means(strata: Sequence[Sequence[float]], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`n_resamples` bootstrap replicates of `point_estimate`, resampling values with replacement within each stratum.

    For each stratum in order, the indices are `rng.integers(0, P, size=(n_resamples, P))` (one row per replicate).
    """
    arrays = _strata(strata)
    total = np.zeros(n_resamples)
    for values in arrays:
        idx = rng.integers(0, values.size, size=(n_resamples, values.size))
        total += values[idx].mean(axis=1)
    return total / len(arrays)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval: the (1−c)/2 and (1+c)/2 quantiles (numpy's linear interpolation)."""
    alpha = (1 - confidence) / 2
    low, high = np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_ci(
    strata: Sequence[Sequence[float]], n_resamples: int, rng: np.random.Generator, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of `point_estimate` (stratified when there are several strata)."""
    return percentile_interval(bootstrap_means(strata, n_resamples, rng), confidence)


def sign_flip_pvalue(strata: Sequence[Sequence[float]], n_resamples: int, rng: np.random.Generator) -> float:
    """Two-sided p-value of "the mean difference is 0" by flipping the sign of each problem's difference.

    Under the null hypothesis the method and the baseline are exchangeable on every problem, so each per-problem
    difference is as likely to have either sign. `scipy.stats.permutation_test` with one sample and
    `permutation_type="samples"` does exactly this; it enumerates all 2^P sign patterns when 2^P <= `n_resamples`
    (exact p) and otherwise draws `n_resamples` random patterns from `rng`. Statistic: `point_estimate` (the
    equal-weight mean of the per-benchmark means), so several benchmarks are tested together.
    """
    from scipy.stats import permutation_test

    arrays = _strata(strata)
    values = np.concatenate(arrays)
    if len(arrays) == 1:

        def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean(x, axis=axis)

    else:
        weights = np.concatenate([np.full(a.size, 1.0 / (len(arrays) * a.size)) for a in arrays])

        def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.sum(np.moveaxis(x, axis, -1) * weights, axis=-1)

    result = permutation_test(
        (values,), statistic, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
        alternative="two-sided", random_state=rng,
    )  # fmt: skip
    return float(min(1.0, result.pvalue))


@dataclass(frozen=True)
class Paired:
    """A paired comparison: mean difference, its bootstrap interval, the permutation p-value, problems per stratum."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_problems: int


def paired_difference(
    diffs: Sequence[Sequence[float]], n_resamples: int, n_permutations: int, seed: int, *key: str
) -> Paired:
    """Mean of the per-problem differences (equal weight over strata), bootstrap interval and sign-flip p-value."""
    low, high = bootstrap_ci(diffs, n_resamples, rng_for(seed, "bootstrap", *key))
    p = sign_flip_pvalue(diffs, n_permutations, rng_for(seed, "permutation", *key))
    return Paired(point_estimate(diffs), low, high, p, sum(len(d) for d in diffs))
