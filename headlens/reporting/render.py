"""A finished :class:`headlens.reporting.pipeline.Report` in words: key findings generated from the numbers,
``report.html`` (one self-contained page), ``report.md`` and the summary printed to the terminal.

Everything here reads the report's tables and ``run.json`` only, so a report loaded back with
:meth:`headlens.reporting.pipeline.Report.load` renders exactly like a fresh one.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from headlens.importance.statistics import spearman
from headlens.reporting import claims, viewer
from headlens.reporting.words import head_name
from headlens.reporting.words import num as _num
from headlens.reporting.words import signed as _signed

SECTIONS = [  # (id, title, introductory sentence)
    ("importance", "Head importance",
     "Importance is the change of the task metric when one head is ablated (metric(ablated) - "
     "metric(clean)), averaged over the task's examples, with a bootstrap 95% confidence interval. "
     "Damage is the same number signed so that positive always means the ablation hurts."),
    ("patterns", "What the heads look at",
     "Per-head attention scores averaged over the text (padding excluded), the role read from "
     "them and the Kovaleva et al. pattern class."),
    ("clusters", "Clusters of heads",
     "Heads grouped by the Jensen-Shannon distance between their attention distributions on the "
     "same inputs (Clark et al. 2019)."),
    ("pruning", "Pruning", "Task metric on held-out examples as more and more heads are masked."),
]

# figure name (or name prefix ending in "_") -> (section, title, caption), in display order
FIGURES = {
    "importance": ("importance", "Damage per head",
                   "Metric change when the head alone is ablated, signed so that red means the ablation "
                   "hurts; * marks heads significant at a 5% false-discovery rate (Benjamini-Hochberg "
                   "q-values of the heads' paired t-tests)."),
    "grad_vs_ablation": ("importance", "Gradient vs ablation importance",
                         "Michel et al.'s head-mask gradient importance (raw, not normalised per layer) "
                         "against the damage of the exact ablation sweep (horizontal bars: 95% CI); the "
                         "title gives their Spearman rank correlation (gradient vs |importance|)."),
    "heatmap_score_": ("patterns", "Pattern score", ""),
    "gallery": ("patterns", "Attention pattern gallery",
                "Attention patterns of each cluster's most typical head on one real sentence "
                "(rows: queries, columns: keys)."),
    "clustermap": ("clusters", "Head distance matrix",
                   "Jensen-Shannon distance between the heads' attention distributions, ordered by "
                   "hierarchical clustering; the colour strip gives each head's cluster."),
    "embedding": ("clusters", "Head embedding",
                  "Metric MDS of the distance matrix: nearby heads attend alike. Colour: cluster."),
    "pruning_curve": ("pruning", "Pruning curve",
                      "Held-out metric against the number of heads removed, for Michel et al.'s "
                      "iterative gradient order, the single-head ablation order (the importance "
                      "sweep read on the selection split's examples; a mean ablation's mean is "
                      "over all examples) and random orders (median and 90% band over seeds); bands of "
                      "the two orders: 95% bootstrap CIs over the held-out examples."),
}

HEAD_COLUMNS = ["layer", "head", "role", "pattern_class", "cluster", "damage", "importance",
                "importance_ci_low", "importance_ci_high", "q_value", "grad_importance"]


def _figure_key(name: str):
    """The :data:`FIGURES` key of ``name``: itself, else the ``"_"``-ended prefix it starts with, else None."""
    if name in FIGURES:
        return name
    return next((key for key in FIGURES if key.endswith("_") and name.startswith(key)), None)


def figure_meta(name: str) -> tuple[str, str, str]:
    """(section, title, caption) of figure ``name``; score heatmaps share a prefix."""
    key = _figure_key(name)
    if key is None:
        return "patterns", name.replace("_", " ").capitalize(), ""
    if key == name:
        return FIGURES[name]
    section, title, _ = FIGURES[key]
    score = name[len(key):].replace("_", " ")
    return section, f"{title}: {score}", f"Layer x head heatmap of the {score} score."


SCORE_ORDER = ["previous_token", "first_token", "separator", "entropy_norm", "induction"]


def figure_order(names) -> list[str]:
    """``names`` in the order of :data:`FIGURES`; score heatmaps in :data:`SCORE_ORDER`."""
    def rank(name):
        key = _figure_key(name)
        if key is None:
            return len(FIGURES), 0, name
        score = name[len(key):]
        in_key = SCORE_ORDER.index(score) if score in SCORE_ORDER else len(SCORE_ORDER)
        return list(FIGURES).index(key), in_key, name
    return sorted(names, key=rank)


def _ci(row) -> str:
    return f"[{_num(row.importance_ci_low)}, {_num(row.importance_ci_high)}]"


# --- findings ------------------------------------------------------------------------------
def damage_frame(report) -> pd.DataFrame:
    """``damage`` (metric change when ablated, signed so that > 0 means the head helps) and its
    95% CI ``damage_low, damage_high``, from ``importance`` and the task's direction."""
    heads = report.heads
    better_high = bool(report.run.get("data", {}).get("higher_is_better", False))
    sign = -1.0 if better_high else 1.0
    lo, hi = sign * heads.importance_ci_low, sign * heads.importance_ci_high
    return heads.assign(damage=sign * heads.importance, damage_low=np.minimum(lo, hi),
                        damage_high=np.maximum(lo, hi))


