"""Figures of circuits between heads (same conventions as the other figure modules: ``path`` without
extension, PNG + SVG saved, their paths returned): the circuit graph (networkx layout by layer,
drawn with matplotlib), composition heatmaps (sender x receiver, per path), the faithfulness curve
and layer x head heatmaps of direct logit attribution and activation patching.
"""
from __future__ import annotations

from typing import Optional

import networkx as nx
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from headlens.model.heads import head_label
from headlens.reporting.figures.patterns import save_figure

VIA_COLORS = {"q": "#1f77b4", "k": "#d62728", "v": "#2ca02c", "mlp": "#9467bd", "logits": "#ff7f0e"}


def _node(name: str, group: int = 1) -> tuple[str, float, float]:
    """A graph node's label and position (x: layer, y: head) from an edge end's name; ``group``: query
    heads per key/value head (1: a key/value head is drawn as its query head)."""
    base = name.split("<")[0]
    if base == "input":
        return base, -1.0, 0.0
    if base == "logits":
        return base, None, 0.0
    if base.startswith("mlp"):
        return base, int(base[3:]) + 0.5, -1.5
    layer, head = base.split(".")
    if head.startswith("kv"):
        j = int(head[2:])
        if group == 1:
            return f"{layer}.{j}", int(layer), float(j)
        return base, int(layer) - 0.3, j * group + (group - 1) / 2  # beside the query heads it serves
    return base, int(layer), float(head)


