"""``headlens scores``: every head's pattern scores, role, pattern class and cluster."""
from __future__ import annotations

import time

from headlens.cli.options import add_shared

DISTRIBUTED = True  # shares its work over the ranks of a torchrun job (see headlens.cli.app)
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
    add_shared(parser, "--truncate")


def run(args) -> int:
    from headlens.cli.outputs import results_folder
    from headlens.errors import HeadlensError

    if args.figures and not args.out:
        raise HeadlensError("--figures needs --out FOLDER")
    if not args.out:
        return _run(args, None)
    with results_folder(args.out, ["scores.csv", "cluster_table.csv"]) as out:  # checked before the analysis
        return _run(args, out)


def _read_texts(args, model):
    """The texts (``--text`` or the bundled sentences, the first ``--n``), read lazily; without
    ``--truncate``, a text longer than the model's context stops the command naming its line."""
    from headlens.data.corpora import SENTENCES_PATH
    from headlens.data.streams import open_texts
    from headlens.errors import HeadlensError
    from headlens.model.tokens import text_lengths

    path = args.text or SENTENCES_PATH
    texts = open_texts(path, field=args.field, limit=args.n or (None if args.text else 200))
    if args.truncate or model.tokenizer is None:
        return texts
    from itertools import islice

    n_ctx, items, start = model.cfg.n_ctx, iter(texts), 0
    while block := list(islice(items, 1024)):  # one pass, a chunk of texts at a time: memory stays flat
        long = [i for i, n in enumerate(text_lengths(model, block)) if n > n_ctx]
        if long:
            i = start + long[0]
            raise HeadlensError(f"text file {str(path)!r}, {texts.where(i)} is {text_lengths(model, [texts[i]])[0]} "
                                f"tokens long, more than the model's context of {n_ctx} tokens; pass --truncate "
                                "to cut long texts")
        start += len(block)
    return texts


def _run(args, out) -> int:
    import pandas as pd

    from headlens.io.loading import load
    from headlens.patterns.roles import assign_roles
    from headlens.patterns.scores import pattern_scores

    start = time.perf_counter()
    model = load(args.model)
    texts = _read_texts(args, model)
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
    if out is not None:  # rank 0 writes
        out.write("scores.csv", scores.to_csv(index=False).encode(), NAME)
        if clusterer is not None:
            out.write("cluster_table.csv", clusterer.table_.to_csv(index=False).encode(), NAME)
            if args.figures:
                _write_figures(model, clusterer, texts[0], out)
        print(f"\nwrote {args.out}")
    print(f"{len(texts)} texts, {len(scores)} heads, {time.perf_counter() - start:.1f} s")
    return 0


def _write_figures(model, clusterer, text, out) -> None:
    """Draw the figures in a temporary folder, then put each into ``out`` where headlens may write."""
    import tempfile
    from pathlib import Path

    from headlens.reporting.figures.patterns import cluster_figures

    with tempfile.TemporaryDirectory() as tmp:
        cluster_figures(model, clusterer, text, tmp,
                        score_columns=("score_previous_token", "score_first_token", "score_entropy_norm"))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        out.check_free([p.relative_to(tmp) for p in files])
        for p in files:
            out.write(p.relative_to(tmp).as_posix(), p.read_bytes(), NAME)
