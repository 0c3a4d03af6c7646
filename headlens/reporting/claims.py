"""The report's claims in sentences, each following the statistics it rests on: which heads are
needed or harmful (Benjamini-Hochberg over the heads, Holm where a family-wise claim is made),
the task-sensitivity controls and the power estimate (said first when they undercut the rest),
the gradient-vs-ablation agreement with its interval, cluster stability per cluster, and the
pruning curves' comparisons (with intervals; "not separable" instead of a ranking).

Everything reads a report's tables and ``run.json`` only (see :mod:`headlens.reporting.render`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from headlens.importance.statistics import ALPHA, significant
from headlens.reporting.words import head_name, interval, num, pvalue, signed


def _stats(report) -> dict:
    return report.run.get("results", {}).get("statistics", {})


# --- single heads -------------------------------------------------------------------------
def importance_claims(report, dmg: pd.DataFrame) -> list[str]:
    """Needed / improving heads (``dmg``: :func:`headlens.reporting.render.damage_frame`, ranked)."""
    data, n = report.run.get("data", {}), len(dmg)
    metric = data.get("metric", "the metric")
    st = _stats(report)
    alpha, test = st.get("alpha", ALPHA), st.get("test", "paired t-test")
    n_ex = int(dmg["n_examples"].iloc[0]) if "n_examples" in dmg else data.get("task_examples", "?")
    if "q_value" not in dmg:  # a report from before the corrections: say what the rule was
        needed = int((dmg.damage_low > 0).sum())
        return [f"{needed} of {n} heads have a 95% CI entirely on the harmful side (uncorrected for "
                f"{n} comparisons: about {0.025 * n:.1f} such heads are expected by chance alone)."]
    needed = significant(dmg, "harmful", alpha, "bh")
    strict = significant(dmg, "harmful", alpha, "holm")
    k, j = int(needed.sum()), int(strict.sum())
    out = [f"{k} of {n} heads ({k / n:.0%}) are needed: ablating one alone hurts {metric} at a false-discovery "
           f"rate of {alpha:.0%} (Benjamini-Hochberg q < {alpha:g} over {n} {test}s on {n_ex} examples); "
           f"{j} of them also at a family-wise error rate of {alpha:.0%} (Holm)."
           + (f" Removing any one of the other {n - k} alone makes no difference these tests can detect."
              if k < n else "")]
    helps = dmg[significant(dmg, "helpful", alpha, "bh")]
    if len(helps):
        first = helps.sort_values("damage").head(5)
        names = ", ".join(head_name(r.layer, r.head) for r in first.itertuples())
        out.append(f"Removing {len(helps)} head(s) alone improves {metric} (Benjamini-Hochberg q < {alpha:g}): "
                   f"{names}{', ...' if len(helps) > 5 else '.'}")
    return out


def top_head_note(row) -> str:
    """``q = 0.001, Holm`` for a head in the top list: its corrected evidence."""
    if not hasattr(row, "q_value"):
        return ""
    holm = "; family-wise significant (Holm)" if getattr(row, "p_holm", 1.0) < ALPHA else ""
    return f", q = {row.q_value:.2g}{holm}"  # two significant digits: 0.004, not 0.00


def rho_claim(report, rho: float) -> str:
    agree = "closely" if rho >= 0.8 else "roughly" if rho >= 0.5 else "weakly" if rho >= 0.2 else "hardly"
    r = report.run.get("results", {}).get("grad_vs_ablation") or {}
    ci = (f" (95% CI {interval(r['ci_low'], r['ci_high'], 2)}, bootstrap over heads)"
          if r.get("ci_low") is not None and np.isfinite(r["ci_low"]) else "")
    return (f"Gradient importance (Michel et al., E_x |g dL(x)/dg| at g = 1) {agree} agrees with the "
            f"exact sweep: Spearman rho = {num(rho, 2)}{ci} against |importance|.")


# --- controls and power: said first when they undercut the rest ---------------------------
def _finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))


def _left(kept) -> str:
    """What a control leaves of the full model's gain over chance, in words."""
    if not _finite(kept):
        return ""
    if kept <= 0:
        return " (at or below chance: none of the gain left)"
    return f" ({kept:.0%} of the gain left)"


def _controls_text(c: dict, metric: str) -> str:
    """The controls in plain words: the verdict first, then the three numbers."""
    chance = c.get("chance")
    ref = f" (chance level {num(chance)})" if chance is not None else ""
    ablation = c.get("ablation", "zero")
    none = ", i.e. no attention output at all" if ablation == "zero" else ""
    numbers = (f"{metric} is {num(c['full'])} with the full model{ref}; {num(c['ablated'])} with every head "
               f"{ablation}-ablated{none}{_left(c.get('kept_ablated'))}; "
               f"{num(c['uniform'])} with every head's attention uniform over the visible keys, a bag-of-words "
               f"floor{_left(c.get('kept_uniform'))}.")
    needs = c.get("needs_attention")
    if needs is None and c.get("above_chance") is not False:
        return (f"Task-sensitivity controls: {numbers} The metric has no chance level, so the controls give no "
                "verdict on whether the task needs attention.")
    if needs:
        most = max(x for x in (c.get("kept_uniform"), c.get("kept_ablated")) if _finite(x))
        left = "none" if most <= 0 else f"at most {most:.0%}"
        return (f"Task-sensitivity controls: the task needs attention; without it, {left} of the full model's gain "
                f"over chance is left. {numbers}")
    return f"Task-sensitivity controls: {numbers}"


