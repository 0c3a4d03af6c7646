"""``headlens scores``: every head's pattern scores, role, pattern class and cluster."""
from __future__ import annotations

import time

from headlens.cli.options import add_shared

NAME = "scores"
HELP = "pattern scores, roles and clusters of every head on a text file"
DESCRIPTION = ("Run a model over texts (default: the bundled English sentences) and print one row "
               "per head: Clark et al. pattern scores, induction and duplicate-token scores, a role "
               "and a Kovaleva et al. pattern class; then cluster the heads by the Jensen-Shannon "
               "distance between their attention patterns. Writes CSV files (and figures) with --out.")


def add_arguments(parser) -> None:
    add_shared(parser, "--model")
    parser.add_argument("--text", default=None,
                        help="texts: a text file (one per line), a JSONL or Parquet file or a saved datasets folder "
                             "(field --field), read lazily, of any size (default: the bundled sentences)")
    parser.add_argument("--field", default="text", help="the field of JSONL / Parquet / datasets records to read")
    parser.add_argument("--n", type=int, default=None,
                        help="use the first N texts (default: all of --text, 200 of the bundled sentences)")
    add_shared(parser, "--batch-size", "--seed")
    parser.add_argument("--no-clusters", action="store_true", help="scores and roles only")
    parser.add_argument("--n-clusters", type=int, default=None, help="default: chosen by silhouette")
    parser.add_argument("--method", default="agglomerative", choices=["agglomerative", "kmeans", "gmm"],
                        help="clustering: agglomerative on JS distances, or k-means / GMM on scores")
    parser.add_argument("--n-bootstrap", type=int, default=10, help="bootstrap resamples for cluster stability")
    parser.add_argument("--out", default=None, help="folder for scores.csv (one row per head) and cluster_table.csv")
    parser.add_argument("--figures", action="store_true", help="also write figures (PNG + SVG) into --out")
    parser.add_argument("--truncate", action="store_true", help="cut texts longer than the model's context")


def run(args) -> int:
    import pandas as pd

    from headlens.data.corpora import SENTENCES_PATH
    from headlens.data.streams import open_texts
    from headlens.errors import HeadlensError
    from headlens.io.loading import load
    from headlens.patterns.roles import assign_roles
    from headlens.patterns.scores import pattern_scores
    from headlens.runtime import current_world

    if args.figures and not args.out:
        raise HeadlensError("--figures needs --out FOLDER")
    if args.out:
        from headlens.files import writable_folder

        out = writable_folder(args.out)  # fail before the analysis, not after it
    start = time.perf_counter()
    model = load(args.model)
    texts = open_texts(args.text or SENTENCES_PATH, field=args.field, limit=args.n or (None if args.text else 200))
    kwargs = {"truncate": True} if args.truncate else {}
    if args.no_clusters:
        scores = assign_roles(pattern_scores(model, texts, args.batch_size, seed=args.seed, **kwargs))
        clusterer = None
    else:
        from headlens.patterns.clusters import HeadClusterer

        clusterer = HeadClusterer(n_clusters=args.n_clusters, method=args.method, n_bootstrap=args.n_bootstrap,
                                  seed=args.seed, batch_size=args.batch_size, truncate=args.truncate)
        clusterer.fit(model, texts)
        scores = clusterer.scores_.merge(clusterer.labels_, on=["layer", "head"])
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 500):
        shown = [c for c in scores.columns if c not in ("score_entropy", "score_peak_offset")]
        print(scores[shown].round(3).to_string(index=False))
        if clusterer is not None:
            print()
            print(clusterer.table_[["cluster", "size", "medoid", "description"]].to_string(index=False))
            st = clusterer.stability_
            print(f"\ncluster stability over {st['n_bootstrap']} bootstrap resamples: "
                  f"ARI {st['ari_mean']:.2f} +- {st['ari_std']:.2f} (min {st['ari_min']:.2f})")
    if args.out and current_world().is_main:
        scores.to_csv(out / "scores.csv", index=False)
        if clusterer is not None:
            clusterer.table_.to_csv(out / "cluster_table.csv", index=False)
            if args.figures:
                from headlens.reporting.figures.patterns import cluster_figures

                cluster_figures(model, clusterer, texts[0], str(out),
                                score_columns=("score_previous_token", "score_first_token", "score_entropy_norm"))
        print(f"\nwrote {args.out}")
    print(f"{len(texts)} texts, {len(scores)} heads, {time.perf_counter() - start:.1f} s")
    return 0
