"""The statistics of the diagnostic: AUROC, the cluster bootstrap, binning by relative position, the schedule fit.

Pure NumPy/SciPy on plain arrays, no model, so each rule is tested against a naive implementation. Why clusters: the
branches (or tokens) of one problem share its difficulty, so they are not independent; resampling branches would give
confidence intervals that are too narrow. Every interval here resamples whole problems, with a seeded generator, so a
re-run gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit
from scipy.stats import rankdata

from pwopsd.losses import LossHParams

MODERATE = (LossHParams.position_w_min, LossHParams.position_tau, LossHParams.position_s)
"""The paper's Moderate schedule (w_min, tau, s) = (0.25, 0.30, 0.10): the loss flags' defaults, as declared once in
`pwopsd.losses.LossHParams` (the launchers pass the same values)."""


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2; NaN without both classes.

    Mann-Whitney U from average ranks: U = Σ rank(positives) - n₊(n₊+1)/2, AUROC = U / (n₊ n₋).
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks: a tie between a positive and a negative contributes 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def oriented_auroc(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, str | None]:
    """AUROC in the predictor's better orientation: ("higher" = higher score predicts a positive, or "lower")."""
    auc = auroc(scores, labels)
    if np.isnan(auc):
        return auc, None
    return (auc, "higher") if auc >= 0.5 else (1.0 - auc, "lower")


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1); ties move together."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.array([], dtype=int)
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr


def cluster_draws(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_clusters] cluster indices drawn with replacement by `np.random.default_rng(seed)`, one row a draw.

    Every bootstrap here uses these draws, so the intervals of different predictors and bins share their resamples.
    """
    rng = np.random.default_rng(seed)
    return (
        np.stack([rng.integers(0, n_clusters, size=n_clusters) for _ in range(n_boot)])
        if n_boot
        else np.zeros((0, n_clusters), dtype=int)
    )


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], float], clusters: Sequence, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """`statistic(rows)` on `n_boot` resamples of whole clusters; `rows` indexes the original records.

    A resample draws as many clusters as there are, with replacement (`cluster_draws`), and takes all rows of each drawn
    cluster (a cluster drawn twice appears twice). Clusters are the sorted distinct values of `clusters`.
    """
    c = np.asarray(clusters)
    uniq, inverse = np.unique(c, return_inverse=True)
    groups = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    out = np.empty(n_boot)
    for b, draw in enumerate(cluster_draws(len(uniq), n_boot, seed)):
        out[b] = statistic(np.concatenate([groups[i] for i in draw]))
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap samples (NaN, NaN when none is finite)."""
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))


def bin_index(u: Sequence[float], n_bins: int) -> np.ndarray:
    """Bin of each relative position u ∈ [0, 1]: floor(u · n_bins), u = 1 in the last bin (bins [i/n, (i+1)/n))."""
    return np.clip(np.floor(np.asarray(u, dtype=float) * n_bins).astype(int), 0, n_bins - 1)


def bin_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


@dataclass(frozen=True)
class BinnedMean:
    """Per-bin mean of a value over records, with its cluster-bootstrap interval (arrays of length n_bins)."""

    n: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def binned_mean(
    u: Sequence[float],
    values: Sequence[float],
    clusters: Sequence,
    n_bins: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BinnedMean:
    """Mean of `values` per u-bin (pooled over records) with a percentile CI from resampling whole clusters.

    The resampled statistic is the pooled mean Σ values / count over the records of the drawn clusters that fall in the
    bin; a draw with no record in the bin is left out of that bin's interval. Vectorised over draws: per-cluster sums
    and counts, so it equals `cluster_bootstrap` with the same seed on each bin (tested).
    """
    v = np.asarray(values, dtype=float)
    b = bin_index(u, n_bins)
    uniq, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    k = len(uniq)
    sums = np.zeros((n_bins, k))
    counts = np.zeros((n_bins, k))
    np.add.at(sums, (b, inverse), v)
    np.add.at(counts, (b, inverse), 1.0)
    n = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, sums.sum(1) / np.maximum(n, 1), np.nan)
        draws = cluster_draws(k, n_boot, seed)
        boot_sum = sums[:, draws].sum(-1)  # [n_bins, n_boot]
        boot_n = counts[:, draws].sum(-1)
        boot = np.where(boot_n > 0, boot_sum / np.maximum(boot_n, 1), np.nan)
    lo, hi = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    for i in range(n_bins):
        if n[i] > 0 and n_boot:
            lo[i], hi[i] = percentile_ci(boot[i], level)
    return BinnedMean(n=n.astype(int), mean=mean, lo=lo, hi=hi)


def schedule(u: np.ndarray, w_min: float, tau: float, s: float) -> np.ndarray:
    """w(u) = w_min + (1 - w_min) σ((u - τ)/s): NumPy twin of `pwopsd.losses.schedule_weight` (tested equal)."""
    return w_min + (1 - w_min) * expit((np.asarray(u, dtype=float) - tau) / max(s, 1e-6))


SCHEDULE_BOUNDS = ((0.0, 0.0, 0.01), (1.0, 1.0, 1.0))
"""Bounds of (w_min, τ, s) in the fit: a weight floor in [0, 1], the centre inside the completion, a width in [0.01, 1]."""


@dataclass(frozen=True)
class ScheduleFit:
    """A fitted schedule: scale a (the viability rate that w = 1 stands for) and (w_min, τ, s)."""

    scale: float
    w_min: float
    tau: float
    s: float
    cost: float

    def flags(self) -> str:
        return f"--position_w_min {self.w_min:.3g} --position_tau {self.tau:.3g} --position_s {self.s:.3g}"


def fit_schedule(u: Sequence[float], rate: Sequence[float], weight: Sequence[float] | None = None) -> ScheduleFit:
    """Fit rate(u) ≈ a · w(u; w_min, τ, s) by bounded weighted least squares (`scipy.optimize.least_squares`).

    Normalisation: the schedule's top (w → 1) is the rate at the end of the completion, unknown and noisy, so the scale
    a ∈ [0, 2] is fitted jointly; the normalised curve is rate / a. Residuals are weighted by sqrt(weight) (the bin's
    number of branches). Several starting centres are tried; the lowest cost wins, so the fit is deterministic.
    """
    x = np.asarray(u, dtype=float)
    y = np.asarray(rate, dtype=float)
    w = np.ones_like(y) if weight is None else np.asarray(weight, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (w > 0)
    x, y, sw = x[keep], y[keep], np.sqrt(w[keep])
    if len(x) < 4:
        raise ValueError(f"the schedule fit needs at least 4 bins with data, got {len(x)}")

    def residuals(p: np.ndarray) -> np.ndarray:
        return sw * (p[0] * schedule(x, p[1], p[2], p[3]) - y)

    lower = (0.0, *SCHEDULE_BOUNDS[0])
    upper = (2.0, *SCHEDULE_BOUNDS[1])
    top = float(max(y.max(), 1e-3))
    best = None
    for tau0 in (0.1, 0.3, 0.5, 0.7):
        for s0 in (0.05, 0.2):
            start = np.clip([top, MODERATE[0], tau0, s0], np.add(lower, 1e-9), np.subtract(upper, 1e-9))
            res = least_squares(residuals, start, bounds=(lower, upper), method="trf", x_scale="jac")
            if best is None or res.cost < best.cost - 1e-15:
                best = res
    a, w_min, tau, s = (float(v) for v in best.x)
    return ScheduleFit(scale=a, w_min=w_min, tau=tau, s=s, cost=float(best.cost))
