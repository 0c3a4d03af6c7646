"""Clark et al. 2019 ("What Does BERT Look At?") on MiniLM-L6: what each of the 72 heads attends
to on real English sentences, and how the heads group by attention pattern.

    python analyses/minilm_clark.py                  # writes reports/minilm_clark/ (15 min here)
    python analyses/minilm_clark.py --section-only   # redo only the study section from the tables

The full headlens report (pattern scores on all 400 bundled sentences, roles, Jensen-Shannon
clustering, and the importance of every head for the bundled paraphrase task) plus a section with
Clark et al.'s own views: attention to [CLS], [SEP], punctuation and the attention entropy per
layer, and whether heads of the same layer behave alike (within- vs between-layer distance).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import REPORTS, line_figure, run_study

OUT = REPORTS / "minilm_clark"
BEHAVIOURS = {"score_first_token": "[CLS]", "score_separator": "[SEP]", "score_punctuation": "punctuation",
              "score_previous_token": "previous token", "score_next_token": "next token", "score_self": "self"}


def per_layer(heads: pd.DataFrame) -> pd.DataFrame:
    """Mean of each behaviour and of the entropy over the heads of each layer (Clark Fig. 2, 4)."""
    cols = list(BEHAVIOURS) + ["score_entropy", "score_entropy_norm"]
    return heads.groupby("layer")[cols].mean().reset_index()


def layer_distances(distance: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """Mean JS distance between heads of the same layer and of different layers."""
    names = distance["head"].tolist()
    d = distance[names].to_numpy()
    layer = np.array([int(n.split(".")[0]) for n in names])
    same = layer[:, None] == layer[None, :]
    off = ~np.eye(len(names), dtype=bool)
    rows = []
    for a in sorted(set(layer)):
        block, block_off = d[np.ix_(layer == a, layer == a)], off[np.ix_(layer == a, layer == a)]
        rows.append(dict(layer=int(a), within=block[block_off].mean(),
                         to_other_layers=d[np.ix_(layer == a, layer != a)].mean()))
    return pd.DataFrame(rows), float(d[same & off].mean()), float(d[~same].mean())


def best_heads(heads: pd.DataFrame) -> pd.DataFrame:
    """The head with the highest score for each behaviour (Clark et al.'s Table 1 style)."""
    rows = []
    for col, label in BEHAVIOURS.items():
        top = heads.loc[heads[col].idxmax()]
        rows.append(dict(behaviour=label, head=f"{int(top.layer)}.{int(top['head'])}", score=float(top[col]),
                         mean_over_heads=float(heads[col].mean()), role=top.role))
    return pd.DataFrame(rows)


def study(rep) -> None:
    """Add the Clark et al. section to the finished report ``rep`` (from its tables only)."""
    heads = rep.heads
    layers = per_layer(heads)
    dist_layers, within, between = layer_distances(rep.distance)
    best = best_heads(heads)
    scratch = Path(tempfile.mkdtemp())
    fig_behaviour = line_figure(layers, "layer", {c: BEHAVIOURS[c] for c in list(BEHAVIOURS)[:3]},
                                scratch / "clark_layers.png", "layer",
                                "mean attention mass (over heads and queries)",
                                "Attention to special tokens and punctuation by layer")
    fig_entropy = line_figure(layers, "layer", {"score_entropy_norm": "normalised entropy"},
                              scratch / "clark_entropy.png", "layer", "entropy / log(#keys)",
                              "Attention entropy by layer (1 = uniform)")
    cls_layer = int(layers.score_first_token.idxmax())
    sep_layer = int(layers.score_separator.idxmax())
    classes = heads.pattern_class.value_counts()
    alike = ("as Clark et al. report for BERT" if between > 1.1 * within
             else "so, unlike Clark et al.'s BERT, layer membership says little here")
    notes = [
        f"Attention to [CLS] peaks in layer {cls_layer} ({layers.score_first_token.max():.2f} of the mass on "
        f"average); attention to [SEP] peaks in layer {sep_layer} ({layers.score_separator.max():.2f}); "
        f"punctuation gets {layers.score_punctuation.mean():.2f} on average. (Clark et al. found BERT-base's "
        "middle layers putting most of their attention on [SEP].)",
        f"Normalised attention entropy goes from {layers.score_entropy_norm.iloc[0]:.2f} in layer 0 to "
        f"{layers.score_entropy_norm.iloc[-1]:.2f} in layer {int(layers.layer.iloc[-1])}; the broadest layer "
        f"is {int(layers.score_entropy_norm.idxmax())}, the most focused {int(layers.score_entropy_norm.idxmin())} "
        f"({layers.score_entropy_norm.min():.2f}).",
        f"Mean Jensen-Shannon distance between heads: {within:.3f} within a layer vs {between:.3f} between "
        f"layers ({between / within:.2f}x), {alike}.",
        "Kovaleva et al. pattern classes: " + ", ".join(f"{n} {c}" for c, n in classes.items()) + ".",
        "Strongest head per behaviour: " + "; ".join(f"{r.behaviour} {r.head} ({r.score:.2f})"
                                                   for r in best.itertuples()) + ".",
    ]
    rep.add_section(
        "Clark et al. 2019, on MiniLM",
        paragraphs=[f"Pattern scores over the {rep.run['data']['pattern_texts']} bundled sentences (real prose from "
                    "the Python documentation), averaged per layer as in Clark et al.'s Figures 2 and 4; "
                    "distances are the Jensen-Shannon distances between heads used for the clustering above. "
                    "MiniLM-L6 is a 6-layer distillation of a BERT-style encoder, so its layers compress "
                    "BERT-base's 12."],
        notes=notes,
        tables={"Per-layer means": layers, "Within- and between-layer distance": dist_layers,
                "Strongest head per behaviour": best},
        figures={"Attention to [CLS], [SEP] and punctuation by layer": (
                     fig_behaviour, "Mean attention mass per layer on [CLS], [SEP] and punctuation tokens "
                                    "(Clark et al. Fig. 2)."),
                 "Attention entropy by layer": (
                     fig_entropy, "Mean normalised entropy of the heads' attention per layer (Clark et al. "
                                  "Fig. 4).")})


def make_report(args):
    """The full headlens report: all bundled sentences for the patterns, 96 paraphrase triples."""
    import headlens
    from headlens.data.corpora import bundled_sentences

    return headlens.report("minilm", task="paraphrase", out=args.out, data=bundled_sentences(), n_examples=96,
                           seed=0, command="python analyses/minilm_clark.py")


def main(argv=None) -> None:
    run_study(argv, __doc__, OUT, make_report, lambda rep, args: study(rep))


if __name__ == "__main__":
    main()
