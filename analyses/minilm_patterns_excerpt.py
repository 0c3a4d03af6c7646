"""MiniLM's head patterns on the bundled sentences: the docs excerpt and the timing of the issue's
performance bar (scores + roles + clusters + figures in under a minute on a 2-core CPU).

    python analyses/minilm_patterns_excerpt.py            # writes docs/patterns.md, docs/img/*.png
    python analyses/minilm_patterns_excerpt.py --no-docs --threads 2     # timing only

Everything in the page is computed here; rerunning rewrites it (same tables and figures under
seed 0; the timings are those of the run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from common import ROOT, markdown

SHORT = {"score_previous_token": "prev", "score_next_token": "next", "score_self": "self",
         "score_first_token": "first", "score_separator": "sep", "score_punctuation": "punct",
         "score_distance": "dist", "score_entropy_norm": "entropy_norm", "score_confidence": "confidence",
         "score_induction": "induction", "score_duplicate_token": "duplicate"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of bundled sentences")
    parser.add_argument("--out", default=None, help="folder for every figure (default: a temporary folder)")
    parser.add_argument("--no-docs", action="store_true", help="only time the run; do not rewrite docs/")
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated torch thread counts to time the run with (one run each)")
    args = parser.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="headlens-patterns-")

    import torch

    import headlens
    from headlens.data.corpora import bundled_sentences
    from headlens.patterns.clusters import HeadClusterer
    from headlens.reporting.figures.patterns import cluster_figures

    texts = bundled_sentences(args.n)
    timings = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load_avg = os.getloadavg()[0]
        cpu0, t0 = time.process_time(), time.perf_counter()
        model = headlens.load("minilm")
        t1 = time.perf_counter()
        clusterer = HeadClusterer(seed=0).fit(model, texts)  # scores, roles, distances, clusters, bootstrap
        t2 = time.perf_counter()
        figures = cluster_figures(model, clusterer, texts[5], args.out,
                                  score_columns=("score_previous_token", "score_first_token", "score_entropy_norm"))
        t3 = time.perf_counter()
        timings.append(
            f"{threads} torch thread{'s' if threads > 1 else ''}: scores + roles + clusters {t2 - t1:.1f} s, "
            f"figures {t3 - t2:.1f} s, total {t3 - t1:.1f} s (model load {t1 - t0:.1f} s; process CPU "
            f"time {time.process_time() - cpu0:.1f} s); load average {load_avg:.1f} at start")
        print(timings[-1])
    if args.no_docs:
        return 0

    scores = clusterer.scores_.merge(clusterer.labels_, on=["layer", "head"])
    shown = ["layer", "head", "role", "pattern_class", "cluster", *SHORT]
    excerpt = scores[shown].rename(columns=SHORT).head(12)
    table = clusterer.table_[["cluster", "size", "medoid", "members", "description"]]
    table = table.assign(members=[m if len(m) <= 60 else m[:57] + "..." for m in table["members"]])
    roles = scores["role"].value_counts()
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    shutil.copy(figures["gallery"][0], img / "minilm_pattern_gallery.png")
    shutil.copy(figures["embedding"][0], img / "minilm_head_embedding.png")
    st = clusterer.stability_
    page = f"""# Head patterns: MiniLM on the bundled sentences

Produced by `python analyses/minilm_patterns_excerpt.py` (seed 0): `headlens.load("minilm")`
(all-MiniLM-L6-v2, 6 layers x 12 heads) on the first {len(texts)} bundled English sentences
(`headlens/data/text/sentences.txt`). The same run from the command line:
`headlens scores --model minilm --n {len(texts)} --out reports/minilm_patterns --figures`.

```python
import headlens
from headlens.data.corpora import bundled_sentences
from headlens.patterns.clusters import HeadClusterer

model = headlens.load("minilm")
fit = HeadClusterer(seed=0).fit(model, bundled_sentences({len(texts)}))
fit.scores_   # one row per head: scores, role, pattern_class
fit.table_    # one row per cluster, with a description
```

## Scores, roles and clusters (layer 0)

Scores are means over real (non-padding) query positions (Clark et al. 2019); `induction` and
`duplicate` come from repeated random tokens (Olsson et al. 2022). Column names shortened:
`prev` = `score_previous_token`, and so on.

{markdown(excerpt, 2)}

Roles over all {len(scores)} heads: {", ".join(f"{r} {n}" for r, n in roles.items())}.

## Clusters (Jensen-Shannon distance between attention patterns, complete linkage)

{clusterer.n_clusters_} clusters chosen by silhouette. Stability over {st['n_bootstrap']} bootstrap
resamples of the sentences: adjusted Rand index {st['ari_mean']:.2f} +- {st['ari_std']:.2f}
(min {st['ari_min']:.2f}).

{markdown(table, 2)}

Each cluster's most typical head (closest to the rest of its cluster) on one sentence:

![MiniLM pattern gallery](img/minilm_pattern_gallery.png)

The heads in two dimensions (metric MDS on the distances), coloured by cluster:

![MiniLM head embedding](img/minilm_head_embedding.png)

## Timing

{len(texts)} sentences, {len(clusterer.labels_)} heads, {clusterer.n_bootstrap} bootstrap resamples,
on this machine's {os.cpu_count()} CPU cores:

{chr(10).join("- " + t for t in timings)}

Other processes shared the cores during these runs (the load average says how much). Under
such contention two torch threads spend most of their time waiting for each other: there
`torch.set_num_threads(1)` is the faster setting.
"""
    (ROOT / "docs" / "patterns.md").write_text(page, encoding="utf-8")
    print(f"wrote {ROOT / 'docs' / 'patterns.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
