"""What ``run.json`` records about a ``headlens report`` run: the configuration (with keys that
identify a model, task or data given as objects), the content digests of its inputs (the resume
keys of its stages), package versions, platform, and the seconds of every step and every attempt
(see :mod:`headlens.reporting.folder`)."""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import sys
import time
from typing import Optional

import torch

from headlens.reporting.folder import ReportFolder

PACKAGES = ["headlens", "torch", "transformers", "transformer-lens", "scikit-learn", "pandas", "numpy",
            "scipy", "matplotlib", "seaborn"]
FILES = ["heads.csv", "clusters.csv", "pruning.csv", "prune_plan.json", "distance.csv", "figures/", "tables/",
         "report.md", "run.json", "report.html"]


def package_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def as_list(data):
    """Texts or token sequences as a sequence: a ``[N, P]`` tensor as lists of ints, a data file
    or ``datasets`` folder (:mod:`headlens.data.streams`: text, JSONL or Parquet, field ``text``)
    as a column read lazily, a list (or other sequence) as it is, any other iterable as a list."""
    from collections import abc

    from headlens.data.streams import is_data_file, open_texts

    if isinstance(data, torch.Tensor):
        return data.tolist()
    if is_data_file(data):
        return open_texts(data)
    return data if isinstance(data, abc.Sequence) and not isinstance(data, str) else list(data)


def _digest(items) -> str:
    """sha256 of ``repr(list(items))``, computed one item at a time."""
    h = hashlib.sha256(b"[")
    for i, item in enumerate(items):
        h.update(((", " if i else "") + repr(item)).encode())
    h.update(b"]")
    return h.hexdigest()


def model_key(model, digest: Optional[str] = None) -> str:
    """Identify an in-memory model in the configuration: its name and a hash of its config and
    weights (``digest``: :func:`headlens.model.digest.state_digest`, when already computed)."""
    from headlens.model.digest import state_digest

    return f"{model.cfg.name}@{(digest or state_digest(model))[:16]}"


def texts_key(data) -> str:
    """Identify given pattern texts (or token sequences) by their number and a hash."""
    items = as_list(data)
    return f"{len(items)} sequences, sha256 {_digest(items)[:16]}"


def task_key(task) -> str:
    """Identify a Task object: class, name and :func:`headlens.importance.resume.task_digest`
    (every setting and every per-example field, hashed one example at a time)."""
    from headlens.importance.resume import task_digest

    return f"{type(task).__name__} {task.name!r} ({len(task)} examples, sha256 {task_digest(task)[:16]})"


def resume_options(config: dict, model, task, data, resume_format: int) -> dict:
    """The options a resumed run must share with the one it resumes: ``config`` with models,
    tasks and data given as objects named by what they are, not by their content (a changed
    content is recomputed through the stages' input digests, :func:`input_digests`, not refused)."""
    options = dict(config, headlens=package_version("headlens"), resume_format=resume_format)
    if not isinstance(model, str):
        options["model"] = f"{type(model).__name__} {model.cfg.name!r}"
    if task is not None and not isinstance(task, str):
        options["task"] = f"{type(task).__name__} {task.name!r}"
    if data is not None:
        options["data"] = "given"
    return options


def input_digests(source, model, task, texts, dtype, weights: Optional[str] = None) -> dict:
    """sha256 of what the stages read: ``weights`` (of the model's files when it was named by
    a bundled name, folder or file, else of its tensors), ``task`` (every example and setting)
    and ``texts`` (the pattern texts or token sequences); and the stages' resume keys from them:
    ``patterns`` (scores, clusters), ``task_key`` (ablation, gradients) and ``all`` (pruning).
    ``weights``: the weights' digest when the caller has it."""
    from headlens.importance.resume import task_digest
    from headlens.io.digest import source_digest
    from headlens.model.digest import state_digest

    weights = weights or (source_digest(source, dtype) if isinstance(source, str) else None) or state_digest(model)
    digests = dict(weights=weights, task=task_digest(task),
                   texts=_digest(as_list(texts)))

    def key(*parts):
        return hashlib.sha256(" ".join(digests[p] for p in parts).encode()).hexdigest()

    return dict(digests, patterns=key("weights", "texts"), task_key=key("weights", "task"),
                all=key("weights", "task", "texts"))


