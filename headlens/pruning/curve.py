"""Pruning plans: which heads can go, chosen on one split of a task and scored on another.

Methods (each gives an order in which heads are removed):

- ``michel``: Michel et al. 2019's iterative procedure: compute gradient importance (per-layer
  normalised) with the current mask applied, remove the ``step`` least important remaining heads,
  repeat (:func:`headlens.importance.gradients.gradient_importance` with ``head_mask``);
- ``ablation``: by the single-head ablation sweep on the selection split, least damaging first
  (``sweep=`` takes a precomputed one, e.g. a full-task sweep's per-example metrics restricted to
  the selection split's examples, :func:`selection_split`; then a ``mean`` ablation's mean and a
  ``resample`` ablation's donor rows come from the full task rather than the split);
- ``random``: a random order, one per seed (a baseline).

Removal is gating to 0, which equals physical removal (:func:`headlens.pruning.physical.prune_heads`).
The curve evaluates every method at the same numbers of removed heads (multiples of ``step``
of all heads, up to ``target``) on both splits. A method's plan is its largest point whose
*selection*-split metric stays within the ``floor`` (e.g. ``floor=0.9``: at most 10% of the
unpruned metric's magnitude lost), or the ``target`` point without a floor; the recommended plan
is the non-random method that removes the most heads under that rule (ties: the better
selection-split metric). Held-out numbers (``metric``) are reported, never used to choose.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.gradients import gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import load_task
from headlens.model.heads import gate_without, local_index
from headlens.pruning.plans import as_plan

METHODS = ("michel", "ablation", "random")


@dataclass
class PruningResult:
    """``curve``: one row per (method, seed, n_pruned) with ``fraction_pruned``, ``metric``
    (held-out split), ``metric_selection``, ``relative`` (held-out metric / unpruned) and
    ``within_floor``; ``plans``: {method: {layer: [heads]}}; ``plan``: the recommended one."""

    curve: pd.DataFrame
    plans: dict
    plan: dict
    recommended: str
    orders: dict

    def __iter__(self):  # curve, plan = pruning_curve(...)
        return iter((self.curve, self.plan))


def selection_split(task, split: float = 0.5, seed: int = 0) -> tuple:
    """The split :func:`pruning_curve` makes: ``(selection task, held-out task, positions)``, with
    ``positions [n_selection]`` the selection examples' positions in ``task`` (to restrict
    per-example metrics of the whole task, e.g. :func:`headlens.importance.sweep.sweep_metrics`'s, to it)."""
    first, second = task.split_positions(split, seed)
    return task.subset(first), task.subset(second), first


def _passes(value: float, unpruned: float, floor, higher_is_better: bool) -> bool:
    if floor is None:
        return True
    loss = (unpruned - value) if higher_is_better else (value - unpruned)
    return bool(loss <= (1 - floor) * abs(unpruned))


def michel_order(model, task, n_max: int, step: int, batch_size: int = 16, progress: bool = False) -> list:
    """Heads in the order Michel et al.'s iterative procedure removes them (``step`` at a time);
    ``progress`` shows a bar of the heads masked so far."""
    order, mask = [], gate_without(model, [])
    with tqdm(total=n_max, desc="michel order", unit="head", disable=not progress, leave=False) as bar:
        while len(order) < n_max:
            imp = gradient_importance(model, task, normalize=True, head_mask=mask, batch_size=batch_size)
            imp = imp[~imp.set_index(["layer", "head"]).index.isin(order)]
            take = imp.sort_values(["grad_importance", "layer", "head"]).head(min(step, n_max - len(order)))
            for layer, head in zip(take["layer"], take["head"]):
                order.append((int(layer), int(head)))
                mask[layer, local_index(model, layer, head)] = 0
            bar.update(len(take))
    return order


