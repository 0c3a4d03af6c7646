"""What the circuit analyses found, read from their tables without being told what to look for:
the heads that matter (activation patching), each one's strongest composition partner and strongest
path per input, and the sentences a report prints. A one-layer model, or a corrupted input that
does not move the metric, gets the sentence saying there is nothing to find between heads.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

VIA_WORDS = {"q": "query", "k": "key", "v": "value", "logits": "logits"}


def _name(layer, head) -> str:
    return f"{int(layer)}.{int(head)}"


def key_heads(patching: pd.DataFrame, n: int = 8) -> list[tuple[int, int]]:
    """Up to ``n`` query heads whose all-position ``z`` patch moves the metric (95% CI excludes 0),
    largest ``|effect|`` first."""
    z = patching[(patching.activation == "z") & (patching.position == -1)]
    moved = z[(z.effect_ci_low > 0) | (z.effect_ci_high < 0)]
    moved = moved.reindex(moved.effect.abs().sort_values(ascending=False, kind="stable").index)
    return [(int(r.layer), int(r.head)) for r in moved.head(n).itertuples()]


def partners(composition: pd.DataFrame, receivers) -> pd.DataFrame:
    """Per receiver and ``via``: its strongest composition partner (``sender_layer, sender_head,
    score, baseline_p95``) and the runner-up's score (``second``)."""
    rows = []
    for (rl, rh, via), g in composition.groupby(["receiver_layer", "receiver_head", "via"], sort=True):
        if (rl, rh) not in set(receivers):
            continue
        g = g.sort_values("score", ascending=False, kind="stable")
        best = g.iloc[0]
        rows.append(dict(receiver_layer=rl, receiver_head=rh, via=via, sender_layer=int(best.sender_layer),
                         sender_head=int(best.sender_head), score=float(best.score),
                         baseline_p95=float(best.baseline_p95),
                         second=float(g.score.iloc[1]) if len(g) > 1 else np.nan))
    return pd.DataFrame(rows, columns=["receiver_layer", "receiver_head", "via", "sender_layer", "sender_head",
                                       "score", "baseline_p95", "second"])


def strongest_paths(paths: pd.DataFrame, receivers=None) -> pd.DataFrame:
    """Per receiver (all, or those in ``receivers``; the logits too) and ``via``: the sender whose path
    moves the metric most (``|effect|``), with its CI, and the runner-up's ``|effect|`` (``second``)."""
    rows = []
    for (rl, rh, via), g in paths.groupby(["receiver_layer", "receiver_head", "via"], sort=True):
        if receivers is not None and via != "logits" and (rl, rh) not in set(receivers):
            continue
        g = g.reindex(g.effect.abs().sort_values(ascending=False, kind="stable").index)
        best = g.iloc[0]
        rows.append(dict(receiver_layer=rl, receiver_head=rh, via=via, sender_layer=int(best.sender_layer),
                         sender_head=int(best.sender_head), effect=float(best.effect), ci_low=float(best.ci_low),
                         ci_high=float(best.ci_high), second=float(g.effect.abs().iloc[1]) if len(g) > 1 else np.nan))
    return pd.DataFrame(rows, columns=["receiver_layer", "receiver_head", "via", "sender_layer", "sender_head",
                                       "effect", "ci_low", "ci_high", "second"])


