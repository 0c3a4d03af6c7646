"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024) scores for every
edge of the residual-stream graph (:mod:`headlens.circuits.graph`): input/head/MLP -> head q, k, v,
MLP and logits.

``score(u -> v) = sum over positions of (a_u,source - a_u,base) . dM/dx_v``, averaged over examples:
a first-order estimate of ``M(v reads u's source output) - M(base)``. ``direction="noise"`` (default:
Hanna et al.'s form) takes the clean run as the base and the corrupted one as the source, so a score
estimates the metric change when that edge alone is corrupted; ``"denoise"`` swaps them
(TransformerLens' ``attribution_patch(..., granularity="edge")`` convention). EAP takes the gradient
at the base run; EAP-IG averages it over ``steps`` runs whose input embeddings are interpolated from
the source to the base input, ``x_source + (k / steps) (x_base - x_source)``, ``k = 1..steps``. Every
receiver's gradient comes from the same backward pass (one per step and batch), through the zero taps
of :func:`headlens.circuits.graph.graph_forward`; no parameter gets a ``.grad``.

``edges_`` (one row per edge, strongest ``|score|`` first): ``sender, receiver, sender_layer,
sender_head, receiver_layer, receiver_head, via, score, rank``; ``scores_ [n_s, n_r]`` (0 off the
graph); ``metric_base_``, ``metric_source_`` (means over examples) and :meth:`estimate`, the linear
estimate of a circuit's metric.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.circuits.graph import EdgeGraph, graph_forward
from headlens.circuits.runs import circuit_batches, split_inputs
from headlens.errors import check

METHODS = ("eap", "eap-ig")


class EdgeAttribution:
    """EAP / EAP-IG edge scores. Parameters: ``method`` (``eap`` or ``eap-ig``), ``steps`` (IG steps),
    ``direction`` (``noise`` or ``denoise``), ``batch_size``, ``progress``."""

    def __init__(self, method: str = "eap-ig", steps: int = 5, direction: str = "noise", batch_size: int = 8,
                 progress: bool = False):
        self.method, self.steps, self.direction = method, steps, direction
        self.batch_size, self.progress = batch_size, progress

    def fit(self, model, task) -> "EdgeAttribution":
        check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        graph = EdgeGraph.of(model)
        task, batches = circuit_batches(model, task, self.batch_size, "edge attribution")
        alphas = [1.0] if self.method == "eap" else [k / self.steps for k in range(1, self.steps + 1)]
        total = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
        base_metric, source_metric = [], []
        n_receivers = len(graph.receivers)
        for batch in tqdm(batches, desc=f"{self.method} edge scores", disable=not self.progress, leave=False):
            base, source = split_inputs(batch, self.direction)
            ref = task.reference(model, batch)
            with torch.no_grad():
                hidden, trace = graph_forward(model, graph, base)
                a_base = trace.outputs
                base_metric.append(task.compute(model, hidden, batch, ref).double().cpu())
                hidden, trace = graph_forward(model, graph, source)
                a_source = trace.outputs
                source_metric.append(task.compute(model, hidden, batch, ref).double().cpu())
            grads = torch.zeros(*a_base.shape[:2], n_receivers, a_base.shape[-1], dtype=a_base.dtype,
                                device=a_base.device)
            x_base, x_source = a_base[:, :, 0], a_source[:, :, 0]
            for alpha in alphas:
                x0 = x_source + alpha * (x_base - x_source)
                with torch.enable_grad():
                    hidden, trace = graph_forward(model, graph, residual=x0,
                                                  attention_mask=base.get("attention_mask"), taps=True)
                    metric, taps = task.compute(model, hidden, batch, ref).sum(), trace.taps
                    g = torch.autograd.grad(metric, [taps[j] for j in range(n_receivers)], allow_unused=True)
                for j, gj in enumerate(g):
                    if gj is not None:
                        grads[:, :, j] += gj / len(alphas)
            total += torch.einsum("rpsD,rpnD->sn", a_source - a_base, grads).double().cpu()
        scores = torch.where(graph.allowed, total / len(task), torch.zeros_like(total))
        self.graph_, self.scores_ = graph, scores
        self.metric_base_ = float(torch.cat(base_metric).mean())
        self.metric_source_ = float(torch.cat(source_metric).mean())
        self.n_examples_ = len(task)
        self.edges_ = self._table(graph, scores)
        return self

    def _table(self, graph: EdgeGraph, scores: torch.Tensor) -> pd.DataFrame:
        s, r = graph.allowed.nonzero(as_tuple=True)
        values = scores[s, r].numpy()
        table = pd.DataFrame({
            "sender": [graph.sender_name(i) for i in s.tolist()],
            "receiver": [graph.receiver_name(j) for j in r.tolist()],
            "sender_layer": [graph.senders[i][1] for i in s.tolist()],
            "sender_head": [graph.senders[i][2] for i in s.tolist()],
            "receiver_layer": [graph.receivers[j][1] for j in r.tolist()],
            "receiver_head": [graph.receivers[j][2] for j in r.tolist()],
            "via": [graph.receivers[j][0] for j in r.tolist()],
            "score": values, "_s": s.numpy(), "_r": r.numpy()})
        order = np.lexsort((table._r.to_numpy(), table._s.to_numpy(), -np.abs(values)))
        table = table.iloc[order].reset_index(drop=True)
        table["rank"] = np.arange(1, len(table) + 1)
        table.attrs.update(method=self.method, steps=self.steps if self.method == "eap-ig" else 1,
                           direction=self.direction, n_examples=self.n_examples_,
                           sign="score ~ M(edge takes its source value) - M(base)")
        return table.drop(columns=["_s", "_r"])

    def kept(self, n_edges: int) -> torch.Tensor:
        """``[n_s, n_r]`` bool: the ``n_edges`` edges of largest ``|score|`` (ties in graph order)."""
        keep = torch.zeros_like(self.graph_.allowed)
        top = self.edges_.head(int(n_edges))
        index = {name: i for i, name in enumerate(self.graph_.sender_name(i) for i in range(len(self.graph_.senders)))}
        rindex = {name: j for j, name in enumerate(self.graph_.receiver_name(j)
                                                   for j in range(len(self.graph_.receivers)))}
        for s, r in zip(top.sender, top.receiver):
            keep[index[s], rindex[r]] = True
        return keep

    def estimate(self, kept: torch.Tensor) -> float:
        """The linear estimate of the metric of the circuit ``kept`` (every other edge corrupted, the
        clean input run): noise scores add up the removed edges, denoise scores the kept ones."""
        scores = self.scores_
        if self.direction == "noise":
            return self.metric_base_ + float(scores[self.graph_.allowed & ~kept].sum())
        return self.metric_base_ + float(scores[self.graph_.allowed & kept].sum())
