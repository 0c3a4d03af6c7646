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


def task_controls(model, task, ablation: str, batch_size: int) -> dict:
    """:func:`headlens.importance.controls.task_controls` (the pipeline's "controls" stage)."""
    from headlens.importance.controls import task_controls as controls

    return controls(model, task, ablation=ablation, batch_size=batch_size)


def task_power(controls: dict, config: dict, n_heads: int) -> dict:
    """The power estimate before the sweep: the change to detect is the share of the full model's
    above-chance metric that the pruning floor allows to lose (10% without a floor), from the
    clean metric's spread; warns when the task has fewer examples than that needs."""
    import warnings

    from headlens.importance.controls import power_estimate

    share = 1 - (config.get("prune_floor") or 0.9)
    chance = controls.get("chance")
    scale = abs(controls["full"] - (chance if chance is not None else 0.0))
    label = (f"{share:.0%} of the full model's metric above chance" if chance is not None
             else f"{share:.0%} of the full model's metric")
    est = power_estimate(controls["clean"], share * scale, n_heads, label, ALPHA) if scale > 0 else {}
    if est.get("n_needed") and est["n_examples"] < est["n_needed"]:
        warnings.warn(f"headlens: the task has {est['n_examples']} examples; detecting a change of "
                      f"{est['effect']:.3g} ({label}) with 80% power needs about {est['n_needed']} "
                      f"(clean metric SD {est['sd']:.3g}); smaller effects may be missed", stacklevel=2)
    return est


def reproducibility(task, texts, config: dict, pruning: dict, split: float) -> dict:
    """What recomputing every number needs beyond the configuration: hashes of the task's examples
    and of the pattern texts, the task's example ids in order, the pruning split (selection and
    held-out example ids), and every seed the bootstraps and random orders used."""
    from headlens.pruning.curve import selection_split
    from headlens.reporting.run_record import task_key, texts_key

    seed = config["seed"]
    select, held, _ = selection_split(task, split, seed)
    stats = pruning.get("summary", {})
    return dict(task_sha256=task_key(task), pattern_texts_sha256=texts_key(texts), task_example_ids=list(task.ids),
                split=dict(fraction=split, seed=seed, selection_ids=list(select.ids),
                           heldout_ids=list(held.ids)),
                seeds=dict(importance_bootstrap=seed, cluster_bootstrap=seed, clustering=seed,
                           pruning_heldout_bootstrap=stats.get("bootstrap_seeds", {}).get("heldout"),
                           pruning_selection_bootstrap=stats.get("bootstrap_seeds", {}).get("selection"),
                           random_orders=sorted({int(s) for s in pruning["curve"]["seed"].dropna()}),
                           spearman_bootstrap=seed),
                n_bootstrap=dict(importance=config["n_bootstrap"], pruning=stats.get("n_bootstrap"),
                                 spearman=1000))


def sweep_power(power: dict, metrics: tuple) -> dict:
    """``power`` with what the sweep's paired tests could detect: the median over heads of the SD
    of the per-example differences, and the change that SD and the task's examples detect."""
    import numpy as np

    from headlens.importance.controls import detectable_effect

    heads, clean, ablated = metrics
    if not power or len(clean) < 2:
        return power
    sd = float(np.median([np.std(ablated[h] - clean, ddof=1) for h in heads]))
    return dict(power, sweep_sd=sd, sweep_detectable=detectable_effect(sd, len(clean), power["alpha"], power["power"]))
