"""``headlens report``: one call from a model to a research report on its attention heads.

    model -> capture + pattern scores -> roles -> clusters -> ablation sweep (bootstrap CIs)
          -> gradient importance -> pruning curve -> figures -> heads.csv, report.html, ...

The single-head sweep runs once: the pruning curve's ablation order reads its per-example
metrics on the selection split (so a mean ablation's mean is taken over all task examples).

:func:`report` runs it and returns a :class:`Report` (the tables, the pruning plan, the figure
paths and ``run.json``); :meth:`Report.load` reads a finished report folder back. The folder is
written atomically and every finished stage is saved inside it for resume (see
:mod:`headlens.reporting.folder`), so re-running the same call after a crash resumes. Under
``torchrun`` every rank runs :func:`report`: the analyses share their work out over the ranks and
rank 0 alone writes the folder (:mod:`headlens.reporting.ranks`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from headlens.errors import HeadlensError, check
from headlens.files import disk_full_error, is_disk_full
from headlens.importance.ablation import ABLATIONS
from headlens.model.config import parse_device, parse_dtype
from headlens.model.digest import state_digest
from headlens.model.heads import head_label
from headlens.model.tokens import encode
from headlens.pruning.plans import plan_record
from headlens.reporting import render
from headlens.reporting.folder import (
    ReportFolder,
)
from headlens.reporting.ranks import RankFolder
from headlens.reporting.result import Report, write_report_files
from headlens.reporting.run_record import (
    StepTimer,
    add_timings,
    as_list,
    input_digests,
    model_key,
    resume_options,
    run_record,
    task_key,
    texts_key,
)
from headlens.runtime import current_world

DEFAULT_MODEL = "minilm"

PRUNE_SPLIT = 0.5  # fraction of the task's examples the pruning plans are chosen on
RESUME_FORMAT = 4  # in the resume fingerprint: bump when a stage's saved result changes form
SCORE_FIGURES = ("score_previous_token", "score_first_token", "score_separator", "score_entropy_norm",
                 "score_induction")


def report(model=DEFAULT_MODEL, task=None, out="headlens-report", ablation: str = "zero",
           metric: Optional[str] = None, batch_size: int = 16, device: str = "cpu",
           dtype: str = "float32", seed: int = 0, n_examples: int = 48, prune_target: float = 0.5,
           prune_floor: Optional[float] = 0.9, n_bootstrap: int = 1000, n_clusters: Optional[int] = None,
           progress: bool = True, resume: bool = True, force: bool = False, keep_resume: bool = False,
           data=None, circuits: bool = False, command: Optional[str] = None,
           long_context: Optional[int] = None, device_map=None, max_memory: Optional[dict] = None,
           truncate: bool = False) -> Report:
    """Run the whole analysis of ``model`` on ``task`` and write the report folder ``out``.

    model: bundled name (``headlens models``), checkpoint or transformers folder, or a loaded
    :class:`~headlens.HeadlensModel` (used as it is: ``dtype`` and ``device`` then do not apply).
    task: a bundled task name, a task file or a :class:`headlens.importance.tasks.Task` (default: the
    model's bundled task); metric: a text-task type or the task's metric option (see
    :func:`_load_task`). ablation: ``zero``, ``mean``, ``resample`` or ``uniform``.
    n_examples: task examples for the importance sweep and pruning (and, without ``data``, the
    number of bundled sentences for the pattern scores). data: texts or token-id sequences for
    the pattern scores and clustering, or a file of them (text, JSONL, Parquet, a saved
    ``datasets`` folder; read lazily, see :mod:`headlens.data.streams`). prune_target: fraction
    of heads the pruning curve goes to; prune_floor: fraction of the full model's metric a
    pruning plan must keep on the selection split (None: plans prune to prune_target). seed: bootstrap, clustering, random
    pruning orders, task splits. resume: reuse the stages a killed run of the same configuration
    finished in ``out``; force: discard them. keep_resume: leave ``out/.resume``. circuits: add the
    "Circuits" section (:mod:`headlens.reporting.circuits`; decoders and tasks with corrupted inputs).
    command: how the run was started, for ``run.json``. long_context: the length in tokens of a
    "Long context" section (``headlens kv-heads`` at that length, :mod:`headlens.reporting.longcontext`;
    decoders only; None: no section). device_map, max_memory: a model larger than one device, its
    blocks over several (``"auto"`` or ``{layer: device}``, see :meth:`HeadlensModel.place`).
    truncate: cut pattern texts and task examples longer than the model's context (from the end)
    instead of stopping.
    """
    check(ablation in ABLATIONS, f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    parse_dtype(dtype)
    parse_device(device)
    check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    check(n_examples >= 2, f"n_examples must be >= 2, got {n_examples}")
    check(0 < prune_target < 1, f"prune_target must be a fraction in (0, 1), got {prune_target}")
    check(prune_floor is None or 0 < prune_floor <= 1,
          f"prune_floor must be a fraction in (0, 1] or None, got {prune_floor}")
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    digest = None if isinstance(model, str) else state_digest(model)
    config = dict(model=model if isinstance(model, str) else model_key(model, digest),
                  task=task if task is None or isinstance(task, str) else task_key(task),
                  ablation=ablation, metric=metric, batch_size=batch_size, device=device, dtype=dtype,
                  seed=seed, n_examples=n_examples, prune_target=prune_target, prune_floor=prune_floor,
                  n_bootstrap=n_bootstrap, n_clusters=n_clusters,
                  data=None if data is None else texts_key(data), circuits=circuits,
                  long_context=long_context, truncate=truncate)
    world = current_world()
    folder = RankFolder(world, lambda: ReportFolder(out, resume_options(config, model, task, data, RESUME_FORMAT),
                                                    resume=resume, force=force))
    timings = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=8 + circuits + (long_context is not None), desc="headlens report", unit="step",
               disable=not progress or not world.is_main, leave=False)
    step = StepTimer(bar, timings, folder)
    try:
        with step("load model and task"):
            net = _load_model(model, dtype, world.device(device), device_map, max_memory)
            the_task = _load_task(net, task, metric, n_examples)
            if truncate and the_task.max_tokens is None:
                the_task.max_tokens = net.cfg.n_ctx
            texts = _pattern_texts(net, n_examples) if data is None else as_list(data)
            check(len(texts) >= 2, "data must hold at least 2 texts or token sequences")
            check(len(the_task) >= 2, f"task {the_task.name!r} has {len(the_task)} example: the report's "
                                      "confidence intervals and held-out pruning need at least 2")
            if circuits:
                from headlens.reporting import circuits as report_circuits

                report_circuits.check_applicable(net, the_task)
            digests = input_digests(model, net, the_task, texts, dtype, weights=digest)
            folder.inputs = digests["all"]  # what a stage reads unless it says otherwise
        result = _analyse(net, the_task, texts, folder, step, config, progress, digests)
        found = lc = None
        if circuits:
            with step("circuits"):
                found = report_circuits.report_stage(net, the_task, folder, config, progress)
        if long_context is not None:
            with step("long context"):
                from headlens.reporting.longcontext import run_long_context

                lc = folder.stage("long_context", lambda: run_long_context(net, long_context, seed, progress))
        rep = world.on_main(lambda: _finish(net, the_task, texts, config, result, command, folder.local, step, bar,
                                            timings, digests, found, lc))
    except BaseException as e:
        bar.close()
        folder.abandon()  # the finished stages stay for the next run
        if is_disk_full(e):
            raise disk_full_error(folder.out, "; the finished stages are kept in .resume/") from None
        raise
    folder.publish(keep_resume=keep_resume)
    return rep


def _finish(net, the_task, texts, config: dict, result: dict, command, folder: ReportFolder, step, bar,
            timings: dict, digests: dict, circuits_found=None, long_context=None) -> Report:
    """``run.json``, the figures and every file of the report, staged in ``folder`` (rank 0)."""
    run = run_record(net, the_task, texts, config, result, command, folder, digests)
    with step("figures"):
        run["figures"] = _figures(net, texts, result, run, folder.staging / "figures")
        from headlens.reporting.viewer import add_view
        add_view(run, net, _gallery_text(texts), result["heads"], folder.staging)
        if circuits_found is not None:
            from headlens.reporting import circuits as report_circuits

            report_circuits.add_section(circuits_found, run, folder.staging)
    if long_context is not None:
        from headlens.reporting.longcontext import long_context_section

        run.setdefault("sections", []).append(long_context_section(long_context, folder.staging))
    bar.close()
    add_timings(run, timings, folder)
    rep = Report(folder.out, result["heads"], result["clusters"], result["pruning"], result["plan"],
                 {k: folder.out / v for k, v in run["figures"].items()}, run, result["distance"],
                 plan_record(result["plan"], result["plans"], result["pruning_summary"]["recommended"],
                             model=net.cfg.name, n_heads=len(net.head_labels()), task=the_task.name,
                             metric=the_task.metric_name, target=config["prune_target"],
                             floor=config["prune_floor"]))
    write_report_files(rep, folder)
    return rep


def _load_model(model, dtype: str, device: str, device_map=None, max_memory=None):
    from headlens.model.transformer import HeadlensModel

    if isinstance(model, HeadlensModel):
        return model
    from headlens.io.loading import load

    return load(model, dtype=parse_dtype(dtype), device=None if device_map is not None else device,
                device_map=device_map, max_memory=max_memory)


def _load_task(model, task, metric: Optional[str], n_examples: int):
    """The task (default: the model's bundled one); ``metric`` picks a text-task type (``lm``,
    ``mlm``, ``fidelity``), a fidelity measure (``kl``, ``cosine``) or the task's own metric option
    (``logit_diff``, ``accuracy``, ``cosine_margin``)."""
    from headlens.importance.tasks import TEXT_TASKS, default_task_name, load_task

    kwargs = {}
    if metric in TEXT_TASKS:
        kwargs["task_type"] = metric
    elif metric in ("kl", "cosine"):
        kwargs.update(task_type="fidelity", measure=metric)
    elif metric is not None:
        kwargs["metric"] = metric
    source = task if task is not None else default_task_name(model)
    try:
        return load_task(source, model=model, n_examples=n_examples, **kwargs)
    except TypeError as e:  # an option the task's class does not take
        raise HeadlensError(f"metric {metric!r} does not apply to task {source!r}: {e}") from None


def _pattern_texts(model, n: int) -> list:
    """The bundled sentences; repeated random tokens (as lists of ids) for a model without a
    tokenizer."""
    from headlens.data.corpora import bundled_sentences
    from headlens.model.tokens import induction_tokens

    if model.tokenizer is None:
        return induction_tokens(model, n, seed=1)[0].tolist()
    return bundled_sentences(n)


def _analyse(model, task, texts, folder: RankFolder, step, config: dict, progress: bool, digests: dict) -> dict:
    """Scores, roles, clusters, importance, gradients and pruning, each saved in ``folder`` for resume
    under the digest of its inputs (``digests``, see :func:`headlens.reporting.run_record.input_digests`).
    The single-head sweep runs once: its per-example metrics give the importance table (all
    examples) and the pruning curve's ablation order (the selection split's examples)."""
    from headlens.importance.gradients import gradient_importance
    from headlens.importance.statistics import importance_table, spearman_ci
    from headlens.importance.sweep import sweep_metrics
    from headlens.patterns.clusters import HeadClusterer
    from headlens.patterns.roles import assign_roles
    from headlens.patterns.scores import pattern_scores
    from headlens.reporting.evidence import (
        reproducibility,
        sweep_power,
        sweep_statistics,
        task_controls,
        task_power,
    )

    seed, batch_size = config["seed"], config["batch_size"]
    with step("pattern scores"):
        scores = folder.stage("scores", lambda: pattern_scores(model, texts, batch_size=batch_size, seed=seed,
                                                               progress=progress, truncate=config["truncate"]),
                              digests["patterns"])
        roles = assign_roles(scores)
    with step("clusters"):
        clusterer = folder.stage("clusters", lambda: HeadClusterer(
            n_clusters=config["n_clusters"], seed=seed, batch_size=batch_size, progress=progress,
            truncate=config["truncate"],
        ).fit(model, texts, scores=roles), digests["patterns"], {"HeadClusterer": HeadClusterer})
    with step("controls"):  # before the sweep: does the task need attention, are there enough examples?
        controls = folder.stage("controls", lambda: task_controls(model, task, config["ablation"], batch_size),
                                digests["task_key"])
        power = task_power(controls, config, len(model.head_labels()))
    with step("ablation sweep"):
        metrics = folder.stage("ablation", lambda: sweep_metrics(
            model, task, ablation=config["ablation"], seed=seed, batch_size=batch_size,
            resume_dir=folder.sweep_resume_dir(digests["task_key"]), progress=progress,
            weights_key=digests["weights"]), digests["task_key"])
        sweep = importance_table(*metrics, task, n_bootstrap=config["n_bootstrap"], seed=seed)
        power = sweep_power(power, metrics)
    with step("gradient importance"):
        grads = folder.stage("gradients", lambda: gradient_importance(model, task, batch_size=batch_size,
                                                                       progress=progress), digests["task_key"])
    with step("pruning curve"):
        pruning = folder.stage("pruning", lambda: _prune(model, task, texts, config, metrics, progress), digests["all"])
    heads = (roles.merge(clusterer.labels_, on=["layer", "head"])
             .merge(sweep.drop(columns=["metric_clean", "n_examples"]), on=["layer", "head"])
             .merge(grads[["layer", "head", "grad_importance", "grad_importance_raw"]], on=["layer", "head"]))
    first = ["layer", "head", "role", "pattern_class", "cluster", "importance", "importance_se",
             "importance_ci_low", "importance_ci_high", "p_value", "q_value", "p_holm", "damage", "metric_ablated",
             "grad_importance", "grad_importance_raw"]
    score_cols = [c for c in heads if c.startswith("score_")]
    rest = [c for c in heads if c not in first and c not in score_cols]
    heads = heads[first + rest + score_cols].sort_values(["layer", "head"], ignore_index=True)
    clusters = clusterer.table_.sort_values("cluster", ignore_index=True)
    names = [head_label(layer, head) for layer, head in model.head_labels()]
    distance = pd.DataFrame(clusterer.distance_, index=pd.Index(names, name="head"), columns=names)
    results = dict(statistics=sweep_statistics(sweep, seed), power=power,
                   controls={k: v for k, v in controls.items() if k != "clean"},
                   reproducibility=reproducibility(task, texts, config, pruning, PRUNE_SPLIT),
                   grad_vs_ablation=spearman_ci(heads.grad_importance_raw, heads.importance.abs(), seed=seed))
    return dict(heads=heads, clusters=clusters, distance=distance.reset_index(), pruning=pruning["curve"],
                plan=pruning["plan"], plans=pruning["plans"],
                pruning_summary=pruning["summary"], clusterer=clusterer,
                clean_metric=float(sweep["metric_clean"].iloc[0]), results=results)


def _selection_sweep(task, metrics: tuple, seed: int):
    """The pruning curve's ablation sweep: the full task's per-example metrics ``(heads, clean
    [N], {head: [N]})`` restricted to the examples of its selection split (no second sweep; a
    mean ablation's mean and resample's donors thus come from all examples)."""
    from headlens.importance.statistics import importance_table
    from headlens.pruning.curve import selection_split

    heads, clean, ablated = metrics
    select, _, rows = selection_split(task, PRUNE_SPLIT, seed)
    return importance_table(heads, clean[rows], {h: v[rows] for h, v in ablated.items()}, select, n_bootstrap=0)


def _prune(model, task, texts, config: dict, metrics: tuple, progress: bool) -> dict:
    """Pruning curves of the three methods (the ablation order from the sweep's ``metrics``), the
    recommended plan, and what removing its heads physically saves (parameters, forward time)."""
    from headlens.pruning.curve import pruning_curve
    from headlens.pruning.physical import measure_speedup, prune_heads, pruning_refusal

    res = pruning_curve(model, task, target=config["prune_target"], floor=config["prune_floor"],
                        split=PRUNE_SPLIT, seed=config["seed"], ablation=config["ablation"],
                        batch_size=config["batch_size"], sweep=_selection_sweep(task, metrics, config["seed"]),
                        progress=progress)
    curve = res.curve.sort_values(["method", "seed", "n_pruned"], ignore_index=True, na_position="first")
    plan = {str(layer): heads for layer, heads in sorted(res.plan.items()) if heads}
    at = {m: int(sum(len(h) for h in p.values())) for m, p in res.plans.items()}
    summary = dict(recommended=res.recommended, floor=config["prune_floor"], target=config["prune_target"],
                   n_heads=len(model.head_labels()), unpruned=float(res.curve.attrs.get("unpruned", np.nan)),
                   n_selection=res.curve.attrs.get("n_selection"), n_heldout=res.curve.attrs.get("n_heldout"),
                   methods={m: dict(n_pruned=n, metric=_curve_metric(curve, m, n)) for m, n in at.items()})
    for m, extra in res.stats.get("methods", {}).items():
        summary["methods"].setdefault(m, {}).update(extra)
    summary.update({k: v for k, v in res.stats.items() if k != "methods"})
    if plan and pruning_refusal(model):
        summary["physical_refused"] = pruning_refusal(model)
    elif plan:
        batch = encode(model, texts[:8], truncate=True)
        with torch.no_grad():
            summary["physical"] = measure_speedup(model, prune_heads(model, plan), batch, repeats=10, warmup=2)
    return dict(curve=curve, plan=plan, plans=res.plans, summary=summary)


def _curve_metric(curve: pd.DataFrame, method: str, n: int) -> float:
    """Held-out metric of ``method`` with ``n`` heads removed (random: mean over seeds)."""
    return float(curve[(curve.method == method) & (curve.n_pruned == n)].metric.mean())


def _figures(model, texts, result: dict, run: dict, folder: Path) -> dict:
    """Draw every figure (PNG + SVG) into ``folder``; returns name -> PNG path relative to the report."""
    from headlens.reporting.figures import importance as fi
    from headlens.reporting.figures import patterns as fg

    scored = render.damage_frame(Report(folder, result["heads"], None, None, {}, {}, run))
    metric = run["data"].get("metric") or "metric"
    columns = [c for c in SCORE_FIGURES if c in scored and scored[c].notna().all()]
    paths = fg.cluster_figures(model, result["clusterer"], _gallery_text(texts), str(folder),
                               score_columns=columns)
    paths["importance"] = fi.importance_heatmap(scored, str(folder / "importance"), metric=metric)
    paths["grad_vs_ablation"] = fi.importance_scatter(scored, str(folder / "grad_vs_ablation"))
    paths["pruning_curve"] = fi.pruning_plot(result["pruning"], str(folder / "pruning_curve"), metric=metric,
                                             clean=result["pruning_summary"]["unpruned"])
    return {name: f"figures/{Path(p[0]).name}" for name, p in paths.items()}


def _gallery_text(texts: list):
    """A sentence of middling length for the pattern gallery (readable token labels)."""
    if not all(isinstance(t, str) for t in texts):
        return texts[0]
    return min(texts, key=lambda t: (abs(len(t.split()) - 14), t))
