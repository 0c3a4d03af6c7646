"""Every head's importance alone: exact single-head sweeps with bootstrap confidence intervals.

The fast sweep caches the clean residual stream entering each layer and that layer's clean
attention output; ablating one head changes that output by an exact per-head term, so each
ablation resumes at the layer's MLP, and several single-head ablations run in one forward pass by
stacking copies of the batch, each copy ablating a different head. ``method="naive"`` (one full
forward per head and batch, through :mod:`headlens.importance.ablation`'s hooks) is the reference
it is tested against. Sign convention and shapes: :mod:`headlens.importance.ablation`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.ablation import ABLATIONS, Replacement, ablation_hook, clean_activations, hook_name
from headlens.importance.resume import SweepResume, sweep_fingerprint
from headlens.importance.statistics import importance_table
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index, resolve_heads


# --- sweeps -----------------------------------------------------------------------------------
def _rows_per_chunk(model, task, batches, n_heads: int, memory_budget_mb: float) -> int:
    """How many ablated copies of a batch fit the budget (a rough activation-size estimate)."""
    cfg, b = model.cfg, batches[0]
    R, P = max(x.n_rows for x in batches), b.inputs["input_ids"].shape[1]
    per_row = 4 * P * (6 * cfg.d_model + 2 * max(cfg.d_mlp, 1) + 3 * cfg.n_heads * P)
    return int(max(1, min(n_heads, memory_budget_mb * 2**20 // (R * per_row))))


@torch.no_grad()
def _sweep_fast(model, task, batches, pairs, ablation, repl_args, refs, store, bar, memory_budget_mb):
    """Per layer: one clean pass records the layer's ``z``, ``v`` and attention output and steps
    the cached residual stream. Ablating local head ``j`` changes the attention output by
    ``(z_new - z)[:, :, j] @ W_O[j]`` (exact: the output is linear in each head's ``z``), so each
    stacked copy starts at the layer's MLP and runs only what follows."""
    results = {}
    by_layer = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    resid = [model(b.inputs, stop_at_layer=0) for b in batches]
    names = ("z", "attn_out") + (("v",) if ablation == "uniform" else ())
    for layer in range(max(by_layer) + 1):
        heads = by_layer.get(layer, [])
        k = _rows_per_chunk(model, task, batches, max(len(heads), 1), memory_budget_mb)
        todo = []
        for chunk in [heads[i:i + k] for i in range(0, len(heads), k)]:
            done = store.load(layer, chunk) if store else None
            if done is not None:
                results.update({(layer, h): done[j] for j, h in enumerate(chunk)})
                bar.update(len(chunk))
            else:
                todo.append(chunk)
        acts, nxt = clean_activations(model, batches, layer, resid, names if todo else ())
        repl = Replacement(model, ablation, batches, acts.get("z"), **repl_args) if todo else None
        attn = model.blocks[layer].attn
        for chunk in todo:
            local = [local_index(model, layer, h) for h in chunk]
            values = [[] for _ in chunk]
            for i, b in enumerate(batches):
                R, z = b.n_rows, acts["z"][i]
                v = acts["v"][i] if ablation == "uniform" else None
                attn_out = torch.cat([acts["attn_out"][i] + (repl.head_z(i, j, v, attn) - z[:, :, j]) @ attn.W_O[j]
                                      for j in local])  # [len(chunk) * R, P, D]
                x = model.blocks[layer](resid[i].repeat(len(chunk), 1, 1), None, attn_out=attn_out)
                hidden = model(residual=x, attention_mask=b.inputs["attention_mask"].repeat(len(chunk), 1),
                               start_at_layer=layer + 1, return_type="hidden")
                for c in range(len(chunk)):
                    values[c].append(task.compute(model, hidden[c * R:(c + 1) * R], b, refs[i]).double().cpu())
            values = np.stack([torch.cat(v).numpy() for v in values])
            if store:
                store.save(layer, chunk, values)
            results.update({(layer, h): values[j] for j, h in enumerate(chunk)})
            bar.update(len(chunk))
        resid = nxt
    return results


@torch.no_grad()
def _sweep_naive(model, task, batches, pairs, ablation, repl_args, refs, store, bar):
    results, repl, repl_layer = {}, None, None
    for layer, head in pairs:
        done = store.load(layer, [head]) if store else None
        if done is None:
            if repl_layer != layer:
                zs = clean_activations(model, batches, layer)[0]["z"] if ablation in ("mean", "resample") else None
                repl, repl_layer = Replacement(model, ablation, batches, zs, **repl_args), layer
            vals = []
            for i, b in enumerate(batches):
                hook = (hook_name(ablation, layer), ablation_hook(ablation, [[local_index(model, layer, head)]],
                                                              b.n_rows, repl.value(i)))
                with model.hooks(fwd_hooks=[hook]):
                    hidden = model(b.inputs, return_type="hidden")
                vals.append(task.compute(model, hidden, b, refs[i]).double().cpu())
            done = torch.cat(vals).numpy()[None]
            if store:
                store.save(layer, [head], done)
        results[(layer, head)] = done[0]
        bar.update(1)
    return results


def sweep_metrics(model, task, ablation: str = "zero", heads=None, method: str = "fast", seed: int = 0,
                  resume_dir=None, batch_size: int = 16, per_position: bool = True,
                  memory_budget_mb: float = 512, progress: bool = True) -> tuple[list, np.ndarray, dict]:
    """Ablate each head alone and keep every example's metric: ``(heads, clean [N], ablated
    {(layer, head): [N]})``, examples in the task's order. The arguments are
    :func:`ablation_sweep`'s; a subset of examples gives that subset's table through
    :func:`importance_table`."""
    check(ablation in ABLATIONS, f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    check(method in ("fast", "naive"), f"method must be 'fast' or 'naive', got {method!r}")
    check(memory_budget_mb > 0, f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    task = load_task(task, model)
    pairs = resolve_heads(model, heads)
    batches = task.batches(model, batch_size)
    store = None
    if resume_dir is not None:
        store = SweepResume(resume_dir, sweep_fingerprint(
            model, task, ablation=ablation, method=method, seed=seed, batch_size=batch_size,
            per_position=per_position, memory_budget_mb=memory_budget_mb, heads_swept=repr(pairs)))
    refs, clean = [], []
    with torch.no_grad():
        for b in batches:  # one unablated forward per batch: the clean metric and the reference
            hidden = model(b.inputs, return_type="hidden")
            refs.append(hidden if task.needs_reference else None)
            clean.append(task.compute(model, hidden, b, refs[-1]).double().cpu().numpy())
    clean = np.concatenate(clean)
    repl_args = dict(per_position=per_position, seed=seed)
    with tqdm(total=len(pairs), desc=f"{ablation} ablation sweep", disable=not progress, leave=False) as bar:
        if method == "fast":
            results = _sweep_fast(model, task, batches, pairs, ablation, repl_args, refs, store, bar, memory_budget_mb)
        else:
            results = _sweep_naive(model, task, batches, pairs, ablation, repl_args, refs, store, bar)
    return pairs, clean, results


def ablation_sweep(model, task, ablation: str = "zero", heads=None, method: str = "fast",
                   n_bootstrap: int = 1000, seed: int = 0, resume_dir=None, batch_size: int = 16,
                   per_position: bool = True, memory_budget_mb: float = 512, progress: bool = True) -> pd.DataFrame:
    """Ablate each head alone; one row per head: ``layer, head, importance, importance_se,
    importance_ci_low, importance_ci_high, damage, metric_clean, metric_ablated, n_examples``.

    ``ablation``: zero / mean / resample / uniform (see the module doc; ``per_position`` and ``seed``
    configure mean and resample). ``method``: ``"fast"`` (cached residuals, ablations stacked
    along the batch up to ``memory_budget_mb``) or ``"naive"`` (one forward per head and batch).
    CIs: percentile bootstrap over examples (``n_bootstrap`` resamples, ``seed``; 0 skips).
    ``resume_dir``: finished heads are saved there as they complete; re-running the same
    sweep resumes and recomputes nothing finished. Per-example metrics: :func:`sweep_metrics`."""
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    task = load_task(task, model)
    pairs, clean, results = sweep_metrics(model, task, ablation, heads, method, seed, resume_dir, batch_size,
                                          per_position, memory_budget_mb, progress)
    table = importance_table(pairs, clean, results, task, n_bootstrap, seed)
    table.attrs.update(ablation=ablation, method=method)
    return table
