"""What the report's statistical claims rest on, computed in the pipeline and kept in ``run.json``
(``results``): the per-head tests and their corrections, the task-sensitivity controls and the
power estimate, and the exact record needed to recompute every number (data hashes, the split,
bootstrap seeds). The sentences built from them are in :mod:`headlens.reporting.claims`.
"""
from __future__ import annotations

from headlens.importance.statistics import ALPHA


def sweep_statistics(sweep, seed: int) -> dict:
    """How the per-head p-values and corrections of the importance table were made."""
    return dict(test=sweep.attrs.get("test", "paired t-test"), alpha=ALPHA,
                difference="metric(ablated) - metric(clean) per example",
                corrections=dict(q_value="Benjamini-Hochberg (scipy.stats.false_discovery_control) over all heads",
                                 p_holm="Holm step-down over all heads"),
                needed_rule=f"q_value < {ALPHA} and damage > 0", improves_rule=f"q_value < {ALPHA} and damage < 0",
                bootstrap=dict(n_resamples=sweep.attrs.get("n_bootstrap"), seed=seed, method="percentile",
                               level=0.95))
