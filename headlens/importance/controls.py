"""Task-sensitivity controls and power: does the task need attention at all, and are there enough
examples for the claims made about it?

- :func:`task_controls`: the task's metric with the full model, with every head ablated (the
  task without any attention output) and with every head's attention uniform over the keys it
  may see (Kovaleva et al.'s uniform ablation everywhere: each position reads an order-free
  average of the values, a bag-of-words floor). ``kept_*`` says how much of the full model's
  metric above chance level survives; a task that keeps most of it does not need attention, and
  head-importance or pruning results on it say little about what attention does. When the full
  model is no better than chance (``above_chance`` False) there is nothing to keep: the shares and
  the verdict are None.
- :func:`power_estimate`: from the clean metric's spread over examples, how many examples a
  paired test needs to detect a given change with a given power, and the change this run's
  number of examples detects (two-sided t-test; the noncentral t distribution, scipy.stats.nct).

Shapes: ``N`` examples.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import stats

from headlens.errors import check
from headlens.importance.ablation import ablate
from headlens.importance.tasks import load_task

KEPT_MOST = 0.5  # a task that keeps more than this share of its metric without attention does not need it


def chance_level(task, model) -> Optional[float]:
    """The metric of a model that knows nothing, when the task has a natural one: 0 for a logit
    difference or a cosine margin (no preference), ``1 / choices`` for accuracy, ``log V`` for a
    next- or masked-token loss (uniform prediction), 0 for an embedding-fidelity cosine; None
    otherwise (a KL divergence or a user metric)."""
    name = task.metric_name
    if name in ("logit_diff", "cosine_margin"):
        return 0.0
    if name == "accuracy":
        wrong = getattr(task, "wrong", None)
        return 1 / (1 + max(len(w) for w in wrong)) if wrong else 0.5
    if name in ("lm_loss", "mlm_loss", "repeated_half_loss"):
        return math.log(model.cfg.vocab_size)
    if name == "embedding_cosine":
        return 0.0
    return None


def _above_chance(full: float, chance: Optional[float], higher_is_better: bool) -> Optional[bool]:
    if chance is None:
        return None
    return bool(full > chance if higher_is_better else full < chance)


def _kept(value: float, full: float, chance: Optional[float], above: Optional[bool]) -> Optional[float]:
    if not above:
        return None
    return float((value - chance) / (full - chance))


def task_controls(model, task, ablation: str = "zero", batch_size: int = 16) -> dict:
    """The metric (mean and SE over examples) with the full model, with every head ablated
    (``ablation``) and with every head's attention uniform, its chance level, the share of the
    full model's above-chance metric each control keeps, and ``needs_attention`` (None when the
    metric has no chance level or the full model does not beat it: ``above_chance``). ``clean``
    holds the full model's per-example metric ``[N]``."""
    task = load_task(task, model)
    heads = model.head_labels()
    full = task.evaluate(model, batch_size=batch_size)
    zero = ablate(model, task, heads, ablation, batch_size=batch_size)
    uniform = ablate(model, task, heads, "uniform", batch_size=batch_size)
    chance = chance_level(task, model)
    se = (lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan"))
    above = _above_chance(float(full.mean()), chance, task.higher_is_better)
    kept_u = _kept(uniform.mean(), full.mean(), chance, above)
    kept_z = _kept(zero.mean(), full.mean(), chance, above)
    needs = None if kept_u is None else bool(max(kept_u, kept_z) < KEPT_MOST)
    return dict(full=float(full.mean()), full_se=se(full), ablated=float(zero.mean()), ablated_se=se(zero),
                uniform=float(uniform.mean()), uniform_se=se(uniform), ablation=ablation, chance=chance,
                above_chance=above,
                kept_uniform=kept_u, kept_ablated=kept_z, needs_attention=needs, kept_most=KEPT_MOST,
                n_examples=len(full), clean=full)


def _power(n: int, effect_sd: float, alpha: float) -> float:
    """Power of a two-sided one-sample t-test with ``n`` examples at standardized effect ``effect_sd``."""
    df = n - 1
    t = stats.t.ppf(1 - alpha / 2, df)
    nc = effect_sd * math.sqrt(n)
    return float(stats.nct.sf(t, df, nc) + stats.nct.cdf(-t, df, nc))


def examples_needed(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8,
                    limit: int = 10 ** 7) -> int:
    """Fewest examples for which a paired two-sided t-test at ``alpha`` detects a mean change of
    ``effect`` with probability ``power``, when the per-example change has SD ``sd``."""
    check(sd >= 0 and effect > 0, f"need sd >= 0 and effect > 0, got {sd}, {effect}")
    if sd == 0:
        return 2
    d = effect / sd
    lo, hi = 2, 4
    while _power(hi, d, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > limit:
            return limit
    while lo < hi:  # the smallest n in (lo, hi] with enough power
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _power(mid, d, alpha) < power else (lo, mid)
    return int(hi)


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest mean change ``n`` examples detect with ``power`` at ``alpha`` (paired, two-sided)."""
    if n < 2:
        return float("inf")
    lo, hi = 0.0, 1.0
    while _power(n, hi, alpha) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _power(n, mid, alpha) < power else (lo, mid)
    return float(hi * sd)


def power_estimate(clean: np.ndarray, effect: float, n_tests: int, effect_label: str = "",
                   alpha: float = 0.05, power: float = 0.8) -> dict:
    """How many examples detecting ``effect`` needs given the spread of ``clean [N]`` (taken as the
    spread of the per-example change, i.e. the two measurements correlate at 0.5; single-head
    changes usually vary less, so this errs on the side of more examples), at ``alpha`` and at the
    Bonferroni level ``alpha / n_tests`` (the strictest of the corrections), and the change this
    run's ``N`` detects."""
    clean = np.asarray(clean, dtype=float)
    sd = float(clean.std(ddof=1)) if len(clean) > 1 else float("nan")
    ok = np.isfinite(sd) and effect > 0
    return dict(sd=sd, effect=float(effect), effect_label=effect_label, alpha=alpha, power=power,
                n_tests=int(n_tests), n_examples=int(len(clean)),
                n_needed=examples_needed(sd, effect, alpha, power) if ok else None,
                n_needed_familywise=examples_needed(sd, effect, alpha / max(n_tests, 1), power) if ok else None,
                detectable=detectable_effect(sd, len(clean), alpha, power) if np.isfinite(sd) else None,
                assumption="the per-example change varies as much as the clean metric (correlation 0.5)")
