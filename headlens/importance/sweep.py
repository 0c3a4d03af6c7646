"""Every head's importance alone: exact single-head sweeps with bootstrap confidence intervals.

The fast sweep caches the clean residual stream entering each layer and that layer's clean
attention output (``attn.hook_out``, before any post-attention norm); ablating one head changes
that output by an exact per-head term, so each ablation resumes there (the post-attention norm,
if any, then the MLP), and several single-head ablations run in one forward pass by
stacking copies of the batch, each copy ablating a different head. ``method="naive"`` (one full
forward per head and batch, through :mod:`headlens.importance.ablation`'s hooks) is the reference
it is tested against. Sign convention and shapes: :mod:`headlens.importance.ablation`.

A unit of the sweep is one head (``units="heads"``) or one key/value head with every query head
that reads it (``units="kv_heads"``: a KV cache decision is made per key/value head). An ablation
that changes only positions from some point on (streaming: from the context end) reruns only those
positions, from a KV cache of the clean pass (:mod:`headlens.model.kv_cache`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.ablation import ablation_hook, as_ablation, clean_activations, hook_name, make_replacement
from headlens.importance.resume import SweepResume, sweep_fingerprint
from headlens.importance.statistics import importance_table
from headlens.importance.streaming import Streaming, first_changed_position
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index, resolve_heads
from headlens.model.kv_cache import KVCache

UNITS = ("heads", "kv_heads")


# --- sweeps -----------------------------------------------------------------------------------
def _rows_per_chunk(model, task, batches, n_heads: int, memory_budget_mb: float, tail: int = 0) -> int:
    """How many ablated copies of a batch fit the budget (a rough activation-size estimate; a
    rerun from position ``tail`` on holds ``P - tail`` queries over ``P`` keys)."""
    cfg, b = model.cfg, batches[0]
    R, P = max(x.n_rows for x in batches), b.inputs["input_ids"].shape[1]
    Q = P - tail
    per_row = 4 * Q * (6 * cfg.d_model + 2 * max(cfg.d_mlp, 1) + 3 * cfg.n_heads * P)
    if tail:
        per_row += 4 * 2 * P * cfg.n_kv_heads * cfg.d_head  # one layer's cache, copied per stacked row
    return int(max(1, min(n_heads, memory_budget_mb * 2**20 // (R * per_row))))


def sweep_units(model, heads=None, units: str = "heads") -> tuple[list, dict]:
    """The sweep's units ``[(layer, id)]`` (ids: original head or key/value head indices) and
    ``{unit: [original query heads]}``. ``heads`` selects query heads (``units="heads"``, see
    :func:`resolve_heads`) or is a list of ``(layer, kv_head)`` (``units="kv_heads"``; None: all)."""
    check(units in UNITS, f"units must be one of {UNITS}, got {units!r}")
    if units == "heads":
        pairs = resolve_heads(model, heads)
        return pairs, {p: [p[1]] for p in pairs}
    cfg = model.cfg
    every = [(layer, kv) for layer in range(cfg.n_layers) for kv in cfg.kv_heads_in_layer(layer)]
    pairs = every if heads is None else sorted({(int(a), int(b)) for a, b in heads})
    bad = sorted(set(pairs) - set(every))
    check(len(pairs) > 0 and not bad, f"kv heads {bad[:3]} do not exist (the model has {every[:3]} ...)")
    return pairs, {(layer, kv): [h for h in cfg.heads_in_layer(layer) if h // cfg.group_size == kv]
                   for layer, kv in pairs}


@torch.no_grad()
def _clean_pass(model, task, batches, starts):
    """One unablated forward per batch: the metric ``[N]``, the references, and for batches whose
    ablations change only positions from ``starts[i]`` on, the frozen KV cache of the earlier
    positions and their final hidden states ``[R, starts[i], D]``."""
    refs, clean, prefixes, heads_before = [], [], [], []
    L = model.cfg.n_layers
    for b, s in zip(batches, starts):
        cache = KVCache(L, frozen=True)
        hooks = []
        if s:
            keys = "rot_k" if model.cfg.positional == "rotary" else "k"  # the cache keeps keys after rotary
            for layer in range(L):
                for kind, store in ((keys, cache.keys), ("v", cache.values)):
                    hooks.append((f"blocks.{layer}.attn.hook_{kind}",
                                  lambda t, hook, store=store, layer=layer: store.__setitem__(layer, t[:, :s].clone())))
        with model.hooks(fwd_hooks=hooks):
            hidden = model(b.inputs, return_type="hidden")
        refs.append(hidden if task.needs_reference else None)
        clean.append(task.compute(model, hidden, b, refs[-1]).double().cpu().numpy())
        prefixes.append(cache if s else None)
        heads_before.append(hidden[:, :s].clone() if s else None)
    return np.concatenate(clean), refs, prefixes, heads_before


@torch.no_grad()
def _sweep_fast(model, task, batches, pairs, members, ablation, repl_args, refs, store, bar, memory_budget_mb,
                starts, prefixes, heads_before):
    """Per layer: one clean pass records the layer's ``z``, ``v`` and attention output and steps
    the cached residual stream. Ablating local head ``j`` changes the attention output by
    ``(z_new - z)[:, :, j] @ W_O[j]`` (exact: the output is linear in each head's ``z``; a unit's
    heads add up; a post-attention norm, Gemma's or OLMo 2's ``ln1_post``, comes after it and runs
    in the block), so each stacked copy starts at the layer's post-attention norm and MLP and runs
    only what follows. Where ``starts[i] > 0`` only positions from there on run, over the clean KV
    cache ``prefixes[i]`` of the earlier ones, whose final hidden states ``heads_before[i]`` are clean."""
    results = {}
    by_layer = {}
    for layer, unit in pairs:
        by_layer.setdefault(layer, []).append(unit)
    resid = [model(_tail(b.inputs, s), attention_mask=b.inputs["attention_mask"], stop_at_layer=0, past_kv=c)
             if s else model(b.inputs, stop_at_layer=0) for b, s, c in zip(batches, starts, prefixes)]
    streaming = isinstance(ablation, Streaming)
    names = ("z", "attn_out") + (("v",) if ablation == "uniform" or streaming else ()) + \
        (("attn_scores",) if streaming else ())
    tail = min(starts)
    for layer in range(max(by_layer) + 1):
        heads = by_layer.get(layer, [])
        k = _rows_per_chunk(model, task, batches, max(len(heads), 1), memory_budget_mb, tail)
        todo = []
        for chunk in [heads[i:i + k] for i in range(0, len(heads), k)]:
            done = store.load(layer, chunk) if store else None
            if done is not None:
                results.update({(layer, h): done[j] for j, h in enumerate(chunk)})
                bar.update(len(chunk))
            else:
                todo.append(chunk)
        acts, nxt = clean_activations(model, batches, layer, resid, names if todo else (), past_kv=prefixes)
        repl = None
        if todo:
            repl = make_replacement(model, ablation, batches, acts.get("z"), layer=layer, **repl_args, **(dict(
                acts=acts, starts=starts, prefix_values=[c.values[layer] if c else None for c in prefixes])
                if streaming else {}))
        attn = model.blocks[layer].attn
        for chunk in todo:
            local = [[local_index(model, layer, h) for h in members[(layer, u)]] for u in chunk]
            values = [[] for _ in chunk]
            for i, b in enumerate(batches):
                R, z, n = b.n_rows, acts["z"][i], len(chunk)
                v = acts["v"][i] if ablation == "uniform" else None
                attn_out = torch.cat([acts["attn_out"][i] + sum((repl.head_z(i, j, v, attn) - z[:, :, j]) @ attn.W_O[j]
                                                                for j in js) for js in local])  # [n * R, P, D]
                x = model.blocks[layer](resid[i].repeat(n, 1, 1), None, attn_out=attn_out)
                hidden = model(residual=x, attention_mask=b.inputs["attention_mask"].repeat(n, 1),
                               start_at_layer=layer + 1, return_type="hidden",
                               past_kv=prefixes[i].repeat(n) if prefixes[i] else None)
                if heads_before[i] is not None:  # the positions before the change are the clean ones
                    hidden = torch.cat([heads_before[i].repeat(n, 1, 1), hidden], dim=1)
                for c in range(len(chunk)):
                    values[c].append(task.compute(model, hidden[c * R:(c + 1) * R], b, refs[i]).double().cpu())
            values = np.stack([torch.cat(v).numpy() for v in values])
            if store:
                store.save(layer, chunk, values)
            results.update({(layer, h): values[j] for j, h in enumerate(chunk)})
            bar.update(len(chunk))
        resid = nxt
    return results


def _tail(inputs: dict, s: int) -> torch.Tensor:
    """The input ids from position ``s`` on, ``[R, P - s]``."""
    return inputs["input_ids"][:, s:]


@torch.no_grad()
def _sweep_naive(model, task, batches, pairs, members, ablation, repl_args, refs, store, bar):
    results, repl, repl_layer = {}, None, None
    for layer, head in pairs:
        done = store.load(layer, [head]) if store else None
        if done is None:
            if repl_layer != layer:
                zs = clean_activations(model, batches, layer)[0]["z"] if ablation in ("mean", "resample") else None
                repl, repl_layer = make_replacement(model, ablation, batches, zs, layer=layer, **repl_args), layer
            vals = []
            local = [local_index(model, layer, h) for h in members[(layer, head)]]
            for i, b in enumerate(batches):
                hook = (hook_name(ablation, layer), ablation_hook(ablation, [local], b.n_rows, repl.value(i)))
                with model.hooks(fwd_hooks=[hook]):
                    hidden = model(b.inputs, return_type="hidden")
                vals.append(task.compute(model, hidden, b, refs[i]).double().cpu())
            done = torch.cat(vals).numpy()[None]
            if store:
                store.save(layer, [head], done)
        results[(layer, head)] = done[0]
        bar.update(1)
    return results


def sweep_metrics(model, task, ablation="zero", heads=None, method: str = "fast", seed: int = 0,
                  resume_dir=None, batch_size: int = 16, per_position: bool = True,
                  memory_budget_mb: float = 512, progress: bool = True, units: str = "heads") -> tuple[list, np.ndarray, dict]:
    """Ablate each head (or key/value head, ``units="kv_heads"``) alone and keep every example's
    metric: ``(units, clean [N], ablated {(layer, id): [N]})``, examples in the task's order. The
    arguments are :func:`ablation_sweep`'s; a subset of examples gives that subset's table
    through :func:`importance_table`."""
    ablation = as_ablation(ablation)
    check(method in ("fast", "naive"), f"method must be 'fast' or 'naive', got {method!r}")
    check(memory_budget_mb > 0, f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    task = load_task(task, model)
    pairs, members = sweep_units(model, heads, units)
    batches = task.batches(model, batch_size)
    store = None
    if resume_dir is not None:
        store = SweepResume(resume_dir, sweep_fingerprint(
            model, task, ablation=str(ablation), method=method, seed=seed, batch_size=batch_size,
            per_position=per_position, memory_budget_mb=memory_budget_mb, heads_swept=repr(pairs),
            **({} if units == "heads" else {"units": units})))
    starts = [first_changed_position(ablation, b) if method == "fast" else 0 for b in batches]
    clean, refs, prefixes, heads_before = _clean_pass(model, task, batches, starts)
    repl_args = dict(per_position=per_position, seed=seed)
    with tqdm(total=len(pairs), desc=f"{ablation} ablation sweep", disable=not progress, leave=False) as bar:
        if method == "fast":
            results = _sweep_fast(model, task, batches, pairs, members, ablation, repl_args, refs, store, bar,
                                  memory_budget_mb, starts, prefixes, heads_before)
        else:
            results = _sweep_naive(model, task, batches, pairs, members, ablation, repl_args, refs, store, bar)
    return pairs, clean, results


def ablation_sweep(model, task, ablation="zero", heads=None, method: str = "fast",
                   n_bootstrap: int = 1000, seed: int = 0, resume_dir=None, batch_size: int = 16,
                   per_position: bool = True, memory_budget_mb: float = 512, progress: bool = True,
                   units: str = "heads") -> pd.DataFrame:
    """Ablate each head alone; one row per head: ``layer, head, importance, importance_se,
    importance_ci_low, importance_ci_high, damage, metric_clean, metric_ablated, n_examples``.

    ``ablation``: zero / mean / resample / uniform / streaming or a
    :class:`headlens.importance.streaming.Streaming` (see :mod:`headlens.importance.ablation`;
    ``per_position`` and ``seed`` configure mean and resample). ``units``: ``"heads"`` or
    ``"kv_heads"`` (rows ``layer, head`` then name the key/value head). ``method``: ``"fast"`` (cached residuals, ablations stacked
    along the batch up to ``memory_budget_mb``) or ``"naive"`` (one forward per head and batch).
    CIs: percentile bootstrap over examples (``n_bootstrap`` resamples, ``seed``; 0 skips).
    ``resume_dir``: finished heads are saved there as they complete; re-running the same
    sweep resumes and recomputes nothing finished. Per-example metrics: :func:`sweep_metrics`."""
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    task = load_task(task, model)
    pairs, clean, results = sweep_metrics(model, task, ablation, heads, method, seed, resume_dir, batch_size,
                                          per_position, memory_budget_mb, progress, units)
    table = importance_table(pairs, clean, results, task, n_bootstrap, seed)
    table.attrs.update(ablation=str(as_ablation(ablation)), method=method, units=units)
    return table