def ranked(report) -> pd.DataFrame:
    """Heads from the one whose ablation hurts the task most to the one it helps most."""
    return damage_frame(report).sort_values(["damage", "layer", "head"], ascending=[False, True, True],
                                            kind="stable")


def grad_vs_ablation_rho(heads: pd.DataFrame) -> float:
    """Spearman rank correlation of the raw gradient importance (a magnitude, not normalised per
    layer) with ``|importance|``, as :func:`headlens.importance.gradients.compare_with_ablation` reports it."""
    return spearman(heads.grad_importance_raw, heads.importance.abs())


def findings(report) -> list[str]:
    """The key findings in plain sentences, each computed from the report's numbers; warnings that
    undercut the rest (a task that does not need attention, too few examples) come first."""
    heads, run = report.heads, report.run
    data = run.get("data", {})
    metric = data.get("metric", "the metric")
    direction = "higher" if data.get("higher_is_better") else "lower"
    first, controls = claims.control_claims(report)
    out = list(first)
    if "importance" in heads:
        dmg = ranked(report)
        parts = [f"head {head_name(r.layer, r.head)} ({_signed(r.importance)}, 95% CI {_ci(r)}"
                 f"{claims.top_head_note(r)}, {r.role})" for r in dmg.head(3).itertuples()]
        out.append(f"Ablating these heads hurts {metric} ({direction} is better) the most: "
                   + "; ".join(parts) + ".")
        out += claims.importance_claims(report, dmg)
        by_layer = dmg.groupby("layer").damage.sum().clip(lower=0)
        if by_layer.sum() > 0:
            layer = int(by_layer.idxmax())
            out.append(f"Layer {layer} carries {by_layer.max() / by_layer.sum():.0%} of the summed "
                       "harm of single-head ablations.")
    out += controls
    if "role" in heads:
        census = heads.role.value_counts()
        out.append("Role census: " + ", ".join(f"{c} {r}" for r, c in census.items()) + ".")
    if "grad_importance_raw" in heads and "importance" in heads:
        out.append(claims.rho_claim(report, grad_vs_ablation_rho(heads)))
    out += _cluster_findings(report)
    out += claims.cluster_stability_claim(report)
    out += claims.pruning_claims(report)
    return out


def cluster_notes(report) -> list[str]:
    """One sentence per cluster: what its heads do and how much ablating one of them hurts."""
    clusters, heads = report.clusters, report.heads
    if clusters is None or not len(clusters) or "cluster" not in heads:
        return []
    dmg = damage_frame(report) if "importance" in heads else None
    out = []
    for row in clusters.itertuples():
        members = heads.cluster == row.cluster
        desc = str(getattr(row, "description", "") or "").rstrip(".")
        if not desc:
            layers = heads.layer[members]
            desc = f"{int(members.sum())} head(s), layers {layers.min()}-{layers.max()}"
        imp = "" if dmg is None else \
            f"; mean damage when one of them is ablated {_signed(dmg.damage[members].mean())}"
        out.append(f"Cluster {row.cluster}: {desc}{imp}.")
    return out


