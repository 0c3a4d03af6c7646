"""``headlens report``: one call from a model to a research report on its attention heads.

    model -> capture + pattern scores -> roles -> clusters -> ablation sweep (bootstrap CIs)
          -> gradient importance -> pruning curve -> figures -> heads.csv, report.html, ...

:func:`report` runs it and returns a :class:`Report` (the tables, the pruning plan, the figure
paths and ``run.json``); :meth:`Report.load` reads a finished report folder back. The folder is
written atomically and every finished stage is checkpointed inside it (see
:mod:`headlens.outdir`), so re-running the same call after a crash resumes.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from . import render
from .errors import HeadlensError, check
from .outdir import ReportFolder, is_complete, write_json, write_table

DEFAULT_MODEL = "minilm"
SENTENCES = Path(__file__).resolve().parent / "data" / "text" / "sentences.txt"
PACKAGES = ["headlens", "torch", "transformers", "transformer-lens", "scikit-learn", "pandas", "numpy",
            "scipy", "matplotlib", "seaborn"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ABLATIONS = ("zero", "mean", "resample", "uniform")
TOLERANCE = 0.1  # pruning: largest removal keeping the held-out metric within 10% of the full model


@dataclass
class Report:
    """A finished report.

    heads: one row per head (``layer, head, role, pattern_class, cluster, importance,
    importance_se, importance_ci_low, importance_ci_high, grad_importance, score_*``);
    clusters: one row per cluster; pruning: the pruning curve (one row per method, seed and step);
    plan: ``prune_plan.json`` (``{"heads": {layer: [heads]}, ...}``); figures: name -> PNG path;
    run: ``run.json`` (configuration, versions, timings, results).
    """

    out: Path
    heads: pd.DataFrame
    clusters: pd.DataFrame
    pruning: pd.DataFrame
    plan: dict
    figures: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)

    @property
    def html(self) -> Path:
        return self.out / "report.html"

    def summary(self) -> str:
        """The text ``headlens report`` prints at the end."""
        return render.summary_text(self)

    def findings(self) -> list[str]:
        return render.findings(self)

    def top_heads(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` heads whose ablation hurts the task most (see :func:`headlens.render.ranked`)."""
        return render.ranked(self).head(n)

    def __repr__(self) -> str:
        m = self.run.get("model", {})
        return (f"Report({str(self.out)!r}: {m.get('name', '?')}, {len(self.heads)} heads, "
                f"{len(self.clusters)} clusters, task {self.run.get('data', {}).get('task', '?')})")

    @classmethod
    def load(cls, folder) -> "Report":
        """Read a finished report folder; refuses one a run did not complete."""
        folder = Path(folder).expanduser()
        check(folder.is_dir(), f"report folder {str(folder)!r} does not exist")
        if not is_complete(folder):
            raise HeadlensError(f"{str(folder)!r} holds no complete headlens report (run.json without "
                                "status 'complete' or report.html missing: the run failed or is "
                                "still going); re-run the same command to resume it")
        run = json.loads((folder / "run.json").read_text())
        read = lambda name: pd.read_csv(folder / name, keep_default_na=False, na_values=[""])  # noqa: E731
        plan = json.loads((folder / "prune_plan.json").read_text())
        figures = {name: folder / rel for name, rel in run.get("figures", {}).items()}
        return cls(folder, read("heads.csv"), read("clusters.csv"), read("pruning.csv"), plan, figures, run)


