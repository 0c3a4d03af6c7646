"""The page of ``analyses/longcontext_study.py``: ``reports/longcontext/README.md`` and its figures,
from the results the study saved in the same folder (every number on the page is read from them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

RETRIEVAL = ("passkey", "needle", "multikey")


def kvpress_rows(kv: pd.DataFrame, kinds: dict) -> pd.DataFrame:
    """One row per kvpress config: method, target compression, memory saved, needle accuracy,
    answer loss (retrieval examples), LM loss."""
    if "check" in kv:
        kv = kv[~kv.check.fillna(False).astype(bool)]
    kv = kv.copy()
    kv["kind"] = kv.id.map(kinds)
    rows = []
    for name, part in kv.groupby("config", sort=False):
        ret, lm = part[part.kind.isin(RETRIEVAL)], part[part.kind == "lm"]
        method, _, pct = name.rpartition("-")
        method = method or name
        rows.append(dict(method=method, target_compression=float(pct) / 100 if pct.isdigit() else None,
                         saved_fraction=float(1 - part.kept.sum() / part.total.sum()),
                         needle_accuracy=float(ret.correct.mean()), answer_loss=float(ret.loss.mean()),
                         lm_loss=float(lm.loss.mean()) if len(lm) else np.nan, n=len(part)))
    return pd.DataFrame(rows)


def render(out: Path, markdown) -> None:
    from headlens.reporting.figures import longcontext as figs

    out = Path(out)
    kvh = pd.read_csv(out / "kv_heads.csv")
    heads = pd.read_csv(out / "query_heads.csv")
    plans = pd.read_csv(out / "plans.csv")
    abl = pd.read_csv(out / "retrieval_ablation.csv")
    plan = json.loads((out / "kv_plan.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    cfg = timings["config"]
    kvp = pd.read_csv(out / "kvpress.csv")
    records = {}
    from headlens.longcontext.tasks import list_records

    for r in list_records(lengths=tuple(cfg["lengths"]), split="heldout"):
        records[r["id"]] = r["kind"]
    press = kvpress_rows(kvp, records)

    full = plans[plans.method == "full"].iloc[0]
    comp = plans[(plans.method != "full") & plans.target_compression.notna() & (plans.target_compression > 0)]
    both = pd.concat([comp[["method", "target_compression", "saved_fraction", "needle_accuracy", "answer_loss",
                            "lm_loss"]].assign(by="headlens"),
                      press[press.method != "full"].assign(by="kvpress")], ignore_index=True)
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    figs.damage_heatmap(kvh, str(figdir / "kv_streaming_damage"))
    figs.head_scores_scatter(heads, str(figdir / "kv_head_scores"))
    shown = both.copy()
    shown.loc[shown.by == "kvpress", "method"] = "kvpress " + shown.loc[shown.by == "kvpress", "method"]
    figs.METHOD_STYLE.update({f"kvpress {k}": v for k, v in figs.METHOD_STYLE.items()})
    figs.plan_comparison(shown, str(figdir / "kv_plan_comparison"), full.to_dict())
    for svg in figdir.glob("*.svg"):
        svg.unlink()

    # the comparison table: per target compression and method (random: mean and range over seeds)
    rows = []
    for (by, method, c), part in both.groupby(["by", "method", "target_compression"], sort=False):
        acc = part.needle_accuracy
        rows.append(dict(compression=f"{c:.0%}", method=f"{method} ({by})" if by == "kvpress" else method,
                         memory_saved=f"{part.saved_fraction.mean():.1%}",
                         needle_accuracy=(f"{acc.mean():.2f} [{acc.min():.2f}, {acc.max():.2f}]" if len(part) > 1
                                          else f"{acc.mean():.2f}"),
                         answer_loss=part.answer_loss.mean(), lm_loss=part.lm_loss.mean()))
    table = pd.DataFrame(rows).sort_values(["compression", "method"], kind="stable")
    n_ret = int((heads.retrieval_score > 0.1).sum())
    top = heads.sort_values("retrieval_score", ascending=False).head(8)
    top_t = pd.DataFrame({"head": [f"{int(a)}.{int(b)}" for a, b in zip(top.layer, top["head"])],
                          "retrieval_score": top.retrieval_score, "ci_low": top.retrieval_ci_low,
                          "ci_high": top.retrieval_ci_high, "sink_rate": top.sink_rate})
    top_abl = abl[abl.method == "top retrieval heads"].iloc[0]
    rand_abl = abl[abl.method == "random heads"]
    hurt = kvh[kvh.ci_low > 0]
    duo_vs_mine = []
    for c in sorted(comp.target_compression.unique()):
        mine = comp[(comp.method == "headlens") & (comp.target_compression == c)].iloc[0]
        theirs = press[(press.method == "duo-headlens") & (press.target_compression == c)]
        if len(theirs):
            duo_vs_mine.append(abs(theirs.iloc[0].answer_loss - mine.answer_loss))
    lines = [
        "# Long-context heads of SmolLM2-135M and KV-cache decisions",
        "",
        "Produced by `python analyses/longcontext_study.py` (numbers below are read from the CSVs in this "
        "folder). Model: SmolLM2-135M-Instruct as bundled (30 layers x 9 query heads, 3 kv heads per layer; "
        "weights dequantized from the 4-bit GGUF). Tasks: `headlens/data/longcontext` (passkey, single-key "
        f"needle, multi-key needle, long-document LM loss over Python-docs prose), {cfg['lengths'][0]} tokens, "
        f"{cfg['n_select']} examples to choose on (select split) and {cfg['n_heldout']} held out, the two "
        f"splits drawn from disjoint halves of the prose. Streaming heads keep the first {cfg['sink']} and the "
        f"last {cfg['window']} context positions (a KV cache compressed after prefilling the context, as "
        "kvpress applies it).",
        "",
        f"Run time: {timings['total_wall'] / 60:.1f} min wall, {timings['total_cpu'] / 60:.1f} min CPU (headlens and "
        f"the kvpress worker together) on the project's 2-core CPU, load average {timings['load_average']:.1f} at "
        "the end (the study's own two threads count 2). Length and counts were chosen to stay within 15 "
        f"minutes of CPU time: {cfg['lengths'][0]} tokens, {cfg['n_per_group']} examples per kind and split.",
        "",
        "## Retrieval heads",
        "",
        f"{n_ret} of {len(heads)} query heads ({n_ret / len(heads):.1%}) have a retrieval score above 0.1 "
        "(Wu et al. 2024: the share of needle tokens the head copies, its top-attended key being the "
        "needle token the model outputs; 95% bootstrap CI over the select examples):",
        "",
        markdown(top_t, 3),
        "",
        f"**Removing the top {int(top_abl.n_removed)} retrieval heads** (their outputs zeroed at the question "
        f"and answer positions, the context prefilled intact) takes held-out needle accuracy from "
        f"{full.needle_accuracy:.2f} to **{top_abl.needle_accuracy:.2f}** (answer loss {full.answer_loss:.2f} -> "
        f"{top_abl.answer_loss:.2f}); removing as many random other heads leaves "
        f"**{rand_abl.needle_accuracy.mean():.2f}** on average (range {rand_abl.needle_accuracy.min():.2f}-"
        f"{rand_abl.needle_accuracy.max():.2f} over {len(rand_abl)} seeds; answer loss "
        f"{rand_abl.answer_loss.mean():.2f}).",
        "",
        "## Sink heads",
        "",
        f"{int((heads.sink_mass > 0.3).sum())} of {len(heads)} query heads put more than 0.3 of their attention on "
        f"the first token on average; the median sink rate (Gu et al. 2024: share of queries with more than "
        f"0.3 on the first token) is {heads.sink_rate.median():.2f}.",
        "",
        "![sink rate vs retrieval score](figures/kv_head_scores.png)",
        "",
        "## Streaming heads",
        "",
        f"Streaming one kv head alone raises the select-split answer loss measurably (95% CI above 0) for "
        f"{len(hurt)} of {len(kvh)} kv heads; the largest damage: "
        + ", ".join(f"{int(r.layer)}.kv{int(r.kv_head)} (+{r.streaming_damage:.3f})"
                    for r in kvh.sort_values("streaming_damage", ascending=False).head(5).itertuples())
        + f". The plan in `kv_plan.json` streams {int((kvh.decision == 'stream').sum())} of {len(kvh)} kv heads "
        f"({plan['memory']['saved_fraction']:.1%} of the KV memory at {plan['memory']['length']} tokens).",
        "",
        "![streaming damage](figures/kv_streaming_damage.png)",
        "",
        "## KV plans on held-out examples",
        "",
        "headlens' plan (least streaming damage first), random plans (5 seeds: mean [min, max]), the "
        "retrieval-score plan (lowest retrieval score streams first) and the sink-rate plan (highest sink rate "
        "first), run by headlens' own model; then kvpress 0.5.5 in its own virtualenv on the exported "
        "transformers folder and the same token ids: `DuoAttentionPress` with headlens' and the random plan, "
        "and kvpress' scorer presses. Full cache: needle accuracy "
        f"{full.needle_accuracy:.2f}, answer loss {full.answer_loss:.3f}, LM loss {full.lm_loss:.3f}.",
        "",
        markdown(table, 3),
        "",
        (f"kvpress' DuoAttentionPress running headlens' plans reproduces headlens' own masked run: the mean "
         f"answer losses differ by at most {max(duo_vs_mine):.1e}." if duo_vs_mine else ""),
        "",
        "![plans](figures/kv_plan_comparison.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    print(f"wrote {out / 'README.md'}")
