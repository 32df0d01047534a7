"""Evaluation metrics as small pure functions (docs/evaluation.md#metrics).

P problems, N samples each, c_i correct samples of problem i:

* Pass@N   = 100 · #{i : c_i ≥ 1} / P
* Avg@N    = 100 · Σ c_i / (P · N)
* Maj@N    = 100 · #{i : the clustered majority of problem i is correct} / P   (vote.majority_vote)
* format_rate = 100 · #formatted samples / (P · N)
* pass@k   = 100 · mean_i [1 − C(N − c_i, k) / C(N, k)]  (unbiased estimator, Chen et al. 2021); equals Pass@N at k = N
  and Avg@N at k = 1.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples: 1 − C(n−c, k)/C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms large binomials (Chen et al. 2021, Codex paper).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_values(n: int) -> list[int]:
    """The k reported for N = n samples: 1, 2, 4, 8, ... below n, then n itself (e.g. n = 12 → 1, 2, 4, 8, 12)."""
    if n < 1:
        return []
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def pass_at_k_table(correct_counts: Sequence[int], n: int) -> dict[str, float]:
    """Percent pass@k averaged over problems, keyed by str(k) for k in `pass_at_k_values(n)`."""
    if not correct_counts:
        return {str(k): 0.0 for k in pass_at_k_values(n)}
    return {
        str(k): 100.0 * sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
        for k in pass_at_k_values(n)
    }


def pct(count: int, total: int) -> float:
    """100 · count / total, 0 for an empty total."""
    return 100.0 * count / total if total else 0.0


def aggregate_metrics(
    correct_counts: Sequence[int], majority_correct: Sequence[bool], formatted_counts: Sequence[int], n: int
) -> dict[str, float | int]:
    """The result JSON's top-level metric keys (docs/evaluation.md#output-json) from per-problem counts, N = `n`."""
    if not len(correct_counts) == len(majority_correct) == len(formatted_counts):
        raise ValueError("per-problem lists differ in length")
    problems = len(correct_counts)
    total = problems * n
    passed = sum(1 for c in correct_counts if c >= 1)
    correct = int(sum(correct_counts))
    majority = sum(1 for m in majority_correct if m)
    formatted = int(sum(formatted_counts))
    return {
        "num_problems": problems,
        "total_solutions": total,
        "pass_at_n": passed,
        "pass_at_n_pct": pct(passed, problems),
        "average_at_n": correct,
        "average_at_n_pct": pct(correct, total),
        "majority_vote_at_n": majority,
        "majority_vote_at_n_pct": pct(majority, problems),
        "formatted_count": formatted,
        "format_rate": pct(formatted, total),
    }
