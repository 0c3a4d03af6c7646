"""From per-example metrics to a per-head table: importance, its standard error and a bootstrap
confidence interval over examples.

Shapes: ``N`` examples; ``clean [N]`` the unablated metric, ``ablated {(layer, head): [N]}``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from headlens.importance.tasks import Task


def importance_table(heads, clean: np.ndarray, ablated: dict, task: Task, n_bootstrap: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Tidy table from per-example metrics: ``clean [N]``, ``ablated {(layer, head): [N]}``."""
    diffs = np.stack([ablated[h] - clean for h in heads])  # [n_heads, N]
    N = diffs.shape[1]
    se = diffs.std(1, ddof=1) / np.sqrt(N) if N > 1 else np.full(len(heads), np.nan)
    low = high = np.full(len(heads), np.nan)
    if n_bootstrap > 0 and N > 1:
        res = bootstrap((diffs,), np.mean, axis=-1, vectorized=True, n_resamples=n_bootstrap,
                        method="percentile", random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval.low, res.confidence_interval.high
        const = np.ptp(diffs, axis=1) == 0  # no spread: the interval is the point
        low, high = np.where(const, diffs[:, 0], low), np.where(const, diffs[:, 0], high)
    importance = diffs.mean(1)
    table = pd.DataFrame({
        "layer": [h[0] for h in heads], "head": [h[1] for h in heads], "importance": importance,
        "importance_se": se, "importance_ci_low": low, "importance_ci_high": high,
        "damage": -importance if task.higher_is_better else importance,
        "metric_clean": clean.mean(), "metric_ablated": diffs.mean(1) + clean.mean(), "n_examples": N,
    })
    table.attrs.update(task=task.name, metric=task.metric_name, higher_is_better=task.higher_is_better,
                       sign="importance = metric(ablated) - metric(clean); damage > 0: ablating hurts")
    return table.sort_values(["layer", "head"], ignore_index=True)


