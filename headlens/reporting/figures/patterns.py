"""Figures of head patterns and clusters (seaborn / matplotlib). Every function saves a PNG and
an SVG next to each other and returns their paths ``[png, svg]``.

``path`` is a file name without extension (``figs/heatmap`` -> ``figs/heatmap.png`` and
``figs/heatmap.svg``; a given ``.png``/``.svg`` suffix is dropped). Figures are built on
``matplotlib.figure.Figure`` objects (no global pyplot state, no GUI backend needed); the
seaborn clustermap goes through pyplot and is closed after saving.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from headlens.errors import check
from headlens.model.heads import head_label

UNIT_SCORES = {"score_previous_token", "score_next_token", "score_self", "score_first_token",
               "score_separator", "score_punctuation", "score_entropy_norm", "score_confidence",
               "score_duplicate_token", "score_induction", "score_local", "score_peak_offset"}


def save_figure(fig, path: str, dpi: int = 150) -> list[str]:
    """Save ``fig`` as ``path.png``, ``path.svg`` and ``path.pdf`` (for a paper); returns the three paths,
    the PNG first."""
    stem = os.fspath(path)
    for ext in (".png", ".svg", ".pdf"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    folder = os.path.dirname(stem)
    if folder:
        os.makedirs(folder, exist_ok=True)
    paths = [stem + ".png", stem + ".svg", stem + ".pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    for vector in paths[1:]:
        fig.savefig(vector, bbox_inches="tight")
    return paths


def head_names(labels: pd.DataFrame) -> list[str]:
    """``"L.H"`` for every row of a table with ``layer`` and ``head`` columns."""
    return [head_label(a, b) for a, b in zip(labels["layer"], labels["head"])]


def _cluster_colors(clusters: Sequence[int]) -> dict:
    ids = sorted(set(int(c) for c in clusters))
    palette = sns.color_palette("tab10" if len(ids) <= 10 else "husl", len(ids))
    return dict(zip(ids, palette))


def score_heatmap(scores: pd.DataFrame, column: str = "score_previous_token", path: str = "score_heatmap",
                  title: Optional[str] = None, annotate: Optional[bool] = None, cmap: str = "viridis") -> list[str]:
    """Layer x head heatmap of one score column of a per-head table (pruned heads stay blank)."""
    check(isinstance(scores, pd.DataFrame) and {"layer", "head"} <= set(scores.columns),
          "scores must be a DataFrame with layer and head columns")
    check(column in scores, f"column {column!r} is not in the table; have {list(scores.columns)}")
    grid = scores.pivot(index="layer", columns="head", values=column).astype(float)
    L, H = grid.shape
    annotate = (L * H <= 200) if annotate is None else annotate
    fig = Figure(figsize=(max(4.0, 0.55 * H + 2), max(2.5, 0.45 * L + 1.2)))
    ax = fig.add_subplot()
    unit = column in UNIT_SCORES
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=0 if unit else None, vmax=1 if unit else None,
                annot=annotate, fmt=".2f", annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white",
                cbar_kws={"label": column.replace("score_", "").replace("_", " ")})
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or column.replace("score_", "").replace("_", " ") + " score per head")
    return save_figure(fig, path)


def distance_clustermap(distance: np.ndarray, labels: pd.DataFrame, path: str = "distance_clustermap",
                        title: str = "Jensen-Shannon distance between heads", method: str = "complete") -> list[str]:
    """Clustered heatmap of the head x head distance matrix, rows and columns tagged by cluster;
    the dendrogram is scipy's ``method`` linkage (use the clusterer's to match its clusters)."""
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    distance = np.asarray(distance, dtype=float)
    N = len(labels)
    check(distance.shape == (N, N), f"distance must be [{N}, {N}] like labels, got {distance.shape}")
    names = head_names(labels)
    colors = _cluster_colors(labels["cluster"])
    row_colors = pd.Series([colors[int(c)] for c in labels["cluster"]], index=names, name="cluster")
    link = linkage(squareform(distance, checks=False), method=method)
    size = min(16.0, max(6.0, 0.16 * N + 3))
    grid = sns.clustermap(pd.DataFrame(distance, index=names, columns=names), row_linkage=link,
                          col_linkage=link, row_colors=row_colors, col_colors=row_colors, cmap="mako_r",
                          figsize=(size, size), xticklabels=True, yticklabels=True,
                          cbar_kws={"label": "mean JS divergence (bits)"}, dendrogram_ratio=0.12)
    fontsize = max(4, min(9, int(400 / max(N, 1))))
    grid.ax_heatmap.tick_params(labelsize=fontsize)
    for mesh in grid.ax_heatmap.collections:
        mesh.set_rasterized(True)  # an N x N mesh as one image in the SVG; labels stay text
    grid.figure.suptitle(title, y=1.01)
    try:
        return save_figure(grid.figure, path)
    finally:
        plt.close(grid.figure)


def embedding_scatter(embedding: np.ndarray, labels: pd.DataFrame, path: str = "head_embedding",
                      title: str = "Heads in 2-D (MDS of the JS distances)") -> list[str]:
    """The 2-D embedding of the heads, coloured by cluster, each point labelled ``L.H``."""
    embedding = np.asarray(embedding, dtype=float)
    check(embedding.shape == (len(labels), 2), f"embedding must be [{len(labels)}, 2], got {embedding.shape}")
    colors = _cluster_colors(labels["cluster"])
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    for c, color in colors.items():
        sel = (labels["cluster"] == c).to_numpy()
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=36, color=color, label=f"cluster {c}",
                   edgecolor="white", linewidth=0.5)
    for (x, y), name in zip(embedding, head_names(labels)):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points", alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return save_figure(fig, path)


def _token_labels(model, ids) -> list[str]:
    if model.tokenizer is None:
        return [str(int(i)) for i in ids]
    return [str(t) for t in model.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def pattern_gallery(model, text, heads: dict, path: str = "pattern_gallery", max_tokens: int = 32,
                    captions: Optional[dict] = None, columns: int = 4) -> list[str]:
    """Attention patterns of chosen heads on one real example, with token labels.

    ``text``: a string (or a token-id sequence); ``heads``: ``{group: [(layer, head), ...]}``
    (e.g. each cluster's most typical heads); ``captions``: ``{group: str}`` shown in titles.
    The example is cut to its first ``max_tokens`` tokens for legibility; at most ``columns``
    panels per row.
    """
    from headlens.patterns.capture import capture_patterns

    check(len(heads) > 0, "heads is empty: give {group: [(layer, head), ...]}")
    index = {lh: i for i, lh in enumerate(model.head_labels())}
    panels = [(g, tuple(lh)) for g, hs in heads.items() for lh in hs]
    for _, lh in panels:
        check(lh in index, f"head {lh} is not in the model (heads are {model.head_labels()[:3]}...)")
    pb = capture_patterns(model, [text] if isinstance(text, str) else [list(text)], batch_size=1)[0]
    T = min(int(pb.lengths[0]), max_tokens)
    tokens = _token_labels(model, pb.input_ids[0, :T])
    cols = min(columns, math.ceil(math.sqrt(len(panels))))
    rows = math.ceil(len(panels) / cols)
    side = max(3.2, 0.17 * T + 1.2)
    fig = Figure(figsize=(side * cols, side * rows + 0.4))
    for k, (group, (layer, head)) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        pattern = pb.patterns[0, index[(layer, head)], :T, :T].cpu().numpy()
        sns.heatmap(pattern, ax=ax, cmap="Blues", vmin=0, vmax=1, cbar=False, square=True,
                    xticklabels=tokens, yticklabels=tokens)
        ax.collections[0].set_rasterized(True)
        ax.tick_params(labelsize=6, length=0)
        caption = (captions or {}).get(group, "")
        ax.set_title(f"head {layer}.{head} (cluster {group})" + (f"\n{caption}" if caption else ""), fontsize=8)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.tight_layout(h_pad=2.0)
    return save_figure(fig, path)


def cluster_figures(model, clusterer, text, folder: str, score_columns: Sequence[str] = ("score_previous_token",),
                    heads_per_cluster: int = 1) -> dict:
    """All pattern/cluster figures of a fitted :class:`headlens.patterns.clusters.HeadClusterer` into
    ``folder``: ``{"heatmap_<column>": [...], "clustermap": [...], "embedding": [...], "gallery": [...]}``."""
    out = {}
    for column in score_columns:
        out[f"heatmap_{column}"] = score_heatmap(clusterer.scores_, column, os.path.join(folder, f"heatmap_{column}"))
    method = clusterer.linkage if clusterer.method == "agglomerative" else "average"
    out["clustermap"] = distance_clustermap(clusterer.distance_, clusterer.labels_,
                                            os.path.join(folder, "distance_clustermap"), method=method)
    if clusterer.embedding_ is not None:
        out["embedding"] = embedding_scatter(clusterer.embedding_, clusterer.labels_,
                                             os.path.join(folder, "head_embedding"))
    clusters = sorted(set(clusterer.labels_["cluster"]))
    heads = {c: clusterer.typical_heads(c, heads_per_cluster) for c in clusters}
    sizes = clusterer.labels_["cluster"].value_counts()
    roles = clusterer.scores_.set_index(["layer", "head"])["role"] if "role" in clusterer.scores_ else None
    captions = {c: (f"{roles[heads[c][0]]}; " if roles is not None else "")
                + f"{sizes[c]} head{'s' if sizes[c] != 1 else ''} in cluster" for c in clusters}
    out["gallery"] = pattern_gallery(model, text, heads, os.path.join(folder, "pattern_gallery"), captions=captions)
    return out
