"""Which heads behave alike: Clark et al.'s (2019) Jensen-Shannon distance between heads'
attention distributions, clustering, a 2-D map and a table that says what each cluster does.

Shapes: ``N`` heads (layer-major, :meth:`HeadlensModel.head_labels` order), ``R`` real query
rows of a batch, ``S`` keys, ``B`` batch.

Distance: every attention row is smoothed over its visible keys, ``A' = (1 - eps) A + eps / n``
(``n`` visible keys), and ``distance[h, g]`` is the Jensen-Shannon divergence (base 2, in
[0, 1]) between ``A'_h[i, :]`` and ``A'_g[i, :]`` averaged over every real query row of the
dataset (Clark et al. sum it; the mean does not grow with the data). Streamed in batches.

Stability: one pass also keeps ``n_bootstrap`` Poisson-bootstrap replicates (each example gets a
Poisson(1) weight per replicate) of the distances and scores; each replicate is clustered with
the same number of clusters, and ``stability_`` reports the adjusted Rand index against the fit;
per cluster, ``table_["stability"]`` is the mean over replicates of its best Jaccard overlap with
a replicate's cluster (Hennig 2007: >= 0.75 stable, < 0.5 dissolved).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

from headlens.errors import check
from headlens.model.heads import head_label
from headlens.patterns.capture import HeadStatsAccumulator, PatternBatch, stream_head_stats
from headlens.patterns.roles import assign_roles
from headlens.patterns.scores import PROBE_COLUMNS, SCORE_COLUMNS, probe_means, scores_table, text_statistics

METHODS = ("agglomerative", "kmeans", "gmm")
EMBEDDINGS = ("mds", "tsne", None)
LINKAGES = ("complete", "average", "single")
SILHOUETTE_TIE = 1e-3
BEHAVIOURS = [  # (score column, what a high value means), for the cluster descriptions
    ("score_previous_token", "attend to the previous token"),
    ("score_next_token", "attend to the next token"),
    ("score_self", "attend to their own token"),
    ("score_first_token", "attend to the first token ([CLS]/BOS)"),
    ("score_separator", "attend to [SEP]/EOS"),
    ("score_punctuation", "attend to punctuation"),
    ("score_induction", "do induction (token after an earlier copy)"),
    ("score_duplicate_token", "attend to earlier copies of their token"),
]


def js_statistics(eps: float = 1e-3, pair_budget: int = 2 ** 20):
    """Statistic (see :func:`headlens.patterns.capture.stream_head_stats`): per example, the JS divergence
    between every pair of heads summed over its real query rows, ``{"js": (totals [B, N, N],
    counts [B])}``. Vectorised over blocks of head pairs, query rows and keys; a block holds at
    most ``pair_budget`` floats (4 MB in float32)."""
    check(0 < eps < 1, f"eps must be in (0, 1), got {eps}")

    def statistics(pb: PatternBatch) -> dict:
        A, real = pb.patterns, pb.query_mask
        B, N, P, S = A.shape
        visible = pb.head_visible()  # [B, 1 or N, P, S]
        n_visible = visible.sum(-1, keepdim=True).clamp(min=1)
        smooth = (1 - eps) * A + eps / n_visible * visible  # [B, N, P, S]
        rows = smooth.permute(1, 0, 2, 3)[:, real]  # [N, R, S]
        example = torch.arange(B, device=A.device)[:, None].expand(B, P)[real]  # [R]
        entropy = torch.special.entr(rows).sum(-1)  # [N, R]
        # invisible keys get 1/2 in every head: there s = p + q = 1 and s log s = 0
        rows = rows + 0.5 * (~visible.permute(1, 0, 2, 3)[:, real]).to(rows.dtype)
        half_entropy = 0.5 * entropy
        R, S = rows.shape[1:]
        size = max(1, min(N, math.isqrt(max(1, pair_budget // max(1, R * S)))))  # heads per block
        totals = A.new_zeros(B, N, N)
        for lo in range(0, N, size):  # blocks of heads [lo, lo + size) x [lo2, lo2 + size), lo <= lo2
            p, hp = rows[lo: lo + size], half_entropy[lo: lo + size]
            for lo2 in range(lo, N, size):
                q, hq = rows[lo2: lo2 + size], half_entropy[lo2: lo2 + size]
                s = p[:, None] + q[None]  # p + q, [b, b2, R, S]
                s_log_s = torch.log(s).mul_(s).sum(-1)  # [b, b2, R]
                # JS = H(m) - (H(p) + H(q)) / 2 with H(m) = log 2 - sum(s log s) / 2, in bits
                js = (math.log(2) - 0.5 * s_log_s - hp[:, None] - hq[None]) / math.log(2)
                per_example = js.new_zeros(*js.shape[:2], B).index_add_(2, example, js)  # [b, b2, B]
                totals[:, lo: lo + size, lo2: lo2 + size] = per_example.permute(2, 0, 1)
        totals = totals.triu(1)  # each pair once (diagonal blocks computed both ways)
        totals = totals + totals.transpose(1, 2)
        return {"js": (totals, real.sum(-1))}

    return statistics


def js_distance(model, data, batch_size: int = 16, eps: float = 1e-3, **kwargs) -> np.ndarray:
    """``[N, N]`` mean Jensen-Shannon divergence between heads' attention rows over ``data``."""
    acc = stream_head_stats(model, data, {"js": js_statistics(eps)}, batch_size, **kwargs)
    return _clean_distance(acc.mean("js"))