def _cluster_findings(report) -> list[str]:
    clusters, heads = report.clusters, report.heads
    if clusters is None or not len(clusters) or "cluster" not in heads:
        return []
    sizes = heads.cluster.value_counts()
    big = int(sizes.idxmax())
    desc = {int(r.cluster): str(getattr(r, "description", "") or "").rstrip(".") for r in clusters.itertuples()}
    text = (f"The heads fall into {len(clusters)} clusters by attention pattern; the largest, cluster {big}, "
            f"is {desc.get(big) or f'{sizes.max()} heads'}")
    if "importance" in heads:
        mean = damage_frame(report).groupby("cluster").damage.mean()
        top = int(mean.idxmax())
        if top != big:
            text += (f"; ablating heads of cluster {top} hurts most on average ({_signed(mean.max())}): "
                     f"{desc.get(top)}")
        else:
            text += f", and ablating its heads hurts most on average ({_signed(mean.max())})"
    out = [text + "."]
    ari = report.run.get("results", {}).get("cluster_stability_ari")
    if ari is not None and np.isfinite(ari):
        verdict = "stable" if ari >= 0.75 else "moderately stable" if ari >= 0.5 else "not stable"
        out.append(f"The clusters are {verdict} across bootstrap resamples of the data "
                   f"(mean adjusted Rand index {_num(ari, 2)}).")
    return out


# --- tables --------------------------------------------------------------------------------
def _cell(x, digits=3) -> str:
    if isinstance(x, (float, np.floating)):
        return "" if np.isnan(x) else f"{float(x):.{digits}g}"
    return str(x)


