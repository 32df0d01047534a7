"""pwopsd.evaluation.stats against naive loops and exact enumeration on small hand data."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from pwopsd.evaluation import stats


def naive_percentile(values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile written out: h = (n − 1)·q, interpolate between the neighbours."""
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def naive_bootstrap(strata: list[list[float]], n: int, seed: int) -> list[float]:
    """Replicates drawn as documented: per stratum, rows of `integers(0, P, (n, P))`; one mean per row, loop by loop."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(s), size=(n, len(s))) for s in strata]
    out = []
    for b in range(n):
        means = []
        for s, idx in zip(strata, draws):
            picked = [s[int(i)] for i in idx[b]]
            means.append(sum(picked) / len(picked))
        out.append(sum(means) / len(means))
    return out


def exact_sign_flip_p(strata: list[list[float]]) -> float:
    """Two-sided p over all 2^P sign patterns: share of patterns with |T| >= |T_observed| (T = equal-weight mean)."""
    k = len(strata)
    values = [v for s in strata for v in s]
    weights = [1 / (k * len(s)) for s in strata for _ in s]
    observed = sum(w * v for w, v in zip(weights, values))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(values)):
        t = sum(sg * w * v for sg, w, v in zip(signs, weights, values))
        hits += abs(t) >= abs(observed) - 1e-9
        total += 1
    return hits / total


def test_bootstrap_equals_naive_loop_same_seed() -> None:
    strata = [[0.0, 25.0, 100.0, 50.0, 75.0], [100.0, 0.0, 0.0]]
    for chosen in (strata[:1], strata):
        fast = stats.bootstrap_means(chosen, 300, np.random.default_rng(7))
        slow = naive_bootstrap(chosen, 300, 7)
        assert fast == pytest.approx(slow, abs=1e-12)
        low, high = stats.percentile_interval(fast)
        assert (low, high) == pytest.approx((naive_percentile(slow, 2.5), naive_percentile(slow, 97.5)), abs=1e-12)
        assert stats.bootstrap_ci(chosen, 300, np.random.default_rng(7)) == (low, high)  # same seed, same numbers
    other = stats.bootstrap_means(strata, 300, np.random.default_rng(8))  # another seed, other draws
    assert list(other) != list(stats.bootstrap_means(strata, 300, np.random.default_rng(7)))


def test_bootstrap_distribution_matches_enumeration() -> None:
    """P = 3: the 27 equally likely resamples give the exact bootstrap distribution of the mean."""
    values = [0.0, 30.0, 90.0]
    exact = Counter(round(sum(values[i] for i in idx) / 3, 6) for idx in itertools.product(range(3), repeat=3))
    n = 60_000
    drawn = Counter(round(float(m), 6) for m in stats.bootstrap_means([values], n, np.random.default_rng(0)))
    assert set(drawn) == set(exact)
    for mean, count in exact.items():
        assert drawn[mean] / n == pytest.approx(count / 27, abs=0.01)


@pytest.mark.parametrize(
    "strata",
    [
        [[12.5, -25.0, 0.0, 50.0, -12.5, 37.5]],
        [[25.0, 25.0, -50.0], [100.0, -25.0, 0.0, 12.5]],
        [[1.0, -1.0, 1.0, 1.0]],
    ],
)
def test_sign_flip_exact_matches_enumeration(strata: list[list[float]]) -> None:
    # 2^P <= n_resamples: scipy enumerates every sign pattern, the p-value is exact
    assert stats.sign_flip_pvalue(strata, 10_000, np.random.default_rng(0)) == pytest.approx(
        exact_sign_flip_p(strata), abs=1e-12
    )


def test_sign_flip_random_close_to_exact() -> None:
    rng = np.random.default_rng(3)
    strata = [list(rng.choice([-100.0, -50.0, 0.0, 50.0, 100.0], size=9)), list(rng.normal(10, 40, size=7))]
    exact = exact_sign_flip_p(strata)  # 2^16 patterns
    drawn = stats.sign_flip_pvalue(strata, 4000, np.random.default_rng(1))  # 4000 < 2^16: random patterns
    assert drawn == pytest.approx(exact, abs=0.04)
    assert drawn == stats.sign_flip_pvalue(strata, 4000, np.random.default_rng(1))


def test_identical_results_give_zero_interval_and_p_one() -> None:
    """Two methods with the same per-problem values: every difference is 0 -> interval [0, 0] and p = 1."""
    a = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0, 0.25, 0.5, 0.0, 1.0, 0.75, 0.5]  # 13 problems: 2^13 > 4000, random
    diffs = [[100 * (x - x) for x in a]]
    for n_perm in (4000, 10_000):
        result = stats.paired_difference(diffs, 2000, n_perm, 0, "cell")
        assert (result.mean, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert result.ci_low <= 0.0 <= result.ci_high and result.n_problems == 13


def test_every_problem_flipping_from_wrong_to_right() -> None:
    """Baseline 0 and method 1 on every problem: difference +100 percentage points, interval [+100, +100].

    Exact p: only the two all-same-sign patterns reach |T| = 100, so p = 2 / 2^P.
    """
    p = 8
    diffs = [[100.0 * (1.0 - 0.0)] * p]
    result = stats.paired_difference(diffs, 1000, 10_000, 0, "cell")
    assert (result.mean, result.ci_low, result.ci_high) == (100.0, 100.0, 100.0)
    assert result.p_value == pytest.approx(2 / 2**p, abs=1e-12)
    two = stats.paired_difference([[100.0] * 5, [100.0] * 3], 1000, 10_000, 0, "cell")  # two benchmarks
    assert (two.mean, two.ci_low, two.ci_high, two.n_problems) == (100.0, 100.0, 100.0, 8)
    assert two.p_value == pytest.approx(2 / 2**8, abs=1e-12)


def test_keyed_generators() -> None:
    """A cell's draws depend on the seed and its key only."""
    a = stats.rng_for(0, "run", "math500", "avg").integers(0, 1000, 5)
    assert list(a) == list(stats.rng_for(0, "run", "math500", "avg").integers(0, 1000, 5))
    assert list(a) != list(stats.rng_for(1, "run", "math500", "avg").integers(0, 1000, 5))
    assert list(a) != list(stats.rng_for(0, "run", "aime24", "avg").integers(0, 1000, 5))


def test_empty_stratum_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        stats.bootstrap_ci([[1.0], []], 10, np.random.default_rng(0))