def _clean_distance(d: torch.Tensor) -> np.ndarray:
    d = d.numpy().astype(float)
    d = np.clip((d + d.T) / 2, 0, 1)
    np.fill_diagonal(d, 0)
    return d


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters by their first head in layer-major order (0, 1, 2 ...)."""
    order = {}
    for c in labels:
        order.setdefault(int(c), len(order))
    return np.array([order[int(c)] for c in labels])


def _layers_phrase(layers: np.ndarray) -> str:
    lo, hi = int(layers.min()), int(layers.max())
    if lo == hi:
        return f"all in layer {lo}"
    counts = np.bincount(layers)
    if counts.max() * 2 > len(layers):
        return f"layers {lo}-{hi} (mostly {int(counts.argmax())})"
    return f"layers {lo}-{hi}"


def describe_cluster(members: pd.DataFrame, threshold: float = 0.3) -> str:
    """One line on what the heads of ``members`` (rows of a scores table) do, e.g.
    ``"5 heads, layers 0-1 (mostly 0): attend to the previous token (0.82); normalised entropy 0.12"``."""
    n = len(members)
    head = f"{n} head{'s' if n != 1 else ''}, {_layers_phrase(members['layer'].to_numpy())}"
    means = {c: float(members[c].mean()) for c, _ in BEHAVIOURS if c in members and members[c].notna().any()}
    ranked = sorted(((v, c) for c, v in means.items()), reverse=True)
    text = dict(BEHAVIOURS)
    if ranked and ranked[0][0] >= threshold:
        what = f"{text[ranked[0][1]]} ({ranked[0][0]:.2f})"
        if len(ranked) > 1 and ranked[1][0] >= threshold:
            what += f" and {text[ranked[1][1]].replace('attend to ', '')} ({ranked[1][0]:.2f})"
        if "score_entropy_norm" in members:
            what += f"; normalised entropy {members['score_entropy_norm'].mean():.2f}"
    elif "score_entropy_norm" in members and members["score_entropy_norm"].mean() >= 0.75:
        what = f"attend broadly (normalised entropy {members['score_entropy_norm'].mean():.2f})"
    elif "score_local" in members and members["score_local"].mean() >= 0.6:
        what = f"attend locally, within a few tokens ({members['score_local'].mean():.2f})"
    else:
        top = ", ".join(f"{text[c].replace('attend to ', '')} ({v:.2f})" for v, c in ranked[:2])
        what = f"mixed; most mass on {top}" if top else "mixed"
    return f"{head}: {what}"


class HeadClusterer:
    """Cluster heads by their attention patterns (scikit-learn style).

    ``method``: ``"agglomerative"`` (``linkage`` on the JS distance matrix), ``"kmeans"`` or
    ``"gmm"`` (on the standardized score vectors). ``n_clusters=None`` picks the number in
    ``[2, max_clusters]`` with the best silhouette. ``embedding``: ``"mds"`` (metric MDS on the
    distances), ``"tsne"`` or None. ``truncate``: cut texts longer than the context. Everything
    is deterministic under ``seed``.

    After :meth:`fit`: ``labels_`` (DataFrame ``layer, head, cluster``), ``table_`` (one row per
    cluster: ``cluster, size, members, medoid, description, mean_score_*``), ``distance_``
    (``[N, N]``), ``embedding_`` (``[N, 2]``), ``stability_`` (dict: ``ari_mean, ari_std, ari_min,
    ari, n_empty``), ``scores_`` (the scores table with roles), ``silhouettes_`` (``{k: silhouette}``),
    ``n_clusters_``, ``medoids_`` (``{cluster: (layer, head)}``).
    """

    def __init__(self, n_clusters: Optional[int] = None, method: str = "agglomerative",
                 embedding: Optional[str] = "mds", n_bootstrap: int = 10, seed: int = 0,
                 max_clusters: int = 10, linkage: str = "complete", eps: float = 1e-3,
                 batch_size: int = 16, induction: bool = True, truncate: bool = False,
                 progress: bool = False):
        self.n_clusters = n_clusters
        self.method = method
        self.embedding = embedding
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.max_clusters = max_clusters
        self.linkage = linkage
        self.eps = eps
        self.batch_size = batch_size
        self.induction = induction
        self.truncate = truncate
        self.progress = progress

    # --- fitting ---------------------------------------------------------------------------
    def _check_params(self, n_heads: int) -> None:
        check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        check(self.embedding in EMBEDDINGS, f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        check(self.n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {self.n_bootstrap}")
        check(n_heads >= 3, f"clustering needs at least 3 heads, the model has {n_heads}")
        if self.n_clusters is not None:
            check(isinstance(self.n_clusters, (int, np.integer)) and 1 <= self.n_clusters <= n_heads,
                  f"n_clusters must be an int in [1, {n_heads}], got {self.n_clusters!r}")
        check(self.max_clusters >= 2, f"max_clusters must be >= 2, got {self.max_clusters}")
        check(self.linkage in LINKAGES, f"linkage must be one of {LINKAGES}, got {self.linkage!r}")

    def _features(self, scores: pd.DataFrame) -> np.ndarray:
        columns = [c for c in SCORE_COLUMNS if c in scores and np.isfinite(scores[c].to_numpy(dtype=float)).all()]
        check(columns, "the scores table has no complete score column to cluster on")
        return StandardScaler().fit_transform(scores[columns].to_numpy(dtype=float))

    def _cluster(self, k: int, distance: np.ndarray, features: Optional[np.ndarray]) -> np.ndarray:
        if k == 1:
            return np.zeros(len(distance), dtype=int)
        if self.method == "agglomerative":
            model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=self.linkage)
            return _relabel(model.fit_predict(distance))
        with warnings.catch_warnings():  # identical heads: fewer distinct points than k is fine
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.method == "kmeans":
                return _relabel(KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit_predict(features))
            gmm = GaussianMixture(n_components=k, covariance_type="diag", random_state=self.seed, reg_covar=1e-3)
            return _relabel(gmm.fit(features).predict(features))

    def _silhouette(self, labels: np.ndarray, distance: np.ndarray, features, singletons: bool) -> Optional[float]:
        """Mean silhouette; unless ``singletons``, over the heads of clusters with >= 2 members
        only (None when fewer than two such clusters)."""
        keep = np.ones(len(labels), dtype=bool) if singletons else np.bincount(labels)[labels] >= 2
        if len(set(labels[keep])) < 2 or len(set(labels[keep])) >= keep.sum():
            return None
        if self.method == "agglomerative":
            return float(silhouette_score(distance[np.ix_(keep, keep)], labels[keep], metric="precomputed"))
        return float(silhouette_score(features[keep], labels[keep]))

    def _choose(self, distance: np.ndarray, features) -> tuple:
        """``(k, labels, {k: silhouette})``. A head far from all others makes any split that
        isolates it look perfect to the silhouette, so singleton clusters are left out of the
        score (they still count as clusters); if every candidate has fewer than two clusters
        with >= 2 heads, the plain silhouette decides. Silhouettes within ``SILHOUETTE_TIE`` of
        the best count as ties, won by the smallest number of clusters."""
        if self.n_clusters is not None:
            labels = self._cluster(int(self.n_clusters), distance, features)
            return int(self.n_clusters), labels, {}
        ks = range(2, min(self.max_clusters, len(distance) - 1) + 1)
        candidates = {k: self._cluster(k, distance, features) for k in ks}
        for singletons in (False, True):
            silhouettes = {k: self._silhouette(lab, distance, features, singletons) for k, lab in candidates.items()}
            silhouettes = {k: v for k, v in silhouettes.items() if v is not None}
            if silhouettes:
                top = max(silhouettes.values())
                best = min(k for k, v in silhouettes.items() if v >= top - SILHOUETTE_TIE)
                return best, candidates[best], silhouettes
        return 2, candidates[2], {}

    def fit(self, model, data, scores: Optional[pd.DataFrame] = None) -> "HeadClusterer":
        """Stream ``data`` (texts or token ids) once through ``model`` and cluster its heads.
        ``scores``: a :func:`headlens.patterns.scores.pattern_scores` table to describe (and, for k-means /
        GMM, cluster) the heads with; computed in the same pass when None (its induction and
        duplicate-token columns then also serve the bootstrap replicates)."""
        heads = model.head_labels()
        self._check_params(len(heads))
        # the text scores serve the scores table (when not given) and the k-means / GMM replicates
        stats = {"js": js_statistics(self.eps)}
        if scores is None or self.method != "agglomerative":
            stats["text"] = text_statistics(model)
        needed = {"js"} if self.method == "agglomerative" else None  # statistics the bootstrap uses
        acc = HeadStatsAccumulator(self.n_bootstrap, self.seed, replicate_names=needed)
        stream_head_stats(model, data, stats, self.batch_size, accumulator=acc, progress=self.progress,
                          truncate=self.truncate)
        if scores is None:
            probe = probe_means(model, seed=self.seed, batch_size=self.batch_size) if self.induction else {}
            scores = scores_table(model, {**acc.means(), **probe})
        else:
            check(isinstance(scores, pd.DataFrame) and "layer" in scores and "head" in scores,
                  "scores must be a DataFrame with layer and head columns (pattern_scores)")
            scores = scores.sort_values(["layer", "head"], ignore_index=True)
            got = list(zip(scores["layer"].astype(int), scores["head"].astype(int)))
            check(got == heads, "scores has other heads than the model (one row per model.head_labels())")
            probe = {c: scores[c].to_numpy() for c in PROBE_COLUMNS if c in scores}
        self.scores_ = assign_roles(scores) if "role" not in scores else scores.copy()
        self.distance_ = _clean_distance(acc.mean("js"))
        features = self._features(self.scores_) if self.method != "agglomerative" else None
        self.n_clusters_, labels, self.silhouettes_ = self._choose(self.distance_, features)
        self.labels_ = pd.DataFrame(heads, columns=["layer", "head"]).assign(cluster=labels)
        self.medoids_ = {int(c): self.typical_heads(int(c))[0] for c in sorted(set(labels))}
        self.embedding_ = self._embed(self.distance_)
        self.table_ = self._table(labels)
        self.stability_ = self._stability(model, acc, probe, labels)
        per = self.stability_.get("cluster_jaccard") or [float("nan")] * len(self.table_)
        self.table_["stability"] = per  # mean best-match Jaccard over the bootstrap resamples (Hennig 2007)
        return self

    # --- results ---------------------------------------------------------------------------
    def typical_heads(self, cluster: int, n: int = 1) -> list:
        """The ``n`` heads of ``cluster`` closest (summed distance) to its other members."""
        labels = self.labels_["cluster"].to_numpy()
        check(cluster in set(labels.tolist()), f"no cluster {cluster}; clusters are {sorted(set(labels.tolist()))}")
        idx = np.flatnonzero(labels == cluster)
        order = idx[np.argsort(self.distance_[np.ix_(idx, idx)].sum(1), kind="stable")]
        return [(int(self.labels_["layer"][i]), int(self.labels_["head"][i])) for i in order[:n]]

    def _embed(self, distance: np.ndarray) -> Optional[np.ndarray]:
        if self.embedding is None:
            return None
        if self.embedding == "mds":
            from sklearn.manifold import MDS

            mds = MDS(n_components=2, metric="precomputed", init="classical_mds", random_state=self.seed,
                      normalized_stress="auto")
            return mds.fit_transform(distance)
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(distance) - 1) / 3)))
        method = "exact" if len(distance) <= 500 else "barnes_hut"  # exact is fast for few heads
        return TSNE(n_components=2, metric="precomputed", init="random", perplexity=perplexity,
                    method=method, random_state=self.seed).fit_transform(distance)

    def _table(self, labels: np.ndarray) -> pd.DataFrame:
        rows = []
        score_cols = [c for c in SCORE_COLUMNS if c in self.scores_]
        for c in sorted(set(labels)):
            members = self.scores_[labels == c]
            row = {
                "cluster": int(c), "size": len(members),
                "members": ", ".join(head_label(a, b) for a, b in zip(members["layer"], members["head"])),
                "medoid": head_label(*self.medoids_[int(c)]),
                "description": describe_cluster(members),
            }
            if "role" in members:
                counts = members["role"].value_counts()
                row["roles"] = ", ".join(f"{r} x{n}" for r, n in counts.items())
            row.update({f"mean_{col}": float(members[col].mean()) for col in score_cols})
            rows.append(row)
        return pd.DataFrame(rows)

    def _stability(self, model, acc, probe: dict, labels: np.ndarray) -> dict:
        if self.n_bootstrap == 0:
            return {"n_bootstrap": 0, "ari_mean": float("nan"), "ari_std": float("nan"),
                    "ari_min": float("nan"), "ari": []}
        js = acc.replicate_means("js")
        if self.method != "agglomerative":
            names = [n for n in acc.rep_totals if n != "js"]
            reps = {n: acc.replicate_means(n) for n in names}
        aris, empty, jaccard = [], 0, []
        for r in range(self.n_bootstrap):
            distance = _clean_distance(js[r])
            if np.isnan(distance).any():  # the resample drew no example (likely with very few texts)
                empty += 1
                continue
            features = None
            if self.method != "agglomerative":
                rep_scores = scores_table(model, {**{n: v[r] for n, v in reps.items()}, **probe})
                features = self._features(rep_scores)
            rep_labels = self._cluster(self.n_clusters_, distance, features)
            aris.append(float(adjusted_rand_score(labels, rep_labels)))
            jaccard.append([max(_jaccard(labels == c, rep_labels == r) for r in set(rep_labels))
                            for c in sorted(set(labels))])
        nan = float("nan")
        return {"n_bootstrap": self.n_bootstrap, "ari_mean": float(np.mean(aris)) if aris else nan,
                "ari_std": float(np.std(aris)) if aris else nan, "ari_min": float(np.min(aris)) if aris else nan,
                "ari": aris, "n_empty": empty,
                "cluster_jaccard": np.mean(jaccard, axis=0).tolist() if jaccard else [],
                "resampling": "Poisson bootstrap over examples, same number of clusters; resamples that "
                              "drew no example (n_empty) are skipped"}

    def fit_predict(self, model, data, scores=None) -> pd.DataFrame:
        return self.fit(model, data, scores).labels_

    def __repr__(self) -> str:
        return (f"HeadClusterer(n_clusters={self.n_clusters}, method={self.method!r}, "
                f"embedding={self.embedding!r}, n_bootstrap={self.n_bootstrap}, seed={self.seed})")