def html_table(df: pd.DataFrame, digits: int = 3) -> str:
    """``df`` as a sortable HTML table (text columns left-aligned)."""
    text_cols = {c for c in df.columns if df[c].dtype == object or str(df[c].dtype).startswith("str")}
    th = "".join(f'<th class="text">{html.escape(str(c))}</th>' if c in text_cols
                 else f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        tds = "".join(f'<td class="text">{html.escape(_cell(v, digits))}</td>' if c in text_cols
                      else f"<td>{html.escape(_cell(v, digits))}</td>" for c, v in zip(df.columns, rec))
        rows.append(f"<tr>{tds}</tr>")
    return f'<table class="sortable"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_cell(v, digits).replace("|", "/") for v in rec) + " |"
            for rec in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def report_tables(report) -> dict:
    """The report's own tables per section: ``{section: [dict(title, df, folded, note)]}``."""
    heads = report.heads
    if "importance" in heads:
        heads = ranked(report)
    key = heads[[c for c in HEAD_COLUMNS if c in heads]]
    tables = {"importance": [dict(title="Heads by importance", df=key, folded=False,
                                  note="click a column header to sort", md_note="")],
              "patterns": [dict(title="All per-head columns", df=heads, folded=True, note="")]}
    if report.clusters is not None and len(report.clusters):
        tables["clusters"] = [dict(title="Clusters", df=report.clusters, folded=False, note="")]
    if report.pruning is not None and len(report.pruning):
        tables["pruning"] = [dict(title="Pruning curve", df=report.pruning, folded=True, note="")]
    return tables


# --- pages ---------------------------------------------------------------------------------
def facts(report) -> list[tuple[str, str]]:
    run = report.run
    m, d, cfg = run.get("model", {}), run.get("data", {}), run.get("config", {})
    rows = [("Model", f"{m.get('name', '?')} ({m.get('family', '?')}, "
                      f"{'decoder' if m.get('causal') else 'encoder'}): {m.get('n_layers')} layers x "
                      f"{m.get('n_heads')} heads = {m.get('n_heads_total')} heads, "
                      f"{m.get('n_params', 0) / 1e6:.1f}M parameters")]
    if d.get("pattern_texts"):
        source = d.get("pattern_source", "?")
        source = "given to headlens.report (data=)" if source.endswith("given") else f"from {source}"
        rows.append(("Pattern data", f"{d['pattern_texts']} texts {source}"))
    rows.append(("Task", f"{d.get('task', '?')}: {d.get('task_examples', '?')} examples, metric "
                         f"{d.get('metric', '?')} (full model: {_num(d.get('clean_metric'))})"))
    rows.append(("Ablation", f"{cfg.get('ablation')} ablation of one head at a time, "
                             f"{cfg.get('n_bootstrap')} bootstrap resamples"))
    attempts = len(run.get("attempts") or [])
    over = f" over {attempts} attempts (resumed)" if attempts > 1 else ""
    rows.append(("Run", f"seed {cfg.get('seed')}, {cfg.get('device')} {cfg.get('dtype')}, "
                        f"{_num(run.get('timings_s', {}).get('total'), 3)} s{over}"))
    return rows


def _context(report, inline_figures: bool) -> dict:
    run = report.run
    tables = report_tables(report)
    sections = []
    for sid, title, text in SECTIONS:
        figs = []
        for name in figure_order(n for n in report.figures if n in report.run.get("figures", report.figures)):
            path = report.figures[name]
            section, ftitle, caption = figure_meta(name)
            if section != sid:
                continue
            rel = Path(path).relative_to(report.out).as_posix() if Path(path).is_absolute() else str(path)
            src = _data_uri(report.out / rel) if inline_figures else rel
            figs.append(dict(name=name, title=ftitle, caption=caption, src=src, path=rel,
                             half=name.startswith("heatmap_")))
        tabs = [dict({"md_note": t["note"]}, **t, n_rows=len(t["df"]), html=html_table(t["df"]),
                     markdown=markdown_table(t["df"]))
                for t in tables.get(sid, [])]
        notes = cluster_notes(report) if sid == "clusters" else []
        if figs or tabs:
            sections.append(dict(id=sid, title=title, text=text, figures=figs, tables=tabs, notes=notes))
    sections = viewer.insert_section(sections, report)
    sections += [_study_section(report, sec, inline_figures) for sec in run.get("sections", [])]
    m = run.get("model", {})
    return dict(title=f"Attention heads of {m.get('name', 'a model')}",
                subtitle=f"headlens report on task {run.get('data', {}).get('task', '?')}",
                version=run.get("versions", {}).get("headlens", "?"), facts=facts(report),
                findings=findings(report), sections=sections, command=run.get("command", ""),
                files=run.get("files", []), created=run.get("created", ""),
                platform=run.get("platform", {}).get("system", ""))


def _study_section(report, sec: dict, inline_figures: bool) -> dict:
    """A section added with :meth:`headlens.reporting.pipeline.Report.add_section`, ready for the templates."""
    tables = []
    for t in sec["tables"]:
        df = pd.read_csv(report.out / t["file"], dtype={c: str for c in t.get("text_columns", [])},
                         keep_default_na=False, na_values=[""])
        tables.append(dict(title=t["title"], note=f"also in {t['file']}", md_note=t["file"],
                           folded=len(df) > 40, n_rows=len(df),
                           html=html_table(df), markdown=markdown_table(df)))
    figures = [dict(f, src=_data_uri(report.out / f["path"]) if inline_figures else f["path"], half=False)
               for f in sec["figures"]]
    return dict(id=sec["id"], title=sec["title"], text=" ".join(sec["paragraphs"]), notes=sec["notes"],
                tables=tables, figures=figures)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("headlens.reporting", "templates"),
                              autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render_html(report) -> str:
    """``report.html``: one page with every figure embedded as a base64 PNG; no external URLs."""
    return _env().get_template("report.html.j2").render(**_context(report, inline_figures=True))


def render_markdown(report) -> str:
    """``report.md``: the same content, figures referenced by relative path."""
    return _env().get_template("report.md.j2").render(**_context(report, inline_figures=False))


def summary_text(report, n_top: int = 8) -> str:
    """The summary printed at the end of ``headlens report``."""
    heads = report.heads
    lines = [f"headlens report: {report.run.get('model', {}).get('name', '?')} on "
             f"{report.run.get('data', {}).get('task', '?')}", ""]
    if "importance" in heads:
        data = report.run.get("data", {})
        lines.append(f"Top {n_top} heads (change of {data.get('metric', 'the metric')} when ablated, "
                     f"{'higher' if data.get('higher_is_better') else 'lower'} is better; 95% CI):")
        top = ranked(report).head(n_top)
        for r in top.itertuples():
            lines.append(f"  {head_name(r.layer, r.head):>6}  {_signed(r.importance):>9}  {_ci(r):<22}"
                         f" {r.role:<16} cluster {r.cluster}")
        lines.append("")
    lines += [f"- {f}" for f in findings(report)[1:]]
    lines += ["", f"Report: {report.out / 'report.html'}"]
    return "\n".join(lines)
