"""Figures of long-context heads and KV plans (``headlens kv-heads``, the report's "Long context"
section, ``analyses/longcontext_study.py``); same conventions as the other figure modules:
``path`` without extension, PNG + SVG saved, their paths returned."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from headlens.reporting.figures.patterns import save_figure

METHOD_STYLE = {"headlens": ("#d62728", "o"), "retrieval": ("#1f77b4", "s"), "sink": ("#2ca02c", "^"),
                "random": ("#7f7f7f", "x"), "duo-headlens": ("#d62728", "o"), "duo-random": ("#7f7f7f", "x"),
                "knorm": ("#9467bd", "v"), "snapkv": ("#8c564b", "D"), "streaming_llm": ("#e377c2", "P")}


def damage_heatmap(kv: pd.DataFrame, path: str, metric: str = "answer loss") -> list[str]:
    """Layer x kv-head heatmap of streaming damage; ``S`` marks the kv heads the plan streams,
    ``*`` those whose 95% CI excludes zero."""
    grid = kv.pivot(index="layer", columns="kv_head", values="streaming_damage").astype(float)
    sig = (kv.ci_low > 0) | (kv.ci_high < 0)
    text = kv.assign(t=[f"{d:.2g}{'*' if s else ''}{' S' if dec == 'stream' else ''}"
                        for d, s, dec in zip(kv.streaming_damage, sig, kv.decision)])
    text = text.pivot(index="layer", columns="kv_head", values="t")
    L, K = grid.shape
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = Figure(figsize=(1.1 * K + 2.4, max(3.0, 0.3 * L + 1.2)))
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, annot=text, fmt="",
                annot_kws={"fontsize": 6.5}, linewidths=0.4, linecolor="white",
                cbar_kws={"label": f"streaming damage ({metric} change)"})
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_title("Damage when one kv head keeps only sink + window (S: streams in the plan)", fontsize=9)
    return save_figure(fig, path)


def head_scores_scatter(heads: pd.DataFrame, path: str, threshold: float = 0.1) -> list[str]:
    """Sink rate against retrieval score per query head (bars: 95% CI); heads above ``threshold``
    are labelled."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    err = np.vstack([heads.retrieval_score - heads.retrieval_ci_low, heads.retrieval_ci_high - heads.retrieval_score])
    ax.errorbar(heads.sink_rate, heads.retrieval_score, yerr=np.clip(err, 0, None), fmt="o", ms=3.5,
                color="#1f77b4", ecolor="#bbbbbb", elinewidth=0.8, alpha=0.8)
    for r in heads[heads.retrieval_score > threshold].itertuples():
        ax.annotate(f"{int(r.layer)}.{int(r.head)}", (r.sink_rate, r.retrieval_score), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    ax.axhline(threshold, color="#999999", lw=0.8, ls="--")
    ax.set_xlabel("sink rate (share of queries with > 0.3 on the first token)")
    ax.set_ylabel("retrieval score (needle tokens copied)")
    ax.set_title("Query heads: sinks and retrievers", fontsize=10)
    return save_figure(fig, path)


def plan_comparison(rows: pd.DataFrame, path: str, full: Optional[dict] = None) -> list[str]:
    """Held-out needle accuracy and LM loss against the KV memory saved, one line per method
    (random: mean over seeds, band min-max). ``rows``: ``method, saved_fraction,
    needle_accuracy, lm_loss``; ``full``: the full model's values (dotted lines)."""
    fig = Figure(figsize=(10, 3.8))
    for i, (col, label) in enumerate((("needle_accuracy", "held-out needle accuracy"),
                                      ("lm_loss", "held-out LM loss (continuation)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, part in rows.groupby("method", sort=False):
            if method == "full" or part[col].isna().all():
                continue
            g = part.groupby("saved_fraction")[col]
            color, marker = METHOD_STYLE.get(method, ("#333333", "."))
            x = np.array(sorted(g.groups))
            ax.plot(x, g.mean().loc[x], marker=marker, color=color, label=method, ms=4)
            if g.size().max() > 1:
                ax.fill_between(x, g.min().loc[x], g.max().loc[x], color=color, alpha=0.15, lw=0)
        if full is not None and full.get(col) is not None:
            ax.axhline(full[col], color="black", ls=":", lw=1, label="full cache")
        ax.set_xlabel("KV memory saved")
        ax.set_ylabel(label)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
