"""Circuits from edge scores, verified exactly: run the clean input with every edge *outside* the
circuit patched to its sender's corrupted output (Hanna et al. 2024; TransformerLens'
``attribution_patching.faithfulness``), and read how much of the clean - corrupted gap remains.

``faithfulness = (mean M_circuit - mean M_corrupted) / (mean M_clean - mean M_corrupted)`` (1: the
circuit alone does what the model does; 0: no better than the corrupted input), with a 95% paired
bootstrap interval over examples; ``ratio = mean M_circuit / mean M_clean`` is the unnormalised
form (equal to faithfulness when the corrupted metric is 0, as for a logit difference on IOI's ABC
counterfactuals).

:func:`extract_circuit` ranks the edges by ``|score|`` on one part of the task (EAP or EAP-IG, see
:mod:`headlens.circuits.edges`), keeps the top ``n_edges`` or the fewest edges along that ranking whose
exact faithfulness on that part reaches ``target`` (a grid scan, then bisection), and verifies the
circuit on the other, held-out part: the *stated* faithfulness (selection part), the *verified* one
(held-out) and the edge scores' linear *estimate* are reported side by side, with the faithfulness
curve (exact and estimated, against the number of edges) on the held-out part.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.circuits.edges import EdgeAttribution
from headlens.circuits.graph import EdgeGraph, graph_forward
from headlens.circuits.runs import circuit_batches, recovered
from headlens.errors import check
from headlens.importance.tasks import load_task


@torch.no_grad()
def circuit_metrics(model, task, kept: list, batch_size: int = 8, graph: Optional[EdgeGraph] = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact metric per example of each circuit in ``kept`` (``[n_s, n_r]`` bool masks of the kept edges):
    ``(metrics [n_circuits, N], clean [N], corrupted [N])``."""
    graph = graph or EdgeGraph.of(model)
    task, batches = circuit_batches(model, task, batch_size, "circuit verification")
    out, clean, corrupted = [[] for _ in kept], [], []
    for batch in tqdm(batches, desc="exact circuit runs", disable=not progress, leave=False):
        ref = task.reference(model, batch)
        hidden, corr_trace = graph_forward(model, graph, batch.corrupted)
        corrupted.append(task.compute(model, hidden, batch, ref).double().cpu())
        clean.append(task.compute(model, model(batch.inputs, return_type="hidden"), batch, ref).double().cpu())
        for c, keep in enumerate(kept):
            hidden, _ = graph_forward(model, graph, batch.inputs, patched=~keep, replacement=corr_trace)
            out[c].append(task.compute(model, hidden, batch, ref).double().cpu())
    return (np.stack([torch.cat(o).numpy() for o in out]) if kept else np.zeros((0, len(task))),
            torch.cat(clean).numpy(), torch.cat(corrupted).numpy())


def edge_grid(total: int, n_points: int = 12) -> list[int]:
    """Edge counts for a faithfulness curve: 0, then roughly geometric up to ``total``."""
    grid = np.unique(np.round(np.geomspace(1, max(total, 1), n_points)).astype(int))
    return [0] + [int(n) for n in grid if 0 < n <= total]


def _faithfulness(metrics: np.ndarray, clean: np.ndarray, corrupted: np.ndarray, n_bootstrap: int, seed: int):
    return recovered(metrics, clean, corrupted, n_bootstrap, seed)


def _estimated(attribution: EdgeAttribution, kept: torch.Tensor) -> float:
    gap = attribution.metric_base_ - attribution.metric_source_
    clean, corrupted = ((attribution.metric_base_, attribution.metric_source_) if attribution.direction == "noise"
                        else (attribution.metric_source_, attribution.metric_base_))
    return (attribution.estimate(kept) - corrupted) / (clean - corrupted) if gap != 0 else float("nan")


