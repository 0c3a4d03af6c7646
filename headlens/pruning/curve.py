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
The curve evaluates every method at the same numbers of removed heads on both splits: multiples
of ``step`` of all heads up to ``target`` (one head at a time for small models), and, with a
floor, every head count where a non-random method crosses it (the random orders stay on the steps). A method's plan
is its largest point whose *selection*-split metric stays within the ``floor`` (e.g.
``floor=0.9``: at most 10% of the unpruned metric's magnitude lost) before the first point that
does not, or the ``target`` point without a floor; the recommended plan is the non-random method
that removes the most heads under that rule (ties: the better selection-split metric). Held-out
numbers (``metric``) are reported, never used to choose.

Uncertainty (:mod:`headlens.pruning.uncertainty`): every point's held-out metric has a
percentile bootstrap CI over the held-out examples and ``p_vs_random``, a paired t-test of its
per-example metrics against the random orders' mean on the same examples; each plan size has a
95% interval from re-choosing it on bootstrap resamples of the selection examples, the random
orders give a median and a 90% band over seeds, and two orders are ranked only when the
interval of their plan sizes' difference excludes 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.gradients import gradient_importance
from headlens.importance.sweep import ablation_sweep
from headlens.importance.tasks import TaskBatch, load_task
from headlens.model.heads import gate_without, local_index
from headlens.pruning.plans import as_plan
from headlens.pruning.uncertainty import (
    BAND,
    LEVEL,
    compare_orders,
    interval,
    p_vs_random,
    plan_size_bootstrap,
    plan_sizes,
    point_cis,
    resample_counts,
)

METHODS = ("michel", "ablation", "random")


@dataclass
class PruningResult:
    """``curve``: one row per (method, seed, n_pruned) with ``fraction_pruned``, ``metric``
    (held-out split) and its bootstrap CI ``ci_low, ci_high``, ``metric_selection``, ``relative``
    (held-out metric / unpruned), ``within_floor`` and ``p_vs_random`` (paired test against the
    random orders' mean on the same held-out examples); ``plans``: {method: {layer: [heads]}};
    ``plan``: the recommended one; ``stats``: every method's plan size with its interval, the
    random orders' median and band, the comparison of the orders, the bootstrap seeds."""

    curve: pd.DataFrame
    plans: dict
    plan: dict
    recommended: str
    orders: dict
    stats: dict = field(default_factory=dict)

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


def _repeat_batch(batch, G: int):
    """``batch`` with its rows repeated ``G`` times (copy ``c`` = rows ``c*R:(c+1)*R``)."""
    rep = (lambda d: None if d is None else {k: v.repeat(G, *[1] * (v.ndim - 1)) for k, v in d.items()})
    return TaskBatch(rep(batch.inputs), batch.examples.repeat(G), rep(batch.targets), rep(batch.corrupted))


@torch.no_grad()
def evaluate_gates(model, task, batches, gates: torch.Tensor, max_rows: int = 256) -> np.ndarray:
    """Per-example metric under each of ``gates [G, L, H]``: ``[G, N]``. Several gates run in one
    forward pass (copies of a batch, each with its own per-example gate), up to ``max_rows`` rows."""
    out = [[] for _ in range(len(gates))]
    for b in batches:
        ref = task.reference(model, b)
        per = max(1, max_rows // b.n_rows)
        for s in range(0, len(gates), per):
            g = gates[s:s + per]
            big = _repeat_batch(b, len(g))
            gate = g.repeat_interleave(b.n_rows, dim=0)  # [len(g) * R, L, H]
            hidden = model(big.inputs, head_gate=gate, return_type="hidden")
            r = None if ref is None else ref.repeat(len(g), *[1] * (ref.ndim - 1))
            values = task.compute(model, hidden, big, r).double().cpu().view(len(g), -1)
            for j in range(len(g)):
                out[s + j].append(values[j])
    return torch.stack([torch.cat(v) for v in out]).numpy()


def _grid(n_max: int, k: int) -> list:
    return sorted(set(list(range(0, n_max + 1, k)) + [n_max]))


def pruning_curve(model, task, methods=METHODS, target: float = 0.5, floor=None, step=None,
                  n_random: int = 10, split: float = 0.5, seed: int = 0, ablation: str = "zero",
                  batch_size: int = 16, sweep: pd.DataFrame = None, progress: bool = True,
                  refine: bool = True, n_bootstrap: int = 1000) -> PruningResult:
    """Pruning curves and plans (see the module doc).

    ``target``: largest fraction of heads to remove; ``floor``: fraction of the unpruned metric
    to keep (None: prune to ``target``); ``step``: fraction of all heads removed per point (and
    per Michel iteration); None: one head at a time for models of at most 32 heads, else 10%;
    ``refine``: with a floor, also evaluate every head count between each order's last point
    within the floor and its first below it (the plans then have one-head resolution);
    ``n_random``: random orders (seeds ``seed .. seed+n_random-1``); ``split``: fraction of the
    task's examples used to choose (the rest scores); ``ablation``: how the ``ablation`` method's
    sweep removes a head (zero, mean, resample, uniform); ``sweep``: a precomputed sweep table
    (``layer, head, damage``) of the selection split (see :func:`selection_split` and the module
    doc); ``n_bootstrap``: resamples (seeded by ``seed``) for the CIs (see
    :mod:`headlens.pruning.uncertainty`)."""
    methods = tuple(methods)
    check(len(methods) > 0 and all(m in METHODS for m in methods), f"methods must be among {METHODS}, got {methods}")
    check(0 < target <= 1, f"target must lie in (0, 1], got {target}")
    check(floor is None or 0 < floor <= 1, f"floor must lie in (0, 1] (fraction of the unpruned metric), got {floor}")
    check(step is None or 0 < step <= 1, f"step must lie in (0, 1] or be None, got {step}")
    check(n_random >= 1, f"n_random must be >= 1, got {n_random}")
    check(n_bootstrap >= 1, f"n_bootstrap must be >= 1, got {n_bootstrap}")
    task = load_task(task, model)
    select, held, _ = selection_split(task, split, seed)
    heads = model.head_labels()
    n_max = min(len(heads), round(target * len(heads)))
    if step is None:
        step = 1 / len(heads) if len(heads) <= 32 else 0.1
    k = max(1, round(step * len(heads)))

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
    keys = list(orders)

    cache, encoded = {}, [(t, t.batches(model, batch_size)) for t in (select, held)]
    bar = tqdm(desc="pruning curve", unit="point", disable=not progress, leave=False)

    def scores(points):  # (order key, n) -> per-example (selection [M], held-out [N]), new ones in one go
        todo = sorted({frozenset(orders[o][:n]) for o, n in points} - set(cache), key=sorted)
        if todo:
            gates = torch.stack([gate_without(model, sorted(h)) for h in todo])
            values = [evaluate_gates(model, t, b, gates) for t, b in encoded]
            for i, h in enumerate(todo):
                cache[h] = (values[0][i], values[1][i])
            bar.update(len(todo))
        return [cache[frozenset(orders[o][:n])] for o, n in points]

    grid = _grid(n_max, k)
    scores([(o, n) for o in keys for n in grid])
    grids = {o: list(grid) for o in keys}
    unpruned_sel = float(cache[frozenset()][0].mean())
    if refine and floor is not None:  # one head at a time where a non-random order crosses the floor
        for o in keys:
            if o[0] == "random":
                continue  # the baseline stays on the grid of steps (its band spans several of them)
            sel = [cache[frozenset(orders[o][:n])][0].mean() for n in grid]
            ok = [_passes(v, unpruned_sel, floor, task.higher_is_better) for v in sel]
            if not all(ok):
                bad = ok.index(False)
                grids[o] = sorted(set(grid) | set(range(grid[max(bad - 1, 0)] + 1, grid[bad])))
        scores([(o, n) for o in keys for n in grids[o]])
    bar.close()
    return _result(task, model, orders, keys, grids, cache, floor, target, seed, n_bootstrap, len(select), len(held))


def _result(task, model, orders, keys, grids, cache, floor, target, seed, n_bootstrap, n_select, n_held):
    """The curve table, every order's plan and the plans' intervals (see :mod:`headlens.pruning.uncertainty`).
    ``grids``: the head counts each order was evaluated at (random orders: the steps only)."""
    heads = model.head_labels()
    sel = {o: np.stack([cache[frozenset(orders[o][:n])][0] for n in grids[o]]) for o in keys}  # [G_o, M]
    hel = {o: np.stack([cache[frozenset(orders[o][:n])][1] for n in grids[o]]) for o in keys}  # [G_o, N]
    unpruned_sel, unpruned_held = float(sel[keys[0]][0].mean()), float(hel[keys[0]][0].mean())
    random_keys = [o for o in keys if o[0] == "random"]
    named = [o for o in keys if o[0] != "random"]
    counts_held, counts_sel = resample_counts(n_held, n_bootstrap, seed), resample_counts(n_select, n_bootstrap, seed + 1)
    reference = {}  # n -> the random orders' mean per held-out example, where every seed was evaluated
    for n in sorted(set.intersection(*[set(grids[o]) for o in random_keys])) if random_keys else []:
        reference[n] = np.mean([hel[o][grids[o].index(n)] for o in random_keys], axis=0)
    rows, cis, p_rand = [], {}, {}
    for o in keys:
        method, s = o
        lo, hi = point_cis(hel[o][None], counts_held)
        cis[o] = (lo[0], hi[0])
        ref = np.stack([reference.get(n, np.full(n_held, np.nan)) for n in grids[o]])
        p_rand[o] = p_vs_random(np.stack([hel[o], ref]), np.array([False, True]))[0] if method != "random" \
            else np.full(len(grids[o]), np.nan)
        p_rand[o][[n not in reference for n in grids[o]]] = np.nan
        for j, n in enumerate(grids[o]):
            m_held, m_sel = float(hel[o][j].mean()), float(sel[o][j].mean())
            rows.append(dict(method=method, seed=s, n_pruned=n, fraction_pruned=n / len(heads), metric=m_held,
                             ci_low=float(cis[o][0][j]), ci_high=float(cis[o][1][j]), metric_selection=m_sel,
                             relative=m_held / unpruned_held if unpruned_held else np.nan,
                             within_floor=_passes(m_sel, unpruned_sel, floor, task.higher_is_better),
                             p_vs_random=float(p_rand[o][j])))
    curve = pd.DataFrame(rows)
    curve["seed"] = curve["seed"].astype("Int64")

    sizes = {o: int(plan_sizes(sel[o].mean(-1)[None], np.array(grids[o]), unpruned_sel, floor,
                               task.higher_is_better)[0]) for o in keys}
    boot = {o: plan_size_bootstrap(sel[o][None], np.array(grids[o]), floor, task.higher_is_better, counts_sel)[:, 0]
            for o in named}  # [B]
    plans, chosen, summary = {}, {}, {}
    for o in keys:
        method, s = o
        if method == "random" and s != seed:
            continue
        n = sizes[o]
        plans[method] = as_plan(orders[o][:n])
        chosen[method] = (n, float(sel[o][grids[o].index(n)].mean()))
    for o in named:
        n, j = sizes[o], grids[o].index(sizes[o])
        n_low, n_high = interval(boot[o], LEVEL)
        summary[o[0]] = dict(n_pruned=n, n_low=n_low, n_high=n_high, metric=float(hel[o][j].mean()),
                             ci_low=float(cis[o][0][j]), ci_high=float(cis[o][1][j]),
                             p_vs_random=None if np.isnan(p_rand[o][j]) else float(p_rand[o][j]))
    random_sizes = np.array([sizes[o] for o in random_keys])
    if random_keys:
        n_med = int(np.median(random_sizes))
        r_lo, r_hi = interval(random_sizes, BAND)
        at = [float(hel[o][grids[o].index(n_med)].mean()) for o in random_keys if n_med in grids[o]]
        summary["random"] = dict(n_pruned=n_med, n_low=r_lo, n_high=r_hi, n_seeds=len(random_keys), band=BAND,
                                 metric=float(np.median(at)) if at else float("nan"))
    comparison = compare_orders([o[0] for o in named], np.stack([boot[o] for o in named], axis=1),
                                np.array([sizes[o] for o in named]), random_sizes) if named else None
    candidates = [m for m in chosen if m != "random"] or list(chosen)
    sign = 1 if task.higher_is_better else -1
    best = max(candidates, key=lambda m: (chosen[m][0], sign * chosen[m][1]))
    curve.attrs.update(task=task.name, metric=task.metric_name, higher_is_better=task.higher_is_better,
                       unpruned=unpruned_held, unpruned_selection=unpruned_sel, floor=floor, target=target,
                       n_selection=n_select, n_heldout=n_held, recommended=best)
    stats = dict(methods=summary, comparison=comparison, grid=sorted({int(n) for g in grids.values() for n in g}),
                 n_bootstrap=n_bootstrap, bootstrap_seeds=dict(heldout=seed, selection=seed + 1), level=LEVEL,
                 test="paired t-test of per-example held-out metrics against the mean of the random orders")
    return PruningResult(curve, plans, plans[best], best, {m: o for (m, s), o in orders.items()
                                                            if m != "random" or s == seed}, stats)
