"""Per-head tests and their corrections: the p-values are scipy's paired tests, the q-values and
Holm's adjusted p-values follow their definitions, and on a planted model with known zero and
nonzero head effects the corrected "needed" set controls the false-discovery proportion where the
uncorrected one does not."""
import numpy as np
import pytest
import torch
from scipy import stats

from headlens.importance.statistics import (
    bh_qvalues,
    holm_adjusted,
    importance_table,
    paired_pvalues,
    significant,
    spearman_ci,
)
from headlens.importance.sweep import sweep_metrics
from headlens.importance.tasks import CallableTask
from headlens.synthetic.planted import planted_model


def test_pvalues_are_scipys_paired_tests():
    rng = np.random.default_rng(0)
    clean, ablated = rng.normal(size=(3, 30)), rng.normal(size=(3, 30)) + [[0.0], [0.5], [-1.0]]
    p = paired_pvalues(ablated - clean)
    np.testing.assert_allclose(p, stats.ttest_rel(ablated, clean, axis=1).pvalue, rtol=1e-12)
    w = paired_pvalues(ablated - clean, test="wilcoxon")
    np.testing.assert_allclose(w, [stats.wilcoxon(a, c).pvalue for a, c in zip(ablated, clean)], rtol=1e-12)
    # no spread: no effect at all -> 1; the same effect on every example -> the exact sign test
    assert paired_pvalues(np.zeros((1, 8)))[0] == 1.0
    assert paired_pvalues(np.full((1, 8), 0.3))[0] == pytest.approx(2 * 0.5 ** 8)
    assert np.isnan(paired_pvalues(np.ones((1, 1)))[0])


def test_qvalues_and_holm_follow_their_definitions():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, np.nan, 0.2])
    ok = np.isfinite(p)
    m, order = ok.sum(), np.argsort(p[ok])
    ps = p[ok][order]
    q_sorted = np.array([min(m * ps[j] / (j + 1) for j in range(i, m)) for i in range(m)])  # min_{j>=i} m p_(j) / j
    holm_sorted = np.maximum.accumulate(np.minimum(1, (m - np.arange(m)) * ps))
    q, h = bh_qvalues(p), holm_adjusted(p)
    np.testing.assert_allclose(q[ok][order], q_sorted)
    np.testing.assert_allclose(h[ok][order], holm_sorted)
    assert np.isnan(q[5]) and np.isnan(h[5])
    assert (h[ok] >= q[ok]).all()  # Holm is the stricter


def test_spearman_interval_covers_rho():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    r = spearman_ci(x, y, n_bootstrap=500)
    assert r["rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert r["ci_low"] < r["rho"] < r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.6
    assert spearman_ci(x, y, n_bootstrap=500) == r  # seeded


# --- false discoveries on a planted model ------------------------------------------------
N_NULL, N_EFFECT, N_EXAMPLES, V, EFFECT = 24, 6, 32, 8, 0.8


def planted_effects():
    """One layer of 30 heads; the last position's head h attends to position h and writes
    ``values_h[token there]`` to its own coordinate, which the metric sums. Tokens are uniform, so
    a null head's values (centred over the vocabulary) have mean effect exactly 0, an effect
    head's mean effect is EFFECT = 0.8 (per-example spread about 1)."""
    H = N_NULL + N_EFFECT
    P = H + 1
    rng = np.random.default_rng(0)
    base = np.linspace(-1.5, 1.5, V)
    writes = {}
    for h in range(H):
        values = rng.permutation(base)
        writes[(0, h)] = values + (EFFECT if h >= N_NULL else 0.0)
    roles = {(0, h): f"offset:{h - (P - 1)}" for h in range(H)}
    model = planted_model(roles, n_layers=1, n_heads=H, vocab_size=V, n_ctx=P, writes=writes)
    lo = 2 * V + P
    return model, P, (lo, lo + H)


def replicate_tables(model, P, cols, n_replicates):
    def metric(hidden, inputs):
        return hidden[:, -1, cols[0]:cols[1]].sum(-1)

    for r in range(n_replicates):
        gen = torch.Generator().manual_seed(100 + r)
        texts = torch.randint(0, V, (N_EXAMPLES, P), generator=gen).tolist()
        task = CallableTask(texts, metric, output="hidden", metric_name="planted_sum")
        heads, clean, ablated = sweep_metrics(model, task, progress=False, batch_size=N_EXAMPLES)
        yield importance_table(heads, clean, ablated, task, n_bootstrap=0)


def test_corrected_needed_set_controls_false_discoveries():
    """20 replicate datasets: the BH-corrected "needed" set's false-discovery proportion, averaged
    (the false-discovery rate), stays at or below 5%; the uncorrected set's exceeds it; the true
    effects are found."""
    model, P, cols = planted_effects()
    fdp = {"bh": [], "holm": [], "none": []}
    found = []
    for table in replicate_tables(model, P, cols, 20):
        true = table["head"].to_numpy() >= N_NULL
        # the planted effects are what the sweep measures
        np.testing.assert_allclose(table.damage[true].mean(), EFFECT, atol=0.2)
        for correction in fdp:
            needed = significant(table, "harmful", 0.05, correction).to_numpy()
            fdp[correction].append((needed & ~true).sum() / max(needed.sum(), 1))
            if correction == "bh":
                found.append((needed & true).sum() / true.sum())
    rate = {k: float(np.mean(v)) for k, v in fdp.items()}
    assert rate["bh"] <= 0.05 and rate["holm"] <= rate["bh"], rate
    assert rate["none"] > 0.05, rate
    assert np.mean(found) > 0.9, found
