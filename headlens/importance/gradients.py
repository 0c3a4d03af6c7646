"""Gradient estimates of head importance, all heads from one backward pass per batch.

- :func:`gradient_importance`: Michel et al. 2019's head-mask importance ``I_h = E_x |g_h dL(x)/dg_h|``
  at ``g = 1`` (or at a given mask): the absolute value per example (or, ``absolute="batch"``,
  per batch as in transformers' ``run_bertology.py``), with optional per-layer L2 normalisation. ``L`` is the
  task's loss (its metric, negated when higher is better). The gradient is taken with
  ``torch.autograd.grad`` w.r.t. the gate only: no parameter accumulates a ``.grad``.
- :func:`attribution_patching` (Nanda 2023): first-order estimate of each head's patching effect,
  ``(z_corr - z_clean) . dM/dz`` at the clean run, summed over positions and ``d_head`` and
  averaged over examples: an estimate of ``metric(patched) - metric(clean)``, i.e. of the
  ablation sweep's ``importance`` with the same sign convention.
- :func:`compare_with_ablation`: both next to the exact sweep, with Spearman rank correlations.
"""
from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.errors import HeadlensError, check
from headlens.importance.ablation import Replacement, z_means
from headlens.importance.statistics import spearman
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index
from headlens.runtime import current_world

CORRUPTIONS = ("corrupted", "zero", "mean", "resample")


def _head_table(model, values: torch.Tensor, column: str) -> pd.DataFrame:
    """``values [L, max H]`` in local head order -> tidy table in original head ids."""
    rows = [(layer, head, float(values[layer, local_index(model, layer, head)]))
            for layer, head in model.head_labels()]
    return pd.DataFrame(rows, columns=["layer", "head", column])


ABSOLUTE = ("example", "batch")


def gradient_importance(model, task, normalize: bool = True, reduce: str = "mean", head_mask=None,
                        batch_size: int = 16, absolute: str = "example", progress: bool = False) -> pd.DataFrame:
    """Michel et al. head importance; one row per head: ``layer, head, grad_importance,
    grad_importance_raw``. ``normalize``: divide each layer's scores by their L2 norm
    (``grad_importance``; the raw value stays in ``grad_importance_raw``). ``reduce``: ``"mean"``
    (per example) or ``"sum"`` over the data. ``head_mask [L, max H]`` (local head order, 1 keep,
    0 pruned): the gate at which the gradient is taken (iterative pruning). ``absolute``: where
    the absolute value is taken: per ``"example"`` (Michel et al.'s ``E_x |dL(x)/dg|``; does not
    depend on ``batch_size``) or per ``"batch"`` (transformers' ``run_bertology.py``).

    Each example gets its own copy of the gate (a per-example ``head_gate [R, L, H]``), so one
    backward per batch yields every example's gradient.

    In a multi-process job (:mod:`headlens.runtime.distributed`) the batches are shared out over
    the ranks. Note: a fidelity task (KL to the unablated model) has zero gradient at ``g = 1``."""
    check(reduce in ("mean", "sum"), f"reduce must be 'mean' or 'sum', got {reduce!r}")
    check(absolute in ABSOLUTE, f"absolute must be one of {ABSOLUTE}, got {absolute!r}")
    task = load_task(task, model)
    L, H = model.cfg.n_layers, max(max(b.attn.n_heads for b in model.blocks), 1)
    dtype = torch.promote_types(model.dtype, torch.float32)
    gate = torch.ones(L, H, dtype=dtype, device=model.device) if head_mask is None else torch.as_tensor(
        head_mask, dtype=dtype, device=model.device).clone()
    check(tuple(gate.shape) == (L, H), f"head_mask must have shape {(L, H)}, got {tuple(gate.shape)}")
    check(bool(torch.isfinite(gate).all()), "head_mask holds NaN or infinite values")
    sign = -1.0 if task.higher_is_better else 1.0
    batches, world = task.batches(model, batch_size), current_world()
    bar = tqdm(total=len(batches), desc="gradient importance", disable=not progress or not world.is_main, leave=False)

    def batch_total(i: int) -> torch.Tensor:  # [L, H]
        batch = batches[i]
        ref = task.reference(model, batch)
        g = gate.expand(batch.n_rows, L, H).clone().requires_grad_(True)  # [R, L, H]: one per example
        with torch.enable_grad():
            hidden = model(batch.inputs, head_gate=g, return_type="hidden")
            loss = sign * task.compute(model, hidden, batch, ref).sum()
            (grad,) = torch.autograd.grad(loss, g)
        per_example = (g.detach() * grad).double().cpu()  # [R, L, H]
        bar.update(world.size)
        return per_example.abs().sum(0) if absolute == "example" else per_example.sum(0).abs()

    total = torch.zeros(L, H, dtype=torch.float64)
    for t in world.map(batch_total, len(batches)):  # summed in batch order: the same on any number of ranks
        total += t
    bar.close()
    raw = total / len(task) if reduce == "mean" else total
    scores = raw / (raw.norm(dim=1, keepdim=True) + 1e-20) if normalize else raw
    table = _head_table(model, scores, "grad_importance")
    table["grad_importance_raw"] = _head_table(model, raw, "x")["x"]
    table.attrs.update(task=task.name, metric=task.metric_name, normalize=normalize, reduce=reduce,
                       absolute=absolute, method="michel2019: |g dL/dg| at the gate, absolute value per " + absolute)
    return table


