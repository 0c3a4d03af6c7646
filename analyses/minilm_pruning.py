"""Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") on MiniLM-L6: how many of its
72 heads a real task needs, alone and together, and what removing them physically saves.

    python analyses/minilm_pruning.py                  # writes reports/minilm_pruning/
    python analyses/minilm_pruning.py --section-only   # redo only the study section

Task: the bundled ``paraphrase`` triples (anchor, paraphrase, distractor), metric: the cosine
margin cos(anchor, paraphrase) - cos(anchor, distractor) of MiniLM's mean-pooled sentence
embeddings (what the model is trained for). The full headlens report (single-head zero-ablation
sweep with bootstrap CIs, Michel et al.'s gradient importance, pruning curves for the iterative
gradient order, the ablation order and random orders, chosen on one half of the task and scored
on the other) plus a section in Michel et al.'s terms: single heads removable alone, the best head
of each layer on its own (their Table 2), and how faithful the pruned model's sentence embeddings
stay on real sentences.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import REPORTS, run_study

OUT = REPORTS / "minilm_pruning"
N_EXAMPLES = 96


def histogram(values: np.ndarray, path: Path, xlabel: str, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    ax.hist(values, bins=30, color="#4c72b0")
    ax.axvline(0, color="#444", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("heads")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def left(kept: float) -> str:
    """What a control leaves of the full model's gain over chance, in words."""
    return "none of it left (at or below chance)" if kept <= 0 else f"{kept:.0%} of it left"


def few_heads(at_max: pd.DataFrame, n_heads: int, unpruned: float, control: dict) -> str:
    """How much of the margin the heads the ablation order keeps hold, against none at all."""
    row = at_max[at_max.method == "ablation"].iloc[0]
    share = row.metric / unpruned
    return (f"With only the {n_heads - int(row.n_pruned)} heads the ablation order keeps, the held-out margin is "
            f"{share:.0%} of the full model's; with no head at all (all {n_heads} zeroed) there is "
            f"{left(control['kept_ablated'])}" + (": the task needs attention, but few heads." if share >= 0.9 else "."))


