"""The uncertainty of pruning curves: per-point bootstrap CIs over held-out examples, a paired test
of each order against random orders on the same examples, and intervals on "how many heads can
go" from a bootstrap over the selection examples the plans are chosen on.

Shapes: ``O`` orders (method, seed), ``G`` grid points (numbers of heads removed), ``N`` held-out
examples, ``M`` selection examples, ``B`` bootstrap resamples. ``held [O, G, N]`` and
``select [O, G, M]``: per-example metrics at every point.
"""
from __future__ import annotations

import numpy as np

from headlens.importance.statistics import paired_pvalues

LEVEL = 0.95  # CIs of held-out metrics and of the heads-that-can-go numbers
BAND = 0.90  # the random orders' band (5th to 95th percentile over seeds)


def resample_counts(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``[B, n]``: how often each example is drawn in each bootstrap resample (one set of
    resamples for every point, so that the intervals of different points and orders are paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], idx), 1.0)
    return counts


def point_cis(held: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the held-out mean at every point: ``held [O, G, N]`` -> two ``[O, G]``."""
    means = np.einsum("bn,ogn->bog", counts, held) / held.shape[-1]  # [B, O, G]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def p_vs_random(held: np.ndarray, is_random: np.ndarray, test: str = "t") -> np.ndarray:
    """``[O, G]``: paired test per point of each order's per-example held-out metric against the mean
    of the random orders' on the same examples (NaN for random orders, and where nothing is removed)."""
    out = np.full(held.shape[:2], np.nan)
    if not is_random.any():
        return out
    reference = held[is_random].mean(0)  # [G, N]
    for o in np.flatnonzero(~is_random):
        diffs = held[o] - reference  # [G, N]
        p = paired_pvalues(diffs, test)
        p[np.abs(diffs).max(1) == 0] = np.nan  # the same model (e.g. nothing removed): no test
        out[o] = p
    return out


def plan_sizes(select_means: np.ndarray, grid: np.ndarray, unpruned: np.ndarray, floor, higher_is_better: bool):
    """Heads removed by each order's plan: the largest grid point before the first one whose
    selection metric loses more than ``1 - floor`` of the unpruned metric's magnitude.
    ``select_means [..., O, G]``, ``unpruned [...]`` -> ``[..., O]``."""
    if floor is None:
        return np.broadcast_to(grid[-1], select_means.shape[:-1]).copy()
    u = np.asarray(unpruned)[..., None, None]
    loss = (u - select_means) if higher_is_better else (select_means - u)
    ok = loss <= (1 - floor) * np.abs(u)
    first_bad = np.where(ok.all(-1), ok.shape[-1], np.argmin(ok, axis=-1))
    return grid[np.maximum(first_bad - 1, 0)]


def plan_size_bootstrap(select: np.ndarray, grid: np.ndarray, floor, higher_is_better: bool,
                        counts: np.ndarray) -> np.ndarray:
    """``[B, O]``: every order's plan size on each bootstrap resample of the selection examples
    (the unpruned metric resampled with them: grid point 0 is the unpruned model)."""
    means = np.einsum("bm,ogm->bog", counts, select) / select.shape[-1]  # [B, O, G]
    return plan_sizes(means, grid, means[:, 0, 0], floor, higher_is_better)


def interval(values: np.ndarray, level: float) -> tuple[int, int]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return int(np.floor(lo)), int(np.ceil(hi))


def compare_orders(names: list, boot: np.ndarray, sizes: np.ndarray, random_sizes: np.ndarray,
                   level: float = LEVEL) -> dict:
    """Which non-random order removes the most heads, and whether that is more than noise: the
    paired bootstrap interval of the difference of plan sizes between each pair of orders
    (``boot [B, O]`` and ``sizes [O]`` of the non-random orders ``names``), and each order's size
    against the random orders' (``random_sizes [seeds]``, their band). A ranking is made only
    when the intervals exclude 0; otherwise the orders are called not separable."""
    pairs, separable = [], True
    order = np.argsort(-sizes, kind="stable")
    for a, b in zip(order[:-1], order[1:]):
        lo, hi = interval(boot[:, a] - boot[:, b], level)
        ok = lo > 0 or hi < 0
        separable &= ok
        pairs.append(dict(first=names[a], second=names[b], difference=int(sizes[a] - sizes[b]), ci_low=lo,
                          ci_high=hi, separable=bool(ok)))
    words = []
    for p in pairs:
        ci = f"difference {p['difference']} heads, {level:.0%} interval [{p['ci_low']}, {p['ci_high']}]"
        if p["separable"]:
            words.append(f"the {p['first']} order removes more heads than the {p['second']} order ({ci})")
        else:
            words.append(f"the {p['first']} and {p['second']} orders are not separable ({ci} includes 0)")
    vs_random = {}
    if len(random_sizes):
        r_lo, r_hi = interval(random_sizes, BAND)
        for i, name in enumerate(names):
            lo, hi = interval(boot[:, i], level)
            vs_random[name] = ("more" if lo > r_hi else "fewer" if hi < r_lo else "not separable")
        if vs_random:
            words.append("against random orders (their 90% band " f"{r_lo}-{r_hi} heads): " + ", ".join(
                f"{m} {'is not separable from them' if v == 'not separable' else f'removes {v} heads'}"
                for m, v in vs_random.items()))
    sentence = ""
    if words:
        sentence = ("How many heads the orders can remove (paired bootstrap over the selection examples): "
                    + "; ".join(words) + ".")
    return dict(pairs=pairs, separable=bool(separable), vs_random=vs_random, sentence=sentence)
