"""Figures of head importance and pruning for the report (the pattern and cluster figures live in
:mod:`headlens.reporting.figures.patterns`; same conventions: ``path`` without extension, PNG + SVG saved, their
paths returned).

``damage`` is the metric change when a head is ablated, signed so that positive means the
ablation hurts (see :mod:`headlens.importance.ablation`); ``damage_low, damage_high`` its 95% CI.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from headlens.errors import check
from headlens.importance.statistics import spearman
from headlens.reporting.figures.patterns import head_names, save_figure

METHOD_COLORS = {"michel": "#1f77b4", "ablation": "#d62728", "random": "#7f7f7f"}


def importance_heatmap(heads: pd.DataFrame, path: str = "importance", metric: str = "metric",
                       title: Optional[str] = None) -> list[str]:
    """Layer x head heatmap of ``damage`` (diverging, centred at 0); each cell shows the value,
    with ``*`` where the head is significant at a 5% false-discovery rate (``q_value < 0.05``,
    Benjamini-Hochberg; without a ``q_value`` column: where the 95% CI excludes zero)."""
    check({"layer", "head", "damage", "damage_low", "damage_high"} <= set(heads.columns),
          "heads needs layer, head, damage, damage_low, damage_high columns")
    grid = heads.pivot(index="layer", columns="head", values="damage").astype(float)
    corrected = "q_value" in heads
    sig = heads.q_value < 0.05 if corrected else (heads.damage_low > 0) | (heads.damage_high < 0)
    marks = heads.assign(text=[f"{d:.2g}{'*' if s else ''}" for d, s in zip(heads.damage, sig)])
    text = marks.pivot(index="layer", columns="head", values="text").fillna("")
    L, H = grid.shape
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = Figure(figsize=(max(4.5, 0.62 * H + 2.2), max(2.6, 0.48 * L + 1.3)))
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim,
                annot=text if L * H <= 200 else False, fmt="", annot_kws={"fontsize": 6.5}, linewidths=0.5,
                linecolor="white",
                cbar_kws={"label": f"damage ({metric} change, + = hurts)"})
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    star = "q < 0.05, Benjamini-Hochberg" if corrected else "95% CI excludes 0"
    ax.set_title(title or f"Damage when one head is ablated (* : {star})")
    return save_figure(fig, path)


def importance_scatter(heads: pd.DataFrame, path: str = "grad_vs_ablation", y: str = "grad_importance_raw",
                       n_labels: int = 8, title: Optional[str] = None) -> list[str]:
    """Gradient importance ``y`` against ablation damage with its CI (x); the ``n_labels`` heads
    with the largest |damage| are labelled; the title gives the Spearman rank correlation of
    ``y`` with |damage| (gradient importance is a magnitude)."""
    check({"damage", "damage_low", "damage_high", y} <= set(heads.columns),
          f"heads needs damage, damage_low, damage_high and {y} columns")
    rho = spearman(heads[y], heads.damage.abs())
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    xerr = np.stack([heads.damage - heads.damage_low, heads.damage_high - heads.damage]).clip(min=0)
    ax.errorbar(heads.damage, heads[y], xerr=xerr, fmt="o", ms=4, color="#1f77b4",
                ecolor="#9ab", elinewidth=0.8, alpha=0.85)
    ax.axvline(0, color="#999", lw=0.8, ls="--")
    named = heads.assign(name=head_names(heads), size=heads.damage.abs())
    for r in named.nlargest(n_labels, "size").itertuples():
        ax.annotate(r.name, (r.damage, getattr(r, y)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ablation damage (metric change, + = hurts; 95% CI)")
    ax.set_ylabel("gradient importance (Michel et al.)" + (", raw" if y.endswith("_raw") else ""))
    ax.set_title(title or f"Gradient vs ablation importance (Spearman rho = {rho:.2f} with |damage|)")
    return save_figure(fig, path)


def pruning_plot(curve: pd.DataFrame, path: str = "pruning_curve", metric: str = "metric",
                 clean: Optional[float] = None, title: Optional[str] = None) -> list[str]:
    """Metric vs heads removed, one line per method with its 95% bootstrap CI (``ci_low, ci_high``,
    when present) as a band; methods with several seeds (random) show their median and the 5th-95th
    percentile band over seeds. ``clean``: the full model's metric, drawn as a dashed line."""
    check({"method", "n_pruned", "metric"} <= set(curve.columns),
          "curve needs method, n_pruned, metric columns")
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for method, part in curve.groupby("method", sort=True):
        color = METHOD_COLORS.get(method)
        grouped = part.groupby("n_pruned")["metric"]
        if grouped.size().max() > 1:
            stats = grouped.agg(mid="median", low=lambda x: x.quantile(0.05), high=lambda x: x.quantile(0.95),
                                count="count").reset_index()
            label = f"{method} (median of {int(stats['count'].max())} seeds, 90% band)"
        else:
            stats = part.rename(columns={"metric": "mid", "ci_low": "low", "ci_high": "high"}).sort_values("n_pruned")
            label = f"{method} (95% CI)" if "low" in stats else method
        ax.plot(stats.n_pruned, stats["mid"], marker="o", ms=2.5, lw=1.2, label=label, color=color)
        if "low" in stats and stats["low"].notna().any():
            ax.fill_between(stats.n_pruned, stats["low"], stats["high"], alpha=0.2, color=color, lw=0)
    if clean is not None:
        ax.axhline(clean, color="#444", lw=0.8, ls="--", label="full model")
    ax.set_xlabel("heads removed")
    ax.set_ylabel(metric)
    ax.set_title(title or "Pruning curve (held-out examples)")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)