def faithfulness_curve(model, task, attribution: EdgeAttribution, n_edges=None, batch_size: int = 8,
                       n_bootstrap: int = 1000, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Exact faithfulness of the top-``n`` circuit for each ``n`` in ``n_edges`` (default:
    :func:`edge_grid`) on ``task``, next to the edge scores' estimate: ``n_edges, faithfulness,
    ci_low, ci_high, ratio, estimated, metric``."""
    graph = attribution.graph_
    grid = edge_grid(graph.n_edges) if n_edges is None else sorted({int(n) for n in n_edges})
    kept = [attribution.kept(n) for n in grid]
    metrics, clean, corrupted = circuit_metrics(model, task, kept, batch_size, graph, progress)
    rows = []
    for n, keep, m in zip(grid, kept, metrics):
        f, lo, hi = _faithfulness(m, clean, corrupted, n_bootstrap, seed)
        rows.append((n, f, lo, hi, m.mean() / clean.mean(), _estimated(attribution, keep), m.mean()))
    table = pd.DataFrame(rows, columns=["n_edges", "faithfulness", "ci_low", "ci_high", "ratio", "estimated", "metric"])
    table.attrs.update(metric_clean=float(clean.mean()), metric_corrupted=float(corrupted.mean()),
                       n_examples=len(clean), total_edges=graph.n_edges)
    return table


@dataclass
class Circuit:
    """An extracted circuit: its ``edges`` (the rows of ``EdgeAttribution.edges_`` kept), how it was chosen
    and how faithful it is: ``stated`` (exact, on the examples it was chosen on), ``verified`` (exact,
    held out), ``estimated`` (the edge scores' linear estimate); each a dict with ``faithfulness``
    (and ``ci_low``, ``ci_high``, ``n_examples`` for the exact ones). ``curve``: the faithfulness curve
    on the held-out examples; ``scores``: every edge's score (``EdgeAttribution.edges_``)."""

    edges: pd.DataFrame
    total_edges: int
    rule: str
    stated: dict
    verified: dict
    estimated: float
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)
    scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def nodes(self) -> list[str]:
        """The components the circuit's edges join (receivers named without their q / k / v)."""
        names = set(self.edges.sender) | {r.split("<")[0] for r in self.edges.receiver}
        return sorted(names)

    def to_dict(self) -> dict:
        edges = self.edges[["sender", "receiver", "via", "score", "rank"]]
        return dict(rule=self.rule, n_edges=self.n_edges, total_edges=self.total_edges, stated=self.stated,
                    verified=self.verified, estimated=self.estimated, nodes=self.nodes(),
                    edges=json.loads(edges.to_json(orient="records")), **self.meta)


def _exact(model, task, attribution, n: int, batch_size: int, n_bootstrap: int, seed: int) -> dict:
    m, clean, corrupted = circuit_metrics(model, task, [attribution.kept(n)], batch_size, attribution.graph_)
    f, lo, hi = _faithfulness(m[0], clean, corrupted, n_bootstrap, seed)
    return dict(faithfulness=f, ci_low=lo, ci_high=hi, n_examples=len(clean))


def _smallest(model, task, attribution, target: float, batch_size: int, progress: bool) -> int:
    """The fewest top edges whose exact faithfulness on ``task`` reaches ``target``: scan
    :func:`edge_grid`, then bisect between the last grid point below the target and the first above."""
    grid = edge_grid(attribution.graph_.n_edges, 16)
    score = {}

    def faith(n):
        if n not in score:
            score[n] = _exact(model, task, attribution, n, batch_size, 0, 0)["faithfulness"]
        return score[n]

    low = 0
    for n in tqdm(grid, desc="circuit size scan", disable=not progress, leave=False):
        if faith(n) >= target:
            high = n
            break
        low = n
    else:
        return grid[-1]
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if faith(mid) >= target else (mid, high)
    return high


def extract_circuit(model, task, method: str = "eap-ig", steps: int = 5, n_edges: Optional[int] = None,
                    target: Optional[float] = 0.8, split: float = 0.5, batch_size: int = 8, n_bootstrap: int = 1000,
                    seed: int = 0, curve_points: int = 12, progress: bool = False) -> Circuit:
    """Choose a circuit on one part of ``task`` and verify it on the rest (see the module doc).
    ``n_edges``: keep that many top edges; else the fewest reaching ``target`` faithfulness."""
    check(n_edges is not None or target is not None, "give n_edges (top-n) or target (a faithfulness to reach)")
    check(target is None or 0 < target <= 1.5, f"target must be a faithfulness in (0, 1.5], got {target}")
    task = load_task(task, model)
    first, second = task.split_positions(split, seed)
    select, held = task.subset(first), task.subset(second)
    attribution = EdgeAttribution(method, steps, "noise", batch_size, progress).fit(model, select)
    total = attribution.graph_.n_edges
    if n_edges is None:
        n = _smallest(model, select, attribution, target, batch_size, progress)
        rule = f"fewest top-|score| edges reaching faithfulness {target:g} on the selection examples"
    else:
        check(0 <= n_edges <= total, f"n_edges must lie in [0, {total}], got {n_edges}")
        n, rule = int(n_edges), f"top {n_edges} edges by |score|"
    stated = _exact(model, select, attribution, n, batch_size, n_bootstrap, seed)
    grid = sorted(set(edge_grid(total, curve_points)) | {n})
    curve = faithfulness_curve(model, held, attribution, grid, batch_size, n_bootstrap, seed, progress)
    row = curve[curve.n_edges == n].iloc[0]
    verified = dict(faithfulness=float(row.faithfulness), ci_low=float(row.ci_low), ci_high=float(row.ci_high),
                    n_examples=int(curve.attrs["n_examples"]))
    edges = attribution.edges_.head(n).reset_index(drop=True)
    curve = curve.assign(chosen=curve.n_edges == n)
    meta = dict(method=method, steps=steps if method == "eap-ig" else 1, target=target, split=split, seed=seed,
                n_selection=len(select), n_heldout=len(held), task=task.name, metric=task.metric_name)
    return Circuit(edges, total, rule, stated, verified, float(_estimated(attribution, attribution.kept(n))),
                   curve, attribution.edges_, meta)
