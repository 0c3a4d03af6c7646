"""From per-example metrics to a per-head table: importance, its standard error, a bootstrap
confidence interval over examples, a paired test per head and its multiple-comparison corrections.

Shapes: ``N`` examples; ``clean [N]`` the unablated metric, ``ablated {(layer, head): [N]}``.

The test: each example is measured with and without the head, so the test is paired: a one-sample
t-test of the per-example differences ``ablated - clean`` against 0 (``test="t"``, the paired
t-test, :func:`scipy.stats.ttest_1samp`) or the Wilcoxon signed-rank test (``test="wilcoxon"``).
Differences without spread have no t statistic: all zero gives ``p = 1``, all of one nonzero
value the exact two-sided sign test ``p = 2 * 0.5**N``.
Corrections over the heads of one table (one family): Benjamini-Hochberg q-values
(:func:`scipy.stats.false_discovery_control`; claims at ``q < alpha`` control the false-discovery
rate) and Holm-adjusted p-values (``p_holm < alpha`` controls the family-wise error rate).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.stats import bootstrap

from headlens.errors import check
from headlens.importance.tasks import Task

TESTS = ("t", "wilcoxon")
TEST_NAMES = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
CORRECTIONS = {"bh": ("q_value", "Benjamini-Hochberg false-discovery rate"),
               "holm": ("p_holm", "Holm family-wise error rate"),
               "none": ("p_value", "no correction")}
ALPHA = 0.05


# --- tests and corrections ----------------------------------------------------------------
def paired_pvalues(diffs: np.ndarray, test: str = "t") -> np.ndarray:
    """Two-sided p-value per row of ``diffs [M, N]`` (per-example paired differences) for mean 0
    (t) or a distribution symmetric about 0 (Wilcoxon); NaN for rows with fewer than 2 examples."""
    check(test in TESTS, f"test must be one of {TESTS}, got {test!r}")
    diffs = np.atleast_2d(np.asarray(diffs, dtype=float))
    M, N = diffs.shape
    p = np.full(M, np.nan)
    if N < 2:
        return p
    spread = np.ptp(diffs, axis=1) > 1e-12 * np.maximum(1.0, np.abs(diffs).max(axis=1))
    if spread.any():
        if test == "t":
            p[spread] = stats.ttest_1samp(diffs[spread], 0.0, axis=1).pvalue
        else:
            p[spread] = [stats.wilcoxon(d, zero_method="zsplit").pvalue for d in diffs[spread]]
    flat = ~spread  # no spread: either no effect at all or the same effect on every example
    p[flat] = np.where(np.abs(diffs[flat, 0]) > 0, min(1.0, 2 * 0.5 ** N), 1.0)
    return p


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of ``p [M]`` (NaN entries stay NaN and do not count in M)."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def holm_adjusted(p: np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values of ``p [M]``: ``max_{j <= i} min(1, (M - j + 1) p_(j))``
    in sorted order (NaN entries stay NaN and do not count in M)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok):
        order = ok[np.argsort(p[ok], kind="stable")]
        m = len(order)
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
        out[order] = adj
    return out


def significant(table: pd.DataFrame, side: str, alpha: float = ALPHA, correction: str = "bh") -> pd.Series:
    """Boolean per row: the head's effect is significant after ``correction`` (``bh``, ``holm``,
    ``none``) at ``alpha`` and lies on ``side``: ``"harmful"`` (ablating it hurts: damage > 0) or
    ``"helpful"`` (ablating it improves the metric: damage < 0)."""
    check(correction in CORRECTIONS, f"correction must be one of {sorted(CORRECTIONS)}, got {correction!r}")
    check(side in ("harmful", "helpful"), f"side must be 'harmful' or 'helpful', got {side!r}")
    column = CORRECTIONS[correction][0]
    sign = table["damage"] > 0 if side == "harmful" else table["damage"] < 0
    return (table[column] < alpha) & sign


# --- intervals ----------------------------------------------------------------------------
def percentile_ci(values: np.ndarray, n_bootstrap: int, seed: int, statistic=np.mean,
                  level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of ``statistic`` over the last axis of ``values [..., N]``
    (rows without spread: the point itself)."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    point = statistic(values, axis=-1)
    if n_bootstrap <= 0 or values.shape[-1] < 2:
        return np.full(point.shape, np.nan), np.full(point.shape, np.nan)
    res = bootstrap((values,), statistic, axis=-1, vectorized=True, n_resamples=n_bootstrap,
                    confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval.low, res.confidence_interval.high
    const = np.ptp(values, axis=-1) == 0
    return np.where(const, point, low), np.where(const, point, high)


def spearman(x, y) -> float:
    """Spearman's rho of ``x`` and ``y`` over the pairs where both are finite (NaN with fewer than
    three): the one rank correlation of the package (gradient vs ablation importance, ...)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(stats.spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 2 else float("nan")


def spearman_ci(x, y, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's rho of ``x`` and ``y`` with a percentile bootstrap CI over the pairs (heads)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    rx = stats.rankdata(x[idx], axis=1)
    ry = stats.rankdata(y[idx], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))
    boot = np.where(denom > 0, (rx * ry).sum(1) / np.where(denom > 0, denom, 1), np.nan)
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2]) if np.isfinite(boot).any() else (np.nan,) * 2
    return dict(rho=rho, ci_low=float(lo), ci_high=float(hi), n=len(x), n_bootstrap=n_bootstrap, seed=seed,
                method="percentile bootstrap over heads")


# --- the per-head table -------------------------------------------------------------------
def importance_table(heads, clean: np.ndarray, ablated: dict, task: Task, n_bootstrap: int = 1000,
                     seed: int = 0, test: str = "t") -> pd.DataFrame:
    """Tidy table from per-example metrics: ``clean [N]``, ``ablated {(layer, head): [N]}``; columns
    ``layer, head, importance, importance_se, importance_ci_low, importance_ci_high, p_value,
    q_value, p_holm, damage, metric_clean, metric_ablated, n_examples`` (see the module doc)."""
    diffs = np.stack([ablated[h] - clean for h in heads])  # [n_heads, N]
    N = diffs.shape[1]
    se = diffs.std(1, ddof=1) / np.sqrt(N) if N > 1 else np.full(len(heads), np.nan)
    low, high = percentile_ci(diffs, n_bootstrap, seed)
    p = paired_pvalues(diffs, test)
    importance = diffs.mean(1)
    table = pd.DataFrame({
        "layer": [h[0] for h in heads], "head": [h[1] for h in heads], "importance": importance,
        "importance_se": se, "importance_ci_low": low, "importance_ci_high": high,
        "p_value": p, "q_value": bh_qvalues(p), "p_holm": holm_adjusted(p),
        "damage": -importance if task.higher_is_better else importance,
        "metric_clean": clean.mean(), "metric_ablated": diffs.mean(1) + clean.mean(), "n_examples": N,
    })
    table.attrs.update(task=task.name, metric=task.metric_name, higher_is_better=task.higher_is_better,
                       sign="importance = metric(ablated) - metric(clean); damage > 0: ablating hurts",
                       test=TEST_NAMES[test], n_bootstrap=n_bootstrap, bootstrap_seed=seed)
    return table.sort_values(["layer", "head"], ignore_index=True)