def control_claims(report) -> tuple[list[str], list[str]]:
    """``(first, later)``: warnings to put before every other finding, and the control numbers."""
    res = report.run.get("results", {})
    c, first, later = res.get("controls"), [], []
    metric = report.run.get("data", {}).get("metric", "the metric")
    if c:
        text = _controls_text(c, metric)
        kept = [x for x in (c.get("kept_uniform"), c.get("kept_ablated")) if _finite(x)]
        if c.get("above_chance") is False:
            first.append(f"Caution: the full model does no better than chance on this task ({metric} "
                         f"{num(c['full'])}, chance level {num(c.get('chance'))}), so the head importance and pruning "
                         "results below are about a task it does not do. " + text)
        elif c.get("needs_attention") is False:
            first.append(f"Caution: this task keeps most of its metric without attention (up to {max(kept):.0%} of "
                         "the full model's gain over chance), so the head importance and pruning results below "
                         "say little about what attention does. " + text)
        else:
            later.append(text)
    p = res.get("power")
    if p:
        text = (f"Power: the clean metric's per-example SD is {num(p['sd'])}; detecting a change of "
                f"{num(p['effect'])} ({p['effect_label']}) with {p['power']:.0%} power in a paired test at "
                f"{p['alpha']:g} needs {p['n_needed']} examples ({p['n_needed_familywise']} at the Bonferroni level "
                f"{p['alpha']:g}/{p['n_tests']}); this run has {p['n_examples']}, which detects "
                f"{num(p['detectable'])} at {p['alpha']:g}.")
        if p.get("sweep_sd") is not None:
            text += (f" In the sweep itself a single head's per-example change has a median SD of {num(p['sweep_sd'])}, "
                     f"so its paired tests detect changes of {num(p['sweep_detectable'])} "
                     + ("or more: enough for the effect above." if p["sweep_detectable"] <= p["effect"] else
                        "or more: smaller single-head effects may be missed."))
        short = p["sweep_detectable"] > p["effect"] if p.get("sweep_detectable") is not None \
            else p["n_examples"] < p["n_needed"]
        if short:
            first.append("Warning: too few examples for the claims below. " + text)
        else:
            later.append(text)
    return first, later


# --- clusters -----------------------------------------------------------------------------
def cluster_stability_claim(report) -> list[str]:
    clusters = report.clusters
    if clusters is None or "stability" not in clusters or not len(clusters):
        return []
    stab = clusters.set_index("cluster")["stability"].astype(float)
    if not np.isfinite(stab).any():
        return []
    stable = [str(c) for c, v in stab.items() if v >= 0.75]
    dissolved = [str(c) for c, v in stab.items() if v < 0.5]
    text = ("Per cluster, the mean Jaccard overlap with its best match in bootstrap resamples (Hennig 2007; "
            ">= 0.75 stable, < 0.5 dissolved) is " + ", ".join(f"{c}: {v:.2f}" for c, v in stab.items()) + ".")
    if stable:
        text += f" Stable: cluster{'s' if len(stable) > 1 else ''} {', '.join(stable)}."
    if dissolved:
        text += f" Not reproducible: cluster{'s' if len(dissolved) > 1 else ''} {', '.join(dissolved)}."
    return [text]


# --- pruning ------------------------------------------------------------------------------
def pruning_claims(report) -> list[str]:
    pr = report.run.get("results", {}).get("pruning", {})
    if not pr.get("methods"):
        return []
    total, floor = pr["n_heads"], pr.get("floor")
    rule = (f"losing at most {1 - floor:.0%} of the full model's metric on the selection split"
            if floor else f"up to the target of {pr.get('target', 0):.0%} of the heads")
    parts = []
    for m, r in sorted(pr["methods"].items()):
        lo, hi = r.get("n_low"), r.get("n_high")
        if m == "random" and r.get("n_seeds"):
            ci = f"; median of {r['n_seeds']} seeds, 90% band {lo}-{hi}"
        else:
            ci = f"; 95% interval {lo}-{hi}" if lo is not None else ""
        held = f"held-out {num(r['metric'])}"
        if r.get("ci_low") is not None:
            held += f" {interval(r['ci_low'], r['ci_high'])}"
        parts.append(f"{m} {r['n_pruned']} ({r['n_pruned'] / total:.0%}{ci}; {held})")
    out = [f"Pruning heads together, {rule}: " + ", ".join(parts) + f" of {total} heads can go "
           f"(full model: {num(pr.get('unpruned'))} on {pr.get('n_heldout', '?')} held-out examples; intervals: "
           f"bootstrap over the selection examples, held-out 95% CIs over the held-out examples)."]
    cmp = pr.get("comparison")
    if cmp:
        out.append(cmp["sentence"])
    best = pr.get("recommended")
    phys = pr.get("physical")
    if best and phys:
        removed = phys["heads_full"] - phys["heads_pruned"]
        spread = (f", {phys['speedup_low']:.2f}-{phys['speedup_high']:.2f}x over {phys['repeats']} repeats"
                  if "speedup_low" in phys else "")
        out.append(f"The saved plan (prune_plan.json, {best} order) removes {removed} heads; applied "
                   f"physically (headlens.pruning.physical.prune_heads) it keeps "
                   f"{phys['param_fraction']:.1%} of the parameters and runs "
                   f"{phys.get('speedup_median', phys['speedup']):.2f}x as fast "
                   f"(median{spread}; {num(phys['time_full_ms'], 3)} -> {num(phys['time_pruned_ms'], 3)} ms per batch "
                   f"here).")
    elif best and pr.get("physical_refused"):
        out.append(f"The saved plan (prune_plan.json, {best} order) is not applied physically: "
                   f"{pr['physical_refused']}.")
    elif best:
        out.append(f"The saved plan (prune_plan.json, {best} order) removes no head.")
    return out


__all__ = ["importance_claims", "top_head_note", "rho_claim", "control_claims", "cluster_stability_claim",
           "pruning_claims", "signed", "pvalue"]