def study(rep) -> None:
    """Add the Michel et al. section to the finished report ``rep``."""
    import headlens
    from headlens.data.corpora import bundled_sentences
    from headlens.importance.ablation import ablate
    from headlens.importance.controls import task_controls
    from headlens.importance.statistics import importance_table, significant
    from headlens.importance.tasks import FidelityTask, load_task
    from headlens.model.heads import gate_without
    from headlens.reporting.words import pvalue

    n_examples = rep.run["config"]["n_examples"]
    model = headlens.load("minilm")
    task = load_task("paraphrase", model=model, n_examples=n_examples)
    heads, clean = rep.heads, rep.run["data"]["clean_metric"]
    relative = heads.importance / abs(clean)  # cosine margin: higher is better, importance < 0 hurts
    free = int((relative > -0.01).sum())
    sure = int((heads.importance_ci_low / abs(clean) > -0.01).sum())  # the whole CI costs less than 1%
    better = int(significant(heads, "helpful").sum())  # Benjamini-Hochberg, 5% false-discovery rate

    # Michel et al. Table 2: each layer reduced to its single most important head (the full
    # model's per-example metric computed once, not once per layer)
    task_clean = task.evaluate(model)
    rows = []
    for layer, part in heads.groupby("layer"):
        best = int(part.sort_values("damage", ascending=False)["head"].iloc[0])
        others = {int(layer): [int(h) for h in part["head"] if h != best]}
        ablated = ablate(model, task, others, ablation="zero", seed=0)
        eff = importance_table([(-1, -1)], task_clean, {(-1, -1): ablated}, task, n_bootstrap=1000, seed=0).iloc[0]
        rows.append(dict(layer=int(layer), kept_head=best, metric=float(eff.metric_ablated),
                         change=float(eff.importance), ci_low=float(eff.importance_ci_low),
                         ci_high=float(eff.importance_ci_high)))
    one_head = pd.DataFrame(rows)

    # faithfulness of the pruned model's sentence embeddings on real sentences
    fidelity = FidelityTask(bundled_sentences(200), measure="cosine", name="sentence-embedding fidelity")
    curve, pr = rep.pruning, rep.run["results"]["pruning"]
    plan = [(int(layer), h) for layer, hs in rep.plan.items() for h in hs]
    n_plan = len(plan)
    all_heads = model.head_labels()
    sentences = fidelity.batches(model)  # encoded once for the four plans
    faithful = [dict(plan=f"recommended ({pr['recommended']}, {n_plan} heads)",
                     cosine=float(fidelity.evaluate(model, head_gate=gate_without(model, plan),
                                                    batches=sentences).mean()))]
    for seed in range(3):
        pick = np.random.default_rng(seed).permutation(len(all_heads))[:n_plan]
        gate = gate_without(model, [all_heads[i] for i in pick])
        faithful.append(dict(plan=f"random {n_plan} heads, seed {seed}",
                             cosine=float(fidelity.evaluate(model, head_gate=gate, batches=sentences).mean())))
    faithful = pd.DataFrame(faithful)

    scratch = Path(tempfile.mkdtemp())
    hist = histogram(relative.to_numpy() * 100, scratch / "single_heads.png",
                     "metric change when the head alone is removed (% of the full model's margin)",
                     "Removing one head at a time (Michel et al. Fig. 1)")
    at_max = curve[curve.n_pruned == curve.n_pruned.max()]
    orders = "; ".join(f"{r.method} {r.metric:.3f} (95% CI [{r.ci_low:.3f}, {r.ci_high:.3f}], {pvalue(r.p_vs_random)} "
                       "against random)" for r in at_max[at_max.method != "random"].sort_values("method").itertuples())
    randoms = at_max[at_max.method == "random"].metric
    control = rep.run["results"]["controls"]
    # the same controls on the word-order triples (the distractor has the anchor's words in another order)
    order = task_controls(model, load_task("word-order", model=model, n_examples=n_examples))
    controls = pd.DataFrame([dict(task=name, full=c["full"], uniform_attention=c["uniform"], all_heads_zeroed=c["ablated"],
                                  kept_uniform=c["kept_uniform"], kept_zeroed=c["kept_ablated"])
                             for name, c in (("paraphrase", control), ("word-order", order))])
    notes = [
        f"The paraphrase task needs attention (its own controls, on all {n_examples} triples): the full model's margin "
        f"is {control['full']:.3f}, chance being 0 ({(np.asarray(task_clean) > 0).mean():.0%} of the triples right); with every "
        f"head zeroed (no attention output at all) it is {control['ablated']:.3f}, {left(control['kept_ablated'])}; with "
        f"every head's attention uniform (a bag-of-words floor) {control['uniform']:.3f}, {left(control['kept_uniform'])}. "
        "So the pruning results below are about heads the task needs, not about a task that survives without attention.",
        f"MiniLM does not solve the word-order triples (distractor = the anchor's words with the roles swapped): "
        f"margin {order['full']:.3f} with the full model ({(order['clean'] > 0).mean():.0%} of the triples right), "
        f"{order['uniform']:.3f} with uniform attention; its sentence embeddings barely encode who did what to whom, "
        "so that task cannot rank heads here and the paraphrase task stays the study's (and the default report's).",
        f"Alone, {free} of {len(heads)} heads cost less than 1% of the full model's cosine margin ({clean:.3f}) when "
        f"removed (point estimate; {sure} of them with the whole 95% CI above -1%, not corrected for the "
        f"{len(heads)} heads); removing {better} of them improves the margin (Benjamini-Hochberg q < 0.05)"
        + ("; like Michel et al.'s BERT on MNLI, most single heads can go." if free > len(heads) / 2 else
           "; unlike Michel et al.'s BERT on MNLI, most single heads cost something here."),
        "Keeping only the best head of a layer (zeroing its other 11) changes the margin by "
        + ", ".join(f"{r.change:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] (layer {r.layer})" for r in one_head.itertuples())
        + "; Michel et al. saw no significant drop for most BERT layers.",
        f"Together, at {int(curve.n_pruned.max())} of {len(heads)} heads removed, the held-out margin is {orders}; "
        f"random orders: median {randoms.median():.3f} over {len(randoms)} seeds (full model {pr['unpruned']:.3f})."
        + (" " + pr["comparison"]["sentence"] if pr.get("comparison") else ""),
        few_heads(at_max, len(heads), pr["unpruned"], control),
        f"The recommended plan keeps the pruned model's sentence embeddings at cosine "
        f"{faithful.cosine.iloc[0]:.3f} to the full model's on 200 real sentences, vs "
        f"{faithful.cosine.iloc[1:].mean():.3f} for random plans of the same size"
        + (": the task margin survives while the embeddings move far from the full model's, so a pruned "
           "encoder must be checked on what it is used for, not on one score."
           if faithful.cosine.iloc[0] < 0.9 else "."),
    ]
    rep.add_section(
        "Michel et al. 2019, on MiniLM",
        paragraphs=[f"{n_examples} paraphrase triples; importance is the change of the cosine margin when a head is "
                    "zeroed (negative = the head helps). Pruning plans are chosen on half of the triples and scored "
                    "on the other half; the plan must keep 90% of the full model's margin on the selection half."],
        notes=notes,
        tables={"Best head of each layer alone": one_head, "Embedding fidelity of pruned models": faithful,
                "Task-sensitivity controls (cosine margin)": controls},
        figures={"Single-head removals": (hist, "Histogram of the change of the cosine margin when one head is "
                                          "zeroed, in % of the full model's margin (Michel et al. Fig. 1).")})


def make_report(args):
    """The full headlens report on the paraphrase triples, pruning curves up to 90% of the heads."""
    import headlens

    return headlens.report("minilm", task="paraphrase", out=args.out, n_examples=N_EXAMPLES, prune_target=0.9,
                           seed=0, command="python analyses/minilm_pruning.py")


def main(argv=None) -> None:
    run_study(argv, __doc__, OUT, make_report, lambda rep, args: study(rep))


if __name__ == "__main__":
    main()