def _num(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else "n/a"


def findings(n_layers: int, task: dict, patching: Optional[pd.DataFrame] = None,
             composition: Optional[pd.DataFrame] = None, paths: Optional[pd.DataFrame] = None,
             circuit: Optional[dict] = None, dla: Optional[pd.DataFrame] = None, n_heads: int = 4) -> list[str]:
    """Plain sentences from the tables. ``task``: ``name, metric, higher_is_better, clean, corrupted,
    gap_low, gap_high`` (the clean - corrupted difference of means and its 95% CI)."""
    out = []
    gap_low, gap_high = task.get("gap_low", np.nan), task.get("gap_high", np.nan)
    out.append(f"On {task['name']}, {task['metric']} is {_num(task['clean'])} on the clean input and "
               f"{_num(task['corrupted'])} on the corrupted one (difference 95% CI "
               f"[{_num(gap_low)}, {_num(gap_high)}]).")
    if np.isfinite(gap_low) and gap_low <= 0 <= gap_high:
        out.append("The corrupted input does not change the metric measurably: there is no behaviour for "
                   "patching to explain, and nothing to find.")
    if n_layers == 1:
        out.append("The model has one layer: no head can read another head's output, so there is no Q-, K- "
                   "or V-composition, no head-to-head path and no induction circuit -- nothing to find between "
                   "heads. Its heads act on the logits directly.")
    heads = key_heads(patching, n_heads) if patching is not None else []
    if heads:
        z = patching[(patching.activation == "z") & (patching.position == -1)].set_index(["layer", "head"])
        out.append("Patching a head's output moves the metric most for " + ", ".join(
            f"{_name(*h)} ({_num(z.loc[h].normalized)} of the clean-corrupted gap restored)" for h in heads) + ".")
    later = [h for h in heads if h[0] > 0]
    if composition is not None and len(composition) and later:
        best = partners(composition, later)
        k = best[best.via == "k"]
        if len(k):
            out.append("Strongest K-composition partner: " + "; ".join(
                f"{_name(r.receiver_layer, r.receiver_head)} <- {_name(r.sender_layer, r.sender_head)} "
                f"({_num(r.score)}, {r.score / r.baseline_p95:.1f}x the random baseline's 95th percentile "
                f"{_num(r.baseline_p95)})" for r in k.itertuples()) + ".")
        above = (composition.score > composition.baseline_p95).mean()
        out.append(f"{above:.0%} of all head pairs compose above the random baseline's 95th percentile "
                   "(5% would by chance).")
    if paths is not None and len(paths) and later:
        best = strongest_paths(paths, later)
        for via in ("k", "q", "v"):
            sub = best[best.via == via]
            sig = sub[(sub.ci_low > 0) | (sub.ci_high < 0)]
            if len(sig):
                out.append(f"Strongest {VIA_WORDS[via]}-side path: " + "; ".join(
                    f"{_name(r.sender_layer, r.sender_head)} -> {_name(r.receiver_layer, r.receiver_head)} "
                    f"({r.effect:+.3g}, CI [{_num(r.ci_low)}, {_num(r.ci_high)}]; runner-up |effect| {_num(r.second)})"
                    for r in sig.itertuples()) + ".")
            elif len(sub):
                out.append(f"No {VIA_WORDS[via]}-side path between heads moves the metric measurably "
                           "(every 95% CI includes 0).")
    if paths is not None and len(paths):
        direct = paths[paths.via == "logits"]
        if len(direct):
            top = direct.reindex(direct.effect.abs().sort_values(ascending=False).index).head(3)
            out.append("Strongest direct paths to the logits: " + ", ".join(
                f"{_name(r.sender_layer, r.sender_head)} ({r.effect:+.3g})" for r in top.itertuples()) + ".")
    if dla is not None and len(dla):
        top = dla.reindex(dla.attribution.abs().sort_values(ascending=False).index).head(3)
        out.append("Largest direct logit attributions: " + ", ".join(
            f"{_name(r.layer, r.head)} ({r.attribution:+.3g}, of which {r.from_right:+.3g} read from the right "
            f"answer's token)" for r in top.itertuples()) + ".")
    if circuit:
        v, s = circuit["verified"], circuit["stated"]
        out.append(f"{circuit['method'].upper()} circuit: {circuit['n_edges']} of {circuit['total_edges']} edges "
                   f"({circuit['rule']}); stated faithfulness {_num(s['faithfulness'])} on {s['n_examples']} "
                   f"selection examples, verified by exact patching on {v['n_examples']} held-out examples: "
                   f"{_num(v['faithfulness'])} (95% CI [{_num(v['ci_low'])}, {_num(v['ci_high'])}]); the edge "
                   f"scores' linear estimate was {_num(circuit['estimated'])}.")
    return out
