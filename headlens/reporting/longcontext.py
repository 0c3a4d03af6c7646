"""Long-context results on disk and in the report: the ``headlens kv-heads`` folder, written
atomically, and the report's "Long context" section.

Folder: ``kv_heads.csv`` (one row per kv head: ``layer, kv_head, query_heads, sink_rate,
retrieval_score, streaming_damage, ci_low, ci_high, decision``), ``query_heads.csv``,
``plans.csv`` (held-out comparison), ``retrieval_ablation.csv``, ``figures/`` and
``kv_plan.json`` (:mod:`headlens.longcontext.plans`), which is written last: a folder with a
``kv_plan.json`` is complete, and a failed run leaves the previous complete set (or nothing).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from headlens.longcontext.analysis import KVHeadsResult
from headlens.longcontext.plans import KV_PLAN_FILE, write_kv_plan
from headlens.reporting.figures import longcontext as figs
from headlens.reporting.folder import register_result_class
from headlens.storage.folders import OwnedFolder

register_result_class(KVHeadsResult)  # the long_context stage's result, saved for resume

TABLES = {"kv_heads.csv": "kv", "query_heads.csv": "heads", "plans.csv": "plans",
          "retrieval_ablation.csv": "retrieval_ablation"}
FIGURES = {"kv_streaming_damage": "Streaming damage per kv head",
           "kv_head_scores": "Sink rate and retrieval score per query head",
           "kv_plan_comparison": "KV plans on held-out examples"}


def draw_figures(result, folder) -> dict:
    """The three figures (PNG + SVG) into ``folder``; ``{name: png path}``."""
    folder = Path(folder)
    full = result.plans[result.plans.method == "full"].iloc[0].to_dict()
    paths = {"kv_streaming_damage": figs.damage_heatmap(result.kv, str(folder / "kv_streaming_damage")),
             "kv_head_scores": figs.head_scores_scatter(result.heads, str(folder / "kv_head_scores")),
             "kv_plan_comparison": figs.plan_comparison(result.plans[result.plans.target_compression.notna()],
                                                        str(folder / "kv_plan_comparison"), full)}
    return {name: Path(p[0]) for name, p in paths.items()}


def write_kv_heads(result, out) -> Path:
    """Write ``result`` (:class:`headlens.longcontext.analysis.KVHeadsResult`) into ``out``, a
    results folder headlens owns (:class:`headlens.storage.folders.OwnedFolder`; hold its lock):
    a file there that headlens did not write is never replaced."""
    owned = OwnedFolder(out, "--out")
    out = owned.folder
    stage = out / f".staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "figures").mkdir(parents=True)
    try:
        for name, attr in TABLES.items():
            getattr(result, attr).to_csv(stage / name, index=False, lineterminator="\n")
        draw_figures(result, stage / "figures")
        written = [*TABLES, KV_PLAN_FILE] + [f"figures/{f.name}" for f in (stage / "figures").iterdir()]
        owned.check_free(written)
        owned.claim(written, "kv-heads")
        (out / KV_PLAN_FILE).unlink(missing_ok=True)  # incomplete until the new plan is in place
        (out / "figures").mkdir(exist_ok=True)
        for f in (stage / "figures").iterdir():
            os.replace(f, out / "figures" / f.name)
        for name in TABLES:
            os.replace(stage / name, out / name)
        write_kv_plan(out / KV_PLAN_FILE, result.plan)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def summary_lines(result) -> list[str]:
    """The findings, in sentences computed from the numbers."""
    kv, heads, plans, abl = result.kv, result.heads, result.plans, result.retrieval_ablation
    cfg = result.config
    out = []
    top = heads.sort_values("retrieval_score", ascending=False).head(5)
    n_ret = int((heads.retrieval_score > 0.1).sum())
    out.append(f"{n_ret} of {len(heads)} query heads ({n_ret / len(heads):.0%}) have a retrieval score above 0.1 "
               "(Wu et al.'s retrieval heads); the top ones: " + ", ".join(
                   f"{int(r.layer)}.{int(r.head)} ({r.retrieval_score:.2f}, 95% CI [{r.retrieval_ci_low:.2f}, "
                   f"{r.retrieval_ci_high:.2f}])" for r in top.itertuples()) + ".")
    sinks = int((heads.sink_mass > 0.3).sum())
    out.append(f"{sinks} of {len(heads)} query heads put more than 0.3 of their attention on the first token on "
               f"average (Gu et al.'s sink heads); median sink rate {heads.sink_rate.median():.2f}.")
    n_stream = int((kv.decision == "stream").sum())
    hurt = int((kv.ci_low > 0).sum())
    out.append(f"Streaming one kv head alone (sink {cfg.get('sink')}, window {cfg.get('window')}) measurably raises "
               f"the answer loss for {hurt} of {len(kv)} kv heads (95% CI above 0); the plan streams {n_stream} of "
               f"{len(kv)} ({result.plan['memory']['saved_fraction']:.0%} of the KV memory at "
               f"{result.plan['memory']['length']} tokens).")
    full = abl[abl.method == "full"].iloc[0]
    top_row = abl[abl.method == "top retrieval heads"].iloc[0]
    rand = abl[abl.method == "random heads"]
    out.append(f"Removing the {int(top_row.n_removed)} top retrieval heads at the decoding positions takes held-out "
               f"needle accuracy from {full.needle_accuracy:.0%} to {top_row.needle_accuracy:.0%}; removing as "
               f"many random heads leaves {rand.needle_accuracy.mean():.0%} on average "
               f"(range {rand.needle_accuracy.min():.0%}-{rand.needle_accuracy.max():.0%}, {len(rand)} seeds).")
    comp = plans[plans.target_compression.notna()]
    for c, part in comp.groupby("target_compression"):
        mine = part[part.method == "headlens"].iloc[0]
        rnd = part[part.method == "random"]
        out.append(f"At {c:.0%} KV memory saved: headlens' plan {mine.needle_accuracy:.0%} needle accuracy, "
                   f"LM loss {mine.lm_loss:.3f}; random plans {rnd.needle_accuracy.mean():.0%}, "
                   f"{rnd.lm_loss.mean():.3f} (full cache {full.needle_accuracy:.0%}, {full.lm_loss:.3f}).")
    return out


def run_long_context(model, length: int, seed: int = 0, progress: bool = True):
    """The report's long-context analysis: :func:`headlens.longcontext.analysis.kv_heads` at
    ``length`` tokens with its defaults."""
    from headlens.errors import check
    from headlens.longcontext.analysis import kv_heads

    check(model.cfg.causal, f"long_context needs a decoder: {model.cfg.name!r} sees the whole sequence")
    return kv_heads(model, lengths=(int(length),), seed=seed, progress=progress)


def long_context_section(result, folder) -> dict:
    """The report's "Long context" section (a ``run.json`` section: its tables as CSVs and its
    figures written into the report folder ``folder``)."""
    folder = Path(folder)
    paths = draw_figures(result, folder / "figures")
    tables = []
    for i, (title, df) in enumerate((("KV heads (kv_heads.csv)", result.kv),
                                     ("KV plans on held-out examples", result.plans),
                                     ("Retrieval heads removed", result.retrieval_ablation))):
        name = f"long_context_{i}.csv"
        df.to_csv(folder / name, index=False, lineterminator="\n")
        text = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        tables.append(dict(title=title, file=name, text_columns=text))
    write_kv_plan(folder / KV_PLAN_FILE, result.plan)
    cfg = result.config
    intro = (f"Which heads can keep only a sink + recent-window KV cache (streaming) and which must keep it "
             f"all (retrieval), on passkey / needle / multi-key retrieval and long-document LM loss over real "
             f"prose ({', '.join(map(str, cfg.get('lengths', [])))} tokens; {cfg.get('n_select')} examples "
             f"to choose on, {cfg.get('n_heldout')} held out). The plan is kv_plan.json (headlens.longcontext.plans).")
    return dict(id="long_context", title="Long context", paragraphs=[intro], notes=summary_lines(result),
                tables=tables, figures=[dict(name=name, title=FIGURES[name], caption="", path=f"figures/{p.name}")
                                        for name, p in paths.items()])
