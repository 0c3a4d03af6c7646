"""``headlens kv-heads``: which kv heads can stream, chosen on one split and scored on another.

1. On the ``select`` split: every query head's sink rate and retrieval score (with CIs), and
   every kv head's streaming damage: the change of the answer loss when that kv head alone
   keeps only a sink + window cache after the context, from the exact fast sweep
   (:func:`headlens.importance.sweep.ablation_sweep` with ``units="kv_heads"``), with bootstrap CIs.
2. The KV plan: the kv heads of least damage stream until ``full_fraction`` of them keep a full
   cache, or, with ``damage_budget``, as many as keep the plan's measured joint damage on the
   selection split within the budget.
3. On the ``heldout`` split: needle accuracy, answer loss and LM loss of the full model, of the
   plan and of the same-size random (``n_random`` seeds), retrieval-score and sink-rate plans,
   at each of ``compressions`` (fractions of the KV memory saved); and the retrieval check:
   removing the top retrieval heads at the decoding positions against removing as many random heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.streaming import Streaming
from headlens.importance.sweep import ablation_sweep
from headlens.longcontext import decode
from headlens.longcontext.plans import (
    as_layers,
    full_fraction_for_compression,
    kv_memory,
    kv_plan_record,
    n_streaming,
    order_kv_heads,
)
from headlens.longcontext.scores import collect, head_scores, kv_head_scores
from headlens.longcontext.tasks import KINDS, RETRIEVAL_KINDS, load_long_context
from headlens.model.heads import head_label

RETRIEVAL_THRESHOLD = 0.1  # Wu et al.: heads scoring above it are "retrieval heads"
BASELINES = ("retrieval", "sink", "random")


@dataclass
class KVHeadsResult:
    """``kv``: one row per kv head (``kv_heads.csv``); ``heads``: per query head scores;
    ``plans``: held-out metrics per (method, seed, compression); ``retrieval_ablation``: held-out
    metrics with the top retrieval heads removed vs as many random ones; ``plan``: the
    ``kv_plan.json`` record; ``config``: the settings."""

    kv: pd.DataFrame
    heads: pd.DataFrame
    plans: pd.DataFrame
    retrieval_ablation: pd.DataFrame
    plan: dict
    config: dict = field(default_factory=dict)
    selection_curve: pd.DataFrame = None
    orders: dict = field(default_factory=dict)  # method (or ("random", seed)) -> kv heads in streaming order


def kv_heads(model, lengths=(1024,), kinds=KINDS, n_per_group: int = 4, sink: int = 4, window: int = 64,
             full_fraction: float = 0.5, damage_budget=None, compressions=(0.25, 0.5, 0.75), n_random: int = 5,
             n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 4, progress: bool = True) -> KVHeadsResult:
    """The analysis of the module doc on ``model`` (a decoder with a tokenizer)."""
    check(model.cfg.causal and model.unembed is not None,
          f"kv-heads needs a decoder with an output head: {model.cfg.name!r} is not one (KV caches are a decoder's)")
    check(damage_budget is None or damage_budget >= 0, f"damage_budget must be >= 0, got {damage_budget}")
    check(n_random >= 1, f"n_random must be >= 1, got {n_random}")
    check(all(0 < c < 1 for c in compressions), f"compressions must be fractions in (0, 1), got {compressions}")
    spec = Streaming(sink, window)
    select = load_long_context(model, kinds, lengths, "select", n_per_group)
    held = load_long_context(model, kinds, lengths, "heldout", n_per_group)
    bar = tqdm(total=5, desc="kv-heads", disable=not progress, leave=False)
    stats, pre_select = collect(model, select, batch_size)
    heads = head_scores(model, stats, n_bootstrap, seed)
    bar.update(1)
    sweep = ablation_sweep(model, select, spec, units="kv_heads", n_bootstrap=n_bootstrap, seed=seed,
                           batch_size=batch_size, progress=progress)
    bar.update(1)
    kv = kv_head_scores(heads).merge(
        sweep.rename(columns={"head": "kv_head", "damage": "streaming_damage", "importance_ci_low": "ci_low",
                              "importance_ci_high": "ci_high"})[["layer", "kv_head", "streaming_damage", "ci_low",
                                                                  "ci_high"]], on=["layer", "kv_head"])
    orders = {m: order_kv_heads(kv, m) for m in ("headlens", "retrieval", "sink")}
    orders.update({("random", s): order_kv_heads(kv, "random", s) for s in range(seed, seed + n_random)})
    n_kv = len(kv)
    curve = None
    if damage_budget is None:
        n = n_streaming(n_kv, full_fraction)
    else:
        n, curve = _within_budget(model, select, pre_select, orders["headlens"], spec, damage_budget)
    chosen = set(orders["headlens"][:n])
    kv["decision"] = ["stream" if (a, b) in chosen else "full" for a, b in zip(kv["layer"], kv["kv_head"])]
    kv = kv[["layer", "kv_head", "query_heads", "sink_rate", "retrieval_score", "streaming_damage", "ci_low",
             "ci_high", "decision"]].sort_values(["layer", "kv_head"], ignore_index=True)
    bar.update(1)

    pre_held = decode.prefill(model, held, batch_size)
    length = int(np.mean([len(t) for t in held.tokens]))
    full = decode.evaluate(model, held, pre_held)
    rows = [_summary("full", None, 1.0, None, 0, held, full, kv_memory(model.cfg, length, {}, sink, window))]
    targets = {round(full_fraction_for_compression(c, length, sink, window), 4): c for c in compressions}
    targets.setdefault(round(1 - n / n_kv, 4), None)
    for ff, target in sorted(targets.items()):
        k = n_streaming(n_kv, ff)
        for key, order in orders.items():
            method, s = key if isinstance(key, tuple) else (key, None)
            plan = as_layers(order[:k])
            metrics = decode.evaluate(model, held, pre_held, plan, spec)
            rows.append(_summary(method, s, ff, target, k, held, metrics, kv_memory(model.cfg, length, plan, sink, window)))
    plans = pd.DataFrame(rows)
    bar.update(1)

    ablation = _retrieval_ablation(model, held, pre_held, heads, full, n_random, seed)
    bar.update(1)
    bar.close()
    streaming = as_layers(chosen)
    mine = plans[(plans.method == "headlens") & (plans.n_streaming == n)].iloc[0].to_dict()
    record = kv_plan_record(
        model, streaming, sink, window, "headlens", full_fraction=round(1 - n / n_kv, 4),
        damage_budget=damage_budget, memory=kv_memory(model.cfg, length, streaming, sink, window),
        selection=dict(task=select.name, examples=len(select), kinds=list(kinds), lengths=list(map(int, lengths)),
                       metric=select.metric_name, ablation=str(spec)),
        heldout=dict(examples=len(held), **{k: _clean(v) for k, v in mine.items()
                                            if k in ("needle_accuracy", "answer_loss", "lm_loss")},
                     full_model={k: _clean(rows[0][k]) for k in ("needle_accuracy", "answer_loss", "lm_loss")}))
    config = dict(lengths=list(map(int, lengths)), kinds=list(kinds), n_per_group=n_per_group, sink=sink,
                  window=window, full_fraction=full_fraction, damage_budget=damage_budget,
                  compressions=list(compressions), n_random=n_random, n_bootstrap=n_bootstrap, seed=seed,
                  batch_size=batch_size, n_select=len(select), n_heldout=len(held))
    return KVHeadsResult(kv, heads, plans, ablation, record, config, curve, orders)


def _clean(x):
    return None if x is None or (isinstance(x, float) and not np.isfinite(x)) else float(x)


def _mean_ci(values: np.ndarray, seed: int = 0) -> tuple:
    if len(values) < 2 or np.ptp(values) == 0:
        v = float(values.mean()) if len(values) else np.nan
        return v, v, v
    res = bootstrap((values,), np.mean, n_resamples=1000, method="percentile", random_state=np.random.default_rng(seed))
    return float(values.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def _summary(method, seed, full_fraction, compression, k, task, metrics: dict, memory: dict) -> dict:
    """One row of the held-out comparison."""
    kinds = np.array(task.kinds)
    retrieval, lm = np.isin(kinds, RETRIEVAL_KINDS), kinds == "lm"
    acc, acc_lo, acc_hi = _mean_ci(metrics["accuracy"][retrieval]) if retrieval.any() else (np.nan,) * 3
    return dict(method=method, seed=seed, target_compression=compression, full_fraction=full_fraction, n_streaming=k,
                saved_fraction=memory["saved_fraction"], saved_bytes=memory["saved_bytes"],
                needle_accuracy=acc, needle_accuracy_ci_low=acc_lo, needle_accuracy_ci_high=acc_hi,
                answer_loss=float(metrics["loss"][retrieval].mean()) if retrieval.any() else np.nan,
                lm_loss=float(metrics["loss"][lm].mean()) if lm.any() else np.nan)


def _within_budget(model, task, prefilled, order, spec, budget: float, step: int = 0):
    """The largest prefix of ``order`` whose joint damage (mean answer-loss increase) on the
    selection split stays within ``budget``; and the curve measured on the way."""
    full = decode.evaluate(model, task, prefilled, metrics=("loss",))["loss"].mean()
    step = step or max(1, len(order) // 20)
    rows, best = [], 0
    for n in range(step, len(order) + 1, step):
        damage = decode.evaluate(model, task, prefilled, as_layers(order[:n]), spec, metrics=("loss",))["loss"].mean() - full
        rows.append(dict(n_streaming=n, damage=float(damage)))
        if damage > budget:
            break
        best = n
    return best, pd.DataFrame(rows)


def _retrieval_ablation(model, task, prefilled, heads: pd.DataFrame, full: dict, n_random: int, seed: int):
    """Held-out needle accuracy with the top retrieval heads (score > 0.1 on the selection split,
    at least one) removed at the decoding positions, against as many random other heads."""
    ranked = heads.sort_values(["retrieval_score", "layer", "head"], ascending=[False, True, True])
    k = max(1, int((heads.retrieval_score > RETRIEVAL_THRESHOLD).sum()))
    top = [(int(a), int(b)) for a, b in ranked[["layer", "head"]].values[:k]]
    rest = [(int(a), int(b)) for a, b in ranked[["layer", "head"]].values[k:]]
    empty = kv_memory(model.cfg, 1, {}, 0, 1)
    rows = [dict(_summary("full", None, 1.0, None, 0, task, full, empty), removed="none", n_removed=0)]
    metrics = decode.evaluate(model, task, prefilled, removed=top)
    rows.append(dict(_summary("top retrieval heads", None, 1.0, None, 0, task, metrics, empty),
                     removed=" ".join(head_label(a, b) for a, b in top), n_removed=k))
    for s in range(seed, seed + n_random):
        pick = [rest[i] for i in np.random.default_rng(s).choice(len(rest), size=min(k, len(rest)), replace=False)]
        metrics = decode.evaluate(model, task, prefilled, removed=pick)
        rows.append(dict(_summary("random heads", s, 1.0, None, 0, task, metrics, empty),
                         removed=" ".join(head_label(a, b) for a, b in sorted(pick)), n_removed=k))
    cols = ["method", "seed", "n_removed", "removed", "needle_accuracy", "needle_accuracy_ci_low",
            "needle_accuracy_ci_high", "answer_loss", "lm_loss"]
    return pd.DataFrame(rows)[cols]