@torch.no_grad()
def _capture_z(model, inputs) -> list:
    """Clean ``z [R, P, H, d]`` of every layer for one batch."""
    zs = [None] * model.cfg.n_layers

    def save(z, hook):
        zs[int(hook.name.split(".")[1])] = z.clone()

    with model.hooks(fwd_hooks=[(lambda name: name.endswith("attn.hook_z"), save)]):
        model(inputs, return_type=None)
    return zs


def attribution_patching(model, task, corruption: str = "corrupted", per_position: bool = True,
                         seed: int = 0, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """Attribution patching; one row per head: ``layer, head, attribution`` (estimated mean
    ``metric(patched) - metric(clean)``). ``corruption``: ``"corrupted"`` (the task's
    counterfactual inputs, e.g. IOI's ABC prompts: two forwards and one backward per batch) or
    ``"zero"``/``"mean"``/``"resample"`` (the ablation values of :mod:`headlens.importance.ablation`, so the
    estimate approximates that sweep)."""
    check(corruption in CORRUPTIONS, f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    task = load_task(task, model)
    batches = task.batches(model, batch_size)
    L = model.cfg.n_layers
    if corruption == "corrupted" and batches[0].corrupted is None:
        raise HeadlensError(f"task {task.name!r} has no corrupted inputs: use corruption='zero', 'mean' or "
                            "'resample', or give the task counterfactuals (e.g. ContrastTask(corrupted=...))")
    repl = None
    if corruption in ("mean", "resample"):
        means = z_means(model, batches, range(L), per_position) if corruption == "mean" else {}
        per_batch = [_capture_z(model, b.inputs) for b in batches] if corruption == "resample" else None
        repl = [Replacement(model, corruption, batches, per_batch and [z[layer] for z in per_batch], per_position,
                            seed, layer, mean=means.get(layer)) for layer in range(L)]
    world = current_world()
    bar = tqdm(total=len(batches), desc="attribution patching", disable=not progress or not world.is_main, leave=False)

    def batch_totals(i: int) -> list:  # per layer [H]
        batch = batches[i]
        corr = _capture_z(model, batch.corrupted) if corruption == "corrupted" else None
        ref = task.reference(model, batch)
        clean, deltas = [None] * L, [None] * L

        def open_z(z, hook):  # z + 0: a leaf whose gradient is dM/dz through every later path
            layer = int(hook.name.split(".")[1])
            clean[layer] = z.detach()
            deltas[layer] = torch.zeros_like(z, requires_grad=True)
            return z + deltas[layer]

        with torch.enable_grad(), model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), open_z)]):
            hidden = model(batch.inputs, return_type="hidden")
            metric = task.compute(model, hidden, batch, ref).sum()
            grads = torch.autograd.grad(metric, deltas, allow_unused=True)
        out = [torch.zeros(b.attn.n_heads, dtype=torch.float64) for b in model.blocks]
        for layer in range(L):
            if grads[layer] is None:
                continue
            if corruption == "corrupted":
                target = corr[layer]
            elif corruption == "zero":
                target = torch.zeros_like(clean[layer])
            else:
                target = repl[layer].value(i).to(clean[layer].dtype).expand_as(clean[layer])
            out[layer] += ((target - clean[layer]) * grads[layer]).sum((0, 1, 3)).double().cpu()
        bar.update(world.size)
        return out

    total = [torch.zeros(b.attn.n_heads, dtype=torch.float64) for b in model.blocks]
    for part in world.map(batch_totals, len(batches)):  # summed in batch order
        for layer in range(L):
            total[layer] += part[layer]
    bar.close()
    H = max(max(b.attn.n_heads for b in model.blocks), 1)
    values = torch.zeros(L, H, dtype=torch.float64)
    for layer, t in enumerate(total):
        values[layer, :len(t)] = t / len(task)
    table = _head_table(model, values, "attribution")
    table.attrs.update(task=task.name, metric=task.metric_name, corruption=corruption,
                       sign="attribution ~ metric(patched) - metric(clean)")
    return table


def compare_with_ablation(sweep: pd.DataFrame, *estimates: pd.DataFrame) -> pd.DataFrame:
    """The ablation ``sweep`` with the estimates' columns added (merged on layer, head) and
    ``attrs["spearman"]`` = {column: Spearman rho with the sweep}. ``grad_importance`` (a
    magnitude; compared raw, since per-layer normalisation reorders across layers) is compared
    with ``|importance|``, ``attribution`` (signed) with ``importance``."""
    table, added = sweep.copy(), []
    for est in estimates:
        cols = [c for c in est.columns if c not in ("layer", "head") and c not in table.columns]
        check(len(cols) > 0, "an estimate has no new columns to compare")
        table = table.merge(est[["layer", "head"] + cols], on=["layer", "head"], how="left")
        added += [c for c in cols if not c.endswith("_raw")]
    rho = {}
    for col in added:
        magnitude = col.startswith("grad_importance")
        x = table[col + "_raw"] if magnitude and col + "_raw" in table else table[col]
        y = table["importance"].abs() if magnitude else table["importance"]
        rho[col] = spearman(x, y)
    table.attrs = dict(sweep.attrs, spearman=rho)
    return table.sort_values(["layer", "head"], ignore_index=True)