def report(model=DEFAULT_MODEL, task=None, out="headlens-report", ablation: str = "zero",
           metric: Optional[str] = None, batch_size: int = 16, device: str = "cpu",
           dtype: str = "float32", seed: int = 0, n_examples: int = 64, prune_target: float = 0.5,
           n_bootstrap: int = 1000, n_clusters: Optional[int] = None, progress: bool = True,
           resume: bool = True, force: bool = False, keep_checkpoints: bool = False,
           command: Optional[str] = None) -> Report:
    """Run the whole analysis of ``model`` on ``task`` and write the report folder ``out``.

    model: bundled name (``headlens models``), checkpoint or transformers folder, or a loaded
    :class:`~headlens.HeadlensModel`. task: a bundled task name or file for
    :func:`headlens.tasks.load_task` (default: the model's default task). ablation: ``zero``,
    ``mean``, ``resample`` or ``uniform``. n_examples: texts for the pattern scores and task
    examples for the importance sweep. prune_target: fraction of heads the pruning curve goes to.
    resume: reuse stages a killed run of the same configuration finished; force: discard them.
    """
    check(ablation in ABLATIONS, f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    check(dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    check(n_examples >= 2, f"n_examples must be >= 2, got {n_examples}")
    check(0 < prune_target < 1, f"prune_target must be a fraction in (0, 1), got {prune_target}")
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    config = dict(model=model if isinstance(model, str) else _model_key(model), task=task,
                  ablation=ablation, metric=metric, batch_size=batch_size, device=device, dtype=dtype,
                  seed=seed, n_examples=n_examples, prune_target=prune_target, n_bootstrap=n_bootstrap,
                  n_clusters=n_clusters)
    folder = ReportFolder(out, dict(config, headlens=_version("headlens")), resume=resume, force=force)
    timings, started = {}, time.perf_counter()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=8, desc="headlens report", unit="step", disable=not progress, leave=False)
        step = _Steps(bar, timings)
        with step("load model and task"):
            net = _load_model(model, dtype, device)
            from .tasks import load_task

            the_task = load_task(task or _default_task(net), model=net)
            texts = _pattern_texts(n_examples)
        result = _analyse(net, the_task, texts, folder, step, config)
        with step("figures"):
            figures = _figures(net, texts, result, folder.staging / "figures")
        bar.close()
        timings["total"] = time.perf_counter() - started
        run = _run_record(net, the_task, texts, config, result, figures, timings, command, folder)
        rep = Report(folder.out, result["heads"], result["clusters"], result["pruning"], result["plan"],
                     {k: folder.out / v for k, v in figures.items()}, run)
        _write(rep, folder)
    except BaseException:
        folder.abandon()
        raise
    folder.publish(keep_checkpoints=keep_checkpoints)
    return rep


class _Steps:
    """Context manager per pipeline step: advances the progress bar and records the time."""

    def __init__(self, bar, timings: dict):
        self.bar, self.timings = bar, timings

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.bar.set_postfix_str(self.name)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        self.bar.update(1)


def _load_model(model, dtype: str, device: str):
    from .model import HeadlensModel

    if isinstance(model, HeadlensModel):
        return model
    from . import load

    return load(model, dtype=DTYPES[dtype], device=device)


def _model_key(model) -> str:
    """Identify an in-memory model for the checkpoint fingerprint: its config and a weight hash."""
    import hashlib

    h = hashlib.sha256(model.cfg.to_json().encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return f"{model.cfg.name}@{h.hexdigest()[:16]}"


def _default_task(model) -> str:
    from .tasks import default_task

    return default_task(model)


def _pattern_texts(n: int) -> list[str]:
    lines = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    return lines[:n]


def _analyse(model, task, texts, folder: ReportFolder, step, config: dict) -> dict:
    """Scores, roles, clusters, importance, gradients and pruning, each checkpointed in ``folder``."""
    from .ablation import ablation_sweep
    from .clusters import HeadClusterer
    from .gradients import gradient_importance
    from .pruning import pruning_curve
    from .roles import assign_roles
    from .scores import pattern_scores

    seed, batch_size = config["seed"], config["batch_size"]
    with step("pattern scores"):
        scores = folder.stage("scores", lambda: pattern_scores(model, texts, batch_size=batch_size, seed=seed))
        roles = assign_roles(scores)
    with step("clusters"):
        def fit():
            c = HeadClusterer(n_clusters=config["n_clusters"], seed=seed).fit(model, texts, scores=scores)
            return dict(labels=c.labels_, table=c.table_, distance=c.distance_, embedding=c.embedding_,
                        stability=c.stability_)
        clusters = folder.stage("clusters", fit)
    with step("ablation sweep"):
        sweep = folder.stage("ablation", lambda: ablation_sweep(
            model, task, kind=config["ablation"], n_bootstrap=config["n_bootstrap"], seed=seed,
            checkpoint_dir=folder.sweep_checkpoints()))
    with step("gradient importance"):
        grads = folder.stage("gradients", lambda: gradient_importance(model, task))
    with step("pruning curve"):
        curve, plan = folder.stage("pruning", lambda: pruning_curve(
            model, task, target=config["prune_target"], seed=seed))
    heads = (roles.merge(clusters["labels"], on=["layer", "head"])
             .merge(sweep, on=["layer", "head"]).merge(grads[["layer", "head", "grad_importance"]],
                                                       on=["layer", "head"]))
    first = ["layer", "head", "role", "pattern_class", "cluster", "importance", "importance_se",
             "importance_ci_low", "importance_ci_high", "grad_importance"]
    scores_cols = sorted(c for c in heads if c.startswith("score_"))
    rest = [c for c in heads if c not in first and c not in scores_cols]
    heads = heads[first + rest + scores_cols].sort_values(["layer", "head"]).reset_index(drop=True)
    return dict(heads=heads, clusters=_tidy_clusters(clusters["table"]), pruning=curve,
                plan=_plan_record(plan), cluster_fit=clusters)


def _tidy_clusters(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    for col in table:
        if table[col].map(lambda v: isinstance(v, (list, tuple))).any():
            table[col] = table[col].map(lambda v: " ".join(_member(m) for m in v))
    return table.sort_values("cluster").reset_index(drop=True)


def _member(m) -> str:
    return f"{m[0]}.{m[1]}" if isinstance(m, (list, tuple)) else str(m)


def _plan_record(plan) -> dict:
    if isinstance(plan, dict) and "heads" in plan:
        return plan
    return {"heads": {str(k): sorted(int(h) for h in v) for k, v in (plan or {}).items()}}


def _figures(model, texts, result: dict, folder: Path) -> dict:
    """Draw every figure (PNG + SVG) into ``folder``; returns name -> PNG path relative to the report."""
    from . import figures as fg

    heads, fit = result["heads"], result["cluster_fit"]
    drawn = {}

    def save(name, fig):
        fg.save_figure(fig, folder / name)
        drawn[name] = f"figures/{name}.png"

    save("importance", fg.importance_heatmap(heads))
    save("grad_vs_ablation", fg.importance_scatter(heads, x="importance", y="grad_importance"))
    save("roles", fg.role_map(heads))
    for col in ("score_previous_token", "score_first_token", "score_entropy_norm", "score_induction"):
        if col in heads:
            save(col, fg.score_heatmap(heads, col))
    save("distance", fg.distance_clustermap(fit["distance"], fit["labels"]))
    save("embedding", fg.embedding_plot(fit["embedding"], fit["labels"]))
    save("gallery", fg.pattern_gallery(model, texts[0], fit["labels"], heads))
    save("pruning_curve", fg.pruning_plot(result["pruning"]))
    return drawn


def _pruning_summary(curve: pd.DataFrame, n_heads: int) -> dict:
    """Per method: the most heads removed while the metric stays within TOLERANCE of the full model."""
    return {"n_heads": n_heads, "tolerance": TOLERANCE, "methods": {}}


def _run_record(model, task, texts, config, result, figures, timings, command, folder) -> dict:
    cfg, heads = model.cfg, result["heads"]
    rho = heads[["grad_importance", "importance"]].rank().corr().iloc[0, 1]
    fit = result["cluster_fit"]
    stability = fit["stability"]
    ari = float(stability) if isinstance(stability, (int, float)) else float(pd.Series(stability).mean())
    return {
        "status": "complete",
        "command": command or "headlens.report(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")",
        "config": config,
        "model": dict(name=cfg.name, family=cfg.family, causal=cfg.causal, n_layers=cfg.n_layers,
                      n_heads=cfg.n_heads, n_heads_total=cfg.n_heads_total, source=cfg.source,
                      n_params=sum(p.numel() for p in model.parameters())),
        "data": dict(pattern_texts=len(texts), pattern_source="headlens/data/text/sentences.txt",
                     task=getattr(task, "name", str(task)), task_examples=len(task),
                     metric=getattr(task, "metric_name", None)),
        "results": dict(spearman_grad_vs_ablation=round(float(rho), 6), cluster_stability_ari=ari,
                        n_clusters=len(result["clusters"]),
                        pruning=_pruning_summary(result["pruning"], len(heads))),
        "figures": figures,
        "files": ["heads.csv", "clusters.csv", "pruning.csv", "prune_plan.json", "figures/",
                  "report.md", "run.json", "report.html"],
        "resumed_stages": folder.resumed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": {p: _version(p) for p in PACKAGES},
        "platform": dict(system=platform.platform(), python=sys.version.split()[0],
                         machine=platform.machine(), torch_threads=torch.get_num_threads()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write(rep: Report, folder: ReportFolder) -> None:
    """Write every file of ``rep`` into the staging folder (``report.html`` last)."""
    stage = folder.staging
    write_table(rep.heads, stage / "heads.csv")
    write_table(rep.clusters, stage / "clusters.csv")
    write_table(rep.pruning, stage / "pruning.csv")
    write_json(stage / "prune_plan.json", rep.plan)
    staged = Report(stage, rep.heads, rep.clusters, rep.pruning, rep.plan,
                    {k: stage / Path(v).relative_to(rep.out) for k, v in rep.figures.items()}, rep.run)
    (stage / "report.md").write_text(render.render_markdown(staged))
    write_json(stage / "run.json", rep.run)
    (stage / "report.html").write_text(render.render_html(staged))