class StepTimer:
    """Context manager per pipeline step (``with timer("clusters"): ...``): advances the progress
    bar and records the step's seconds (wall and CPU) in ``timings``; a stage resumed from its
    saved stage in ``folder`` counts with the seconds it took when an earlier attempt computed it."""

    def __init__(self, bar, timings: dict, folder: ReportFolder):
        self.bar, self.timings, self.folder = bar, timings, folder

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.bar.set_postfix_str(self.name)
        self.t0, self.c0, self.n_resumed = time.perf_counter(), time.process_time(), len(self.folder.resumed)

    def __exit__(self, *exc):
        saved = [self.folder.seconds[name] for name in self.folder.resumed[self.n_resumed:]]
        self.timings[self.name] = round(time.perf_counter() - self.t0 + sum(s["wall"] for s in saved), 3)
        self.timings[f"{self.name} (cpu)"] = round(time.process_time() - self.c0 + sum(s["cpu"] for s in saved), 3)
        self.bar.update(1)


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="seconds")


def run_record(model, task, texts, config: dict, result: dict, command: Optional[str],
               folder: ReportFolder, digests: dict) -> dict:
    """``run.json`` without figures, tables and timings (:func:`add_timings` adds the timings,
    the pipeline the rest). ``digests``: :func:`input_digests`."""
    cfg = model.cfg
    stability = result["clusterer"].stability_
    return {
        "status": "complete",
        "command": command or "headlens.report(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")",
        "config": config,
        "model": dict(name=cfg.name, family=cfg.family, causal=cfg.causal, n_layers=cfg.n_layers,
                      n_heads=cfg.n_heads, n_heads_total=cfg.n_heads_total, source=cfg.source,
                      n_params=sum(p.numel() for p in model.parameters())),
        "data": dict(pattern_texts=len(texts),
                     pattern_source="headlens/data/text/sentences.txt" if config["data"] is None else "given",
                     task=task.name, task_type=task.task_type, task_examples=len(task), metric=task.metric_name,
                     higher_is_better=bool(task.higher_is_better), clean_metric=result["clean_metric"]),
        "results": dict(cluster_stability_ari=stability.get("ari_mean"), n_clusters=len(result["clusters"]),
                        pruning=result["pruning_summary"], **result.get("results", {})),
        "files": list(FILES),
        "inputs": {k: digests[k] for k in ("weights", "task", "texts")},
        "resumed_stages": folder.resumed,
        "recomputed_stages": dict(damaged=folder.damaged, stale=folder.stale),
        "stage_seconds": folder.seconds,
        "versions": {p: package_version(p) for p in PACKAGES},
        "platform": dict(system=platform.platform(), python=sys.version.split()[0],
                         machine=platform.machine(), torch_threads=torch.get_num_threads()),
        "created": _iso(time.time()),
    }


def add_timings(run: dict, timings: dict, folder: ReportFolder) -> None:
    """Put the steps' seconds into ``run["timings_s"]`` with ``total`` and ``total (cpu)``: the
    seconds of every attempt at the report (a resumed run's true cost), listed in ``attempts``."""
    spent = folder.elapsed()
    run["timings_s"] = {k: round(v, 3) for k, v in dict(timings, total=spent["wall"]).items()}
    run["timings_s"]["total (cpu)"] = spent["cpu"]
    run["attempts"] = [dict(started=_iso(a["started"]), wall_s=a["wall"], cpu_s=a["cpu"]) for a in folder.attempts]
