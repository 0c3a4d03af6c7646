"""Does headlens recover heads whose roles are known? A study on the shipped toy models.

    python analyses/induction_toy.py                       # writes reports/induction-toy/
    python analyses/induction_toy.py --out /tmp/toy-study

Models (headlens/data/models, trained by ``headlens train-toy``): toy-induction-2l (2 layers x 4
heads, attention only), its 1-layer control toy-induction-1l, and toy-first-token. On fresh data
(seeds below, not the cards' evaluation seed) the study measures the loss on the first and the
repeated half of [BOS, x, x]; runs pattern_scores + assign_roles; zero-ablates every head alone
and some groups on the repeated-half loss (ablation_sweep / ablate, bootstrap CIs); clusters the
heads (HeadClusterer, JS distance). It writes report.md, CSV tables and PNG/SVG figures and ends
with the list of recovery checks (the same claims tests/test_recovery.py asserts). Under 2 min.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import REPORTS, markdown, slim

SEED = 2024  # data of this study
SHOWN = ["layer", "head", "score_previous_token", "score_first_token", "score_self", "score_induction",
         "score_duplicate_token", "score_entropy_norm", "role", "pattern_class"]


def loss_by_position(models: dict, tokens, half_len: int, path: Path) -> list[str]:
    """Figure: mean next-token loss at each position of [BOS, x, x], one line per model."""
    import torch
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    from headlens.reporting.figures.patterns import save_figure

    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    with torch.no_grad():
        for name, model in models.items():
            logits = model(tokens)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
            ax.plot(range(2, tokens.shape[1] + 1), nll.numpy(), label=name)
    ax.axvline(half_len + 1.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("position of the predicted token ([BOS] = 1)")
    ax.set_ylabel("loss (nats)")
    ax.set_title("Next-token loss on [BOS, x, x]: the second copy is predictable only by induction")
    ax.legend(frameon=False)
    return save_figure(fig, path)


def damage_bars(sweep, groups, path: Path) -> list[str]:
    """Figure: repeated-half loss increase when one head (or a group) is zero-ablated, with CIs."""
    import numpy as np
    from matplotlib.figure import Figure

    from headlens.reporting.figures.patterns import save_figure

    names = [f"{l}.{h}" for l, h in zip(sweep["layer"], sweep["head"])] + list(groups)
    values = np.r_[sweep["damage"].to_numpy(), [g["damage"] for g in groups.values()]]
    low = np.r_[sweep["importance_ci_low"].to_numpy(), [g["low"] for g in groups.values()]]
    high = np.r_[sweep["importance_ci_high"].to_numpy(), [g["high"] for g in groups.values()]]
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    colors = ["#4c72b0" if n.startswith("0.") else "#dd8452" if n.startswith("1.") else "#55a868" for n in names]
    ax.bar(names, values, color=colors, yerr=[values - low, high - values], capsize=3)
    ax.set_ylabel("damage (repeated-half loss, nats)")
    ax.set_title("Zero ablation: layer-0 heads (blue), layer-1 heads (orange), groups (green)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPORTS / "induction-toy"), help="report folder")
    parser.add_argument("--n", type=int, default=128, help="sequences per data set")
    parser.add_argument("--svg", action="store_true", help="keep the SVG copies of the figures")
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch

    import headlens
    from headlens.data import MODELS_DIR
    from headlens.importance.ablation import ablate
    from headlens.importance.sweep import ablation_sweep
    from headlens.importance.tasks import RepeatedHalfTask
    from headlens.io.native import read_card
    from headlens.patterns.clusters import HeadClusterer
    from headlens.patterns.roles import assign_roles
    from headlens.patterns.scores import pattern_scores
    from headlens.reporting.figures.patterns import embedding_scatter, pattern_gallery, score_heatmap
    from headlens.synthetic import toys as toy

    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = ["toy-induction-2l", "toy-induction-1l", "toy-first-token"]
    models = {name: headlens.load(name) for name in names}
    two = models["toy-induction-2l"]

    # 1. losses on the two halves
    tokens, T = toy.eval_tokens(two, n_seqs=args.n, seed=SEED)
    losses = pd.DataFrame([dict(model=n, **toy.repeat_losses(models[n], tokens, T)) for n in names[:2]])
    loss_fig = loss_by_position({n: models[n] for n in names[:2]}, tokens, T, out / "loss_by_position")

    # 2. pattern scores and roles (data: the induction models' training distribution)
    segments = toy.repeated_segment_tokens(args.n, 64, 64, torch.Generator().manual_seed(SEED))
    random_ids = torch.randint(0, 64, (args.n, 64), generator=torch.Generator().manual_seed(SEED))
    data = {"toy-induction-2l": segments, "toy-induction-1l": segments, "toy-first-token": random_ids}
    scores = {n: assign_roles(pattern_scores(models[n], data[n], seed=SEED)) for n in names}
    pd.concat([s.assign(model=n) for n, s in scores.items()]).to_csv(out / "scores.csv", index=False)
    s2 = scores["toy-induction-2l"]
    heat = [score_heatmap(s2, c, out / f"heatmap_{c}", title=f"toy-induction-2l: {c[6:].replace('_', ' ')}")
            for c in ("score_previous_token", "score_induction")]
    layer0 = s2[s2.layer == 0]
    prev = (0, int(layer0.loc[layer0["score_previous_token"].idxmax(), "head"]))
    induction = [(int(l), int(h)) for l, h in s2.loc[s2.role == "induction", ["layer", "head"]].to_numpy()]
    example, _ = toy.eval_tokens(two, half_len=12, n_seqs=1, seed=SEED)
    gallery = pattern_gallery(two, example[0].tolist(), {"prev": [prev], "induction": induction[:3]},
                              out / "pattern_gallery", captions={"prev": "previous-token head",
                                                                 "induction": "induction head"})

    # 3. ablation: each head alone, then groups
    task = RepeatedHalfTask(tokens, T)
    sweep = ablation_sweep(two, task, ablation="zero", n_bootstrap=1000, seed=SEED, progress=False)
    sweep.to_csv(out / "ablation.csv", index=False)
    clean = task.evaluate(two)
    groups = {}
    for label, heads in {"all induction": induction, "layer 0": {0: None}, "prev + 1 induction": [prev, induction[0]]}.items():
        diff = ablate(two, task, heads) - clean
        boot = np.random.default_rng(SEED).choice(diff, (1000, len(diff))).mean(1)
        groups[label] = {"damage": diff.mean(), "low": np.quantile(boot, 0.025), "high": np.quantile(boot, 0.975)}
    bars = damage_bars(sweep, groups, out / "ablation_damage")

    # 4. clustering
    clusterer = HeadClusterer(seed=SEED, n_bootstrap=10).fit(two, segments)
    clusterer.labels_.merge(s2[["layer", "head", "role"]]).to_csv(out / "clusters.csv", index=False)
    scatter = embedding_scatter(clusterer.embedding_, clusterer.labels_, out / "head_embedding",
                                title="toy-induction-2l heads (MDS of JS distances), coloured by cluster")
    labels = clusterer.labels_.set_index(["layer", "head"])["cluster"]
    ind_ix = [two.head_labels().index(h) for h in induction]
    rest_ix = [i for i in range(len(labels)) if i not in ind_ix]
    d = clusterer.distance_

    # 5. the recovery checks
    sw = sweep.set_index(["layer", "head"])
    s1, sf = scores["toy-induction-1l"], scores["toy-first-token"].set_index(["layer", "head"])
    first_card = read_card(MODELS_DIR / "toy-first-token")["roles"]
    checks = [
        ("repeated-half loss far below first-half loss (2 layers)",
         losses.loss_repeated_half[0] < losses.loss_first_half[0] - 2),
        ("1-layer control: repeated half stays near log(#tokens)",
         losses.loss_repeated_half[1] > np.log(63) - 0.5),
        ("scores label every layer-1 head 'induction'", (s2[s2.layer == 1].role == "induction").all()),
        (f"the best layer-0 head {prev[0]}.{prev[1]} is labelled 'previous-token'",
         s2.set_index(["layer", "head"]).loc[prev, "role"] == "previous-token"),
        ("1-layer control has no induction head", "induction" not in set(s1.role)),
        ("first-token model: its documented heads are 'first-token sink' and 'previous-token'",
         sf.loc[tuple(first_card["first-token sink"][0]), "role"] == "first-token sink"
         and sf.loc[tuple(first_card["previous-token"][0]), "role"] == "previous-token"),
        ("ablating the previous-token head hurts more than ablating any single induction head (CIs apart)",
         sw.loc[prev, "importance_ci_low"] > max(sw.loc[h, "importance_ci_high"] for h in induction)),
        ("the induction heads share one cluster, with no other head",
         labels[induction].nunique() == 1 and not (labels.drop(induction) == labels[induction[0]]).any()),
    ]
    seconds = time.perf_counter() - start

    # report
    def rel(paths):
        return Path(paths[0]).name
    ctable = clusterer.table_[["cluster", "size", "members", "description"]]
    gtable = pd.DataFrame([dict(group=k, **v) for k, v in groups.items()])
    lines = [
        "# Recovering known heads in toy transformers", "",
        f"Generated by `python analyses/induction_toy.py` in {seconds:.0f} s (load average "
        f"{os.getloadavg()[0]:.1f}); data seed {SEED}, {args.n} sequences per data set. Models: the "
        "shipped checkpoints (their cards: `headlens/data/models/*/card.md`).", "",
        "## Checks", "",
        *[f"- [{'x' if ok else ' '}] {text}" for text, ok in checks], "",
        "## 1. Loss on the first and the repeated half of [BOS, x, x]", "",
        f"half length {T}; log(63) = {np.log(63):.3f} nats (uniform over the data tokens).", "",
        markdown(losses, 3), "", f"![loss by position]({rel(loss_fig)})", "",
        "## 2. Pattern scores and roles", "",
        "`pattern_scores` on the training distribution ([BOS, x, x, ...] with random period), "
        "induction score from headlens' own repeated-token probe; `assign_roles` with default thresholds.", "",
        *[part for n in names for part in (f"### {n}", "", markdown(scores[n][SHOWN], 3), "")],
        f"![previous-token scores]({rel(heat[0])}) ![induction scores]({rel(heat[1])})", "",
        f"![patterns]({rel(gallery)})", "",
        "## 3. Ablation (zero, repeated-half loss)", "",
        f"Clean repeated-half loss {clean.mean():.4f}. Single heads (`ablation_sweep`, 95% bootstrap CI):", "",
        markdown(sweep[["layer", "head", "damage", "importance_ci_low", "importance_ci_high", "metric_ablated"]], 3), "",
        "Groups (`ablate`):", "", markdown(gtable, 3), "",
        f"The previous-token head {prev[0]}.{prev[1]} feeds the keys of every induction head "
        f"(K-composition): removing it costs {sw.loc[prev, 'damage']:.2f} nats. The induction heads are "
        f"redundant: removing any one costs at most {max(sw.loc[h, 'damage'] for h in induction):.3f} "
        f"nats, removing all {len(induction)} costs {groups['all induction']['damage']:.2f}.", "",
        f"![ablation]({rel(bars)})", "",
        "## 4. Clusters (Jensen-Shannon distance, agglomerative, k by silhouette)", "",
        markdown(ctable, 3), "",
        f"Largest distance between two induction heads {d[np.ix_(ind_ix, ind_ix)].max():.3f}; smallest "
        f"from an induction head to any other head {d[np.ix_(ind_ix, rest_ix)].min():.3f}.", "",
        f"![embedding]({rel(scatter)})", "",
    ]
    lines.insert(4, "The same 2-layer model through `headlens.report` (scores, clusters, sweep, gradient "
                    "importance, pruning curve and these checks on one HTML page): "
                    "[html/report.html](html/report.html).\n")
    (out / "report.md").write_text("\n".join(lines))
    if not args.svg:
        for paths in (loss_fig, *heat, gallery, bars, scatter):
            Path(paths[1]).unlink()
    html = headlens.report(two, task=task, data=segments, out=out / "html", n_examples=args.n, seed=SEED,
                           progress=False, command="python analyses/induction_toy.py")
    html.add_section("Recovery checks", notes=[f"{'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks],
                     tables={"Loss on the first and the repeated half": losses, "Group ablations": gtable})
    slim(html, keep_svg=args.svg)
    losses.to_csv(out / "losses.csv", index=False)
    print("\n".join(f"[{'ok' if ok else 'FAIL'}] {text}" for text, ok in checks))
    print(f"wrote {out / 'report.md'} in {seconds:.1f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