def circuit_graph(edges: pd.DataFrame, path: str = "circuit_graph", n_layers: Optional[int] = None,
                  title: str = "Circuit", group: int = 1) -> list[str]:
    """The circuit's components as nodes (x: layer, y: head; MLPs below, the input left, the logits
    right; under grouped-query attention the key/value heads beside their query heads) and its
    edges as arrows coloured by the receiver's input (q, k, v, MLP, logits), width proportional to
    ``|score|``; of several edges between the same two components the strongest is drawn."""
    g = nx.DiGraph()
    last = n_layers if n_layers is not None else int(max([0] + [int(e) for e in edges.receiver_layer]))
    pos = {}
    for name in list(edges.sender) + list(edges.receiver):
        label, x, y = _node(name, group)
        pos[label] = (last + 0.5 if x is None else x, y)
        g.add_node(label)
    scale = float(edges.score.abs().max()) if len(edges) else 1.0
    strongest = {}
    for r in edges.itertuples():
        a, b = _node(r.sender, group)[0], _node(r.receiver, group)[0]
        if abs(r.score) >= strongest.get((a, b), (None, -1.0))[1]:
            strongest[(a, b)] = (r.via, abs(r.score))
    for (a, b), (via, _) in strongest.items():
        g.add_edge(a, b, via=via)
    widths = [0.6 + 3.4 * strongest[e][1] / (scale or 1.0) for e in g.edges]
    heads = sorted({y for _, y in pos.values()}) or [0]
    fig = Figure(figsize=(max(5.0, 1.3 * (last + 2) + 2), max(3.2, 0.42 * len(heads) + 1.6)))
    ax = fig.add_subplot()
    colors = [VIA_COLORS.get(g.edges[e]["via"], "#777777") for e in g.edges]
    nx.draw_networkx_edges(g, pos, ax=ax, edge_color=colors, width=widths or 1.0, arrows=True, arrowsize=9,
                           alpha=0.75, connectionstyle="arc3,rad=0.08", node_size=520)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#f2f2f2", edgecolors="#444444", node_size=520)
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=7)
    for via, color in VIA_COLORS.items():
        ax.plot([], [], color=color, label=via)
    ax.legend(title="into", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    ax.set_xticks(range(0, last))
    ax.tick_params(left=False, labelleft=False, bottom=True, labelbottom=True)
    ax.set_frame_on(False)
    return save_figure(fig, path)


def composition_heatmaps(composition: pd.DataFrame, path: str = "composition") -> list[str]:
    """One heatmap per path (Q, K, V): composition score of every sender (rows) into every later
    receiver (columns); ``*`` marks pairs above the random baseline's 95th percentile."""
    vias = [v for v in ("q", "k", "v") if (composition.via == v).any()]
    senders = sorted({(a, b) for a, b in zip(composition.sender_layer, composition.sender_head)})
    receivers = sorted({(a, b) for a, b in zip(composition.receiver_layer, composition.receiver_head)})
    n = max(len(receivers), 1)
    fig = Figure(figsize=(min(22, 3.0 + 0.32 * n) * max(len(vias), 1) / 1.6, min(18, 2.2 + 0.3 * len(senders))))
    vmax = float(composition.score.max()) if len(composition) else 1.0
    annotate = len(senders) * len(receivers) <= 150
    for i, via in enumerate(vias):
        ax = fig.add_subplot(1, len(vias), i + 1)
        sub = composition[composition.via == via]
        grid = sub.pivot_table(index=["sender_layer", "sender_head"], columns=["receiver_layer", "receiver_head"],
                               values="score").reindex(index=senders, columns=receivers)
        marks = (sub.score > sub.baseline_p95).to_numpy()
        text = sub.assign(t=[f"{s:.2f}{'*' if m else ''}" for s, m in zip(sub.score, marks)]).pivot_table(
            index=["sender_layer", "sender_head"], columns=["receiver_layer", "receiver_head"], values="t",
            aggfunc="first").reindex(index=senders, columns=receivers).fillna("")
        grid.index = [head_label(a, b) for a, b in grid.index]
        grid.columns = [head_label(a, b) for a, b in grid.columns]
        sns.heatmap(grid.astype(float), ax=ax, cmap="magma", vmin=0, vmax=vmax,
                    annot=text.to_numpy() if annotate else False, fmt="", annot_kws={"fontsize": 6},
                    cbar=i == len(vias) - 1,
                    cbar_kws={"label": "composition score"})
        p95 = float(sub.baseline_p95.iloc[0]) if len(sub) else np.nan
        ax.set_title(f"{via.upper()}-composition (random p95 {p95:.3f})", fontsize=9)
        ax.set_xlabel("receiver")
        ax.set_ylabel("sender" if i == 0 else "")
    return save_figure(fig, path)


def faithfulness_plot(curve: pd.DataFrame, path: str = "faithfulness", target: Optional[float] = None,
                      title: str = "Faithfulness of the top-n circuit") -> list[str]:
    """Exact faithfulness (held-out, 95% CI band) and the edge scores' linear estimate against the
    number of edges kept; the chosen circuit is marked, the target dashed."""
    fig = Figure(figsize=(6.2, 3.6))
    ax = fig.add_subplot()
    x = curve.n_edges.clip(lower=0.8)
    ax.fill_between(x, curve.ci_low, curve.ci_high, color="#1f77b4", alpha=0.2, lw=0)
    ax.plot(x, curve.faithfulness, "o-", color="#1f77b4", ms=3.5, label="exact (edge patching)")
    ax.plot(x, curve.estimated, "s--", color="#7f7f7f", ms=3, label="estimate (edge scores)")
    if "chosen" in curve and curve.chosen.any():
        row = curve[curve.chosen].iloc[0]
        ax.plot([max(row.n_edges, 0.8)], [row.faithfulness], "*", color="#d62728", ms=12, label="chosen circuit")
    if target is not None:
        ax.axhline(target, color="#d62728", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (0 plotted at 0.8)")
    ax.set_ylabel("faithfulness (1 = clean, 0 = corrupted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def head_heatmap(table: pd.DataFrame, value: str, path: str, title: str, label: str) -> list[str]:
    """Layer x head heatmap of a per-head column, diverging around 0."""
    grid = table.pivot_table(index="layer", columns="head", values=value).astype(float)
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
    L, H = grid.shape
    fig = Figure(figsize=(max(4.5, 0.5 * H + 2.2), max(2.6, 0.3 * L + 1.3)))
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="RdBu_r", center=0, vmin=-(lim or 1), vmax=lim or 1,
                annot=L * H <= 100, fmt=".2g", annot_kws={"fontsize": 6.5}, cbar_kws={"label": label})
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