def pruning_curve(model, task, methods=METHODS, target: float = 0.5, floor=None, step: float = 0.1,
                  n_random: int = 3, split: float = 0.5, seed: int = 0, ablation: str = "zero",
                  batch_size: int = 16, sweep: pd.DataFrame = None, progress: bool = True) -> PruningResult:
    """Pruning curves and plans (see the module doc).

    ``target``: largest fraction of heads to remove; ``floor``: fraction of the unpruned metric
    to keep (None: prune to ``target``); ``step``: fraction of all heads removed per point (and
    per Michel iteration); ``n_random``: random orders (seeds ``seed .. seed+n_random-1``);
    ``split``: fraction of the task's examples used to choose (the rest scores); ``ablation``:
    how the ``ablation`` method's sweep removes a head (zero, mean, resample, uniform); ``sweep``: a precomputed sweep table (``layer,
    head, damage``) of the selection split (see :func:`selection_split` and the module doc)."""
    methods = tuple(methods)
    check(len(methods) > 0 and all(m in METHODS for m in methods), f"methods must be among {METHODS}, got {methods}")
    check(0 < target <= 1, f"target must lie in (0, 1], got {target}")
    check(floor is None or 0 < floor <= 1, f"floor must lie in (0, 1] (fraction of the unpruned metric), got {floor}")
    check(0 < step <= 1, f"step must lie in (0, 1], got {step}")
    check(n_random >= 1, f"n_random must be >= 1, got {n_random}")
    task = load_task(task, model)
    select, held, _ = selection_split(task, split, seed)
    heads = model.head_labels()
    n_max = min(len(heads), round(target * len(heads)))
    k = max(1, round(step * len(heads)))
    grid = sorted(set(list(range(0, n_max + 1, k)) + [n_max]))

    orders = {}
    if "michel" in methods:
        orders[("michel", None)] = michel_order(model, select, n_max, k, batch_size, progress)
    if "ablation" in methods:
        table = sweep if sweep is not None else ablation_sweep(
            model, select, ablation, n_bootstrap=0, batch_size=batch_size, progress=progress)
        orders[("ablation", None)] = [(int(a), int(b)) for a, b in
                                      table.sort_values(["damage", "layer", "head"])[["layer", "head"]].values]
    if "random" in methods:
        for s in range(seed, seed + n_random):
            perm = np.random.default_rng(s).permutation(len(heads))
            orders[("random", s)] = [heads[i] for i in perm]

    cache, encoded = {}, [(t, t.batches(model, batch_size)) for t in (select, held)]

    def score(removed):
        key = frozenset(removed)
        if key not in cache:
            gate = gate_without(model, list(removed))
            cache[key] = tuple(float(t.evaluate(model, head_gate=gate, batches=b).mean()) for t, b in encoded)
        return cache[key]

    rows = []
    bar = tqdm(total=len(orders) * len(grid), desc="pruning curve", disable=not progress, leave=False)
    unpruned_sel, unpruned_held = score([])
    for (method, s), order in orders.items():
        for n in grid:
            sel, hel = score(order[:n])
            rows.append(dict(method=method, seed=s, n_pruned=n, fraction_pruned=n / len(heads), metric=hel,
                             metric_selection=sel, relative=hel / unpruned_held if unpruned_held else np.nan,
                             within_floor=_passes(sel, unpruned_sel, floor, task.higher_is_better)))
            bar.update(1)
    bar.close()
    curve = pd.DataFrame(rows)
    curve["seed"] = curve["seed"].astype("Int64")

    plans, chosen = {}, {}
    for (method, s), order in orders.items():
        if method == "random" and s != seed:
            continue
        part = curve[(curve.method == method) & (curve.seed.isna() if s is None else curve.seed == s)]
        ok, ns = part["within_floor"].to_numpy(), part["n_pruned"].to_numpy()
        stop = len(ok) if ok.all() else int(np.argmin(ok))  # the first point below the floor
        n = int(ns[max(stop - 1, 0)])
        plans[method] = as_plan(order[:n])
        chosen[method] = (n, float(part.loc[part.n_pruned == n, "metric_selection"].iloc[0]))
    candidates = [m for m in chosen if m != "random"] or list(chosen)
    sign = 1 if task.higher_is_better else -1
    best = max(candidates, key=lambda m: (chosen[m][0], sign * chosen[m][1]))
    curve.attrs.update(task=task.name, metric=task.metric_name, higher_is_better=task.higher_is_better,
                       unpruned=unpruned_held, unpruned_selection=unpruned_sel, floor=floor, target=target,
                       n_selection=len(select), n_heldout=len(held), recommended=best)
    return PruningResult(curve, plans, plans[best], best, {m: o for (m, s), o in orders.items()
                                                            if m != "random" or s == seed})
