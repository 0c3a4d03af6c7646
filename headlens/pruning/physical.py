"""Physical pruning: a smaller model with heads' weights removed, and what it saves.

Removing head ``h`` of layer ``l`` deletes its slices of ``W_Q [D, H, d]`` and ``b_Q``, and of
``W_O [H, d, D]``; under grouped-query attention a key/value head (``W_K``/``W_V``/biases) goes
only when none of its query heads remains. The pruned model's ``cfg.kept_heads`` lists the
original ids of the heads each layer keeps; its outputs equal the full model's with those heads
gated to 0 (``b_O`` stays). A layer may lose every head: its attention then outputs ``b_O``.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from headlens.errors import check
from headlens.model.heads import keep_heads, resolve_heads
from headlens.model.transformer import HeadlensModel
from headlens.pruning.plans import as_plan, plan_heads


def normalize_plan(model, plan) -> dict:
    """A plan (``{layer: [heads]}`` with int or JSON string keys, a ``prune_plan.json`` record or
    its path, see :mod:`headlens.pruning.plans`) -> ``{int: sorted [int]}``, every head checked
    against the model."""
    heads = plan_heads(plan)
    return as_plan(resolve_heads(model, heads)) if any(heads.values()) else {}


def pruning_refusal(model) -> Optional[str]:
    """Why ``model``'s heads cannot be removed physically, in one line (None: they can). A QK-norm
    over the whole query/key projection (OLMo 2) couples the heads: without one head's weights
    every other head's queries and keys change, so the smaller model would not equal the gated one."""
    if model.cfg.qk_norm == "projection":
        return (f"cannot physically prune this {model.cfg.family} model: its QK-norm normalises the whole "
                "query/key projection, so removing a head changes every other head's queries and keys "
                "(gate or ablate the heads instead)")
    return None


def prune_heads(model: HeadlensModel, plan) -> HeadlensModel:
    """A new model without the heads in ``plan`` (``{layer: [original head ids]}``, a
    ``prune_plan.json`` record or its path; see :func:`normalize_plan`); the input
    model is not changed and shares no tensor with the result."""
    plan = normalize_plan(model, plan)
    cfg = model.cfg
    refusal = pruning_refusal(model)
    check(not plan or refusal is None, refusal or "")
    kept = [[h for h in cfg.heads_in_layer(layer) if h not in plan.get(layer, [])]
            for layer in range(cfg.n_layers)]
    if not (plan or cfg.is_pruned):
        kept = None
    return keep_heads(model, kept)


def parameter_count(model) -> int:
    """Number of parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _timed(model, batch) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(batch)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def measure_speedup(model, pruned, batch, repeats: int = 10, warmup: int = 2) -> dict:
    """Parameters and forward time of ``model`` and ``pruned`` on ``batch`` (a batch dict or
    ``[B, P]`` token ids): medians of ``repeats`` after ``warmup``, the two models alternating so
    that both see the same machine load; ``speedup`` is the ratio of the medians, ``speedup_median``
    the median of the per-repeat ratios with their 10th-90th percentiles ``speedup_low, speedup_high``."""
    check(repeats >= 1 and warmup >= 0, "repeats must be >= 1 and warmup >= 0")
    times = {"full": [], "pruned": []}
    for i in range(warmup + repeats):
        for name, m in (("full", model), ("pruned", pruned)):
            t = _timed(m, batch)
            if i >= warmup:
                times[name].append(t)
    t_full, t_pruned = float(np.median(times["full"])), float(np.median(times["pruned"]))
    n_full, n_pruned = parameter_count(model), parameter_count(pruned)
    ratios = np.array(times["full"]) / np.array(times["pruned"])  # per repeat: the same machine load
    low, high = np.quantile(ratios, [0.1, 0.9])
    return {"heads_full": model.cfg.n_heads_total, "heads_pruned": pruned.cfg.n_heads_total,
            "params_full": n_full, "params_pruned": n_pruned, "param_fraction": n_pruned / n_full,
            "time_full_ms": 1e3 * t_full, "time_pruned_ms": 1e3 * t_pruned, "speedup": t_full / t_pruned,
            "speedup_median": float(np.median(ratios)), "speedup_low": float(low), "speedup_high": float(high),
            "repeats": repeats, "spread": "10th-90th percentile of the per-repeat ratios"}
