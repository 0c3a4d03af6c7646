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

Scale: the examples are swept in blocks of consecutive batches whose cached activations fit
``cache_budget_mb`` (memory does not grow with the number of examples; a mean ablation's mean is
taken over all examples first, a resample ablation's donor rows come from the same block). The
work is cut into :class:`Unit` s (a layer's chunk of heads on one block), each saved on its own
for resume; in a multi-process job (:mod:`headlens.runtime.distributed`) the units are shared out
over the ranks by cost and their per-example metrics gathered, giving the tables one process gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.errors import check
from headlens.importance.ablation import (
    ablation_hook,
    as_ablation,
    clean_activations,
    hook_name,
    make_replacement,
    z_means,
)
from headlens.importance.resume import SweepResume, resume_lock, sweep_fingerprint
from headlens.importance.statistics import importance_table
from headlens.importance.streaming import Streaming, first_changed_position
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index, resolve_heads
from headlens.model.kv_cache import KVCache
from headlens.runtime import current_world

UNITS = ("heads", "kv_heads")
CACHE_BUDGET_MB = 2048  # clean activations the fast sweep keeps for one block of examples


# --- the plan: units of work -----------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One resumable piece of a sweep: ablating each of ``ids`` (heads or key/value heads of
    ``layer``) alone on the examples of block ``block``; its result is ``[len(ids), examples of
    the block]``."""

    block: int
    layer: int
    ids: tuple


def _rows_per_chunk(model, batches, n_heads: int, memory_budget_mb: float, tail: int = 0) -> int:
    """How many ablated copies of a batch fit the budget (a rough activation-size estimate; a
    rerun from position ``tail`` on holds ``P - tail`` queries over ``P`` keys)."""
    cfg = model.cfg
    R, P = batches.rows_per_batch, batches.P
    Q = P - tail
    per_row = 4 * Q * (6 * cfg.d_model + 2 * max(cfg.d_mlp, 1) + 3 * cfg.n_heads * P)
    if tail:
        per_row += 4 * 2 * P * cfg.n_kv_heads * cfg.d_head  # one layer's cache, copied per stacked row
    return int(max(1, min(n_heads, memory_budget_mb * 2**20 // (R * per_row))))


def _blocks(model, batches, cache_budget_mb: float) -> list[range]:
    """Runs of consecutive batches whose cached clean activations (the residual stream in and
    out of a layer, its ``z``, ``v`` and attention output, the reference; float32) fit
    ``cache_budget_mb``: the fast sweep holds one block at a time."""
    cfg = model.cfg
    per_row = 4 * batches.P * (4 * cfg.d_model + 2 * cfg.n_heads * cfg.d_head)
    n = max(1, int(cache_budget_mb * 2**20 // (max(1, batches.rows_per_batch) * per_row)))
    return [range(s, min(s + n, len(batches))) for s in range(0, len(batches), n)]


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


def _plan(model, batches, pairs, blocks, method: str, memory_budget_mb: float, tail: int) -> list[Unit]:
    by_layer = {}
    for layer, unit in pairs:
        by_layer.setdefault(layer, []).append(unit)
    plan = []
    for b in range(len(blocks)):
        for layer, ids in sorted(by_layer.items()):
            k = 1 if method == "naive" else _rows_per_chunk(model, batches, len(ids), memory_budget_mb, tail)
            plan += [Unit(b, layer, tuple(ids[i:i + k])) for i in range(0, len(ids), k)]
    return plan


def _cost(model, blocks, u: Unit, method: str) -> float:
    """Relative cost of a unit: ablations x examples x layers run."""
    layers = model.cfg.n_layers if method == "naive" else model.cfg.n_layers - u.layer
    return len(u.ids) * len(blocks[u.block]) * layers


# --- one block of examples --------------------------------------------------------------------
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
def _fast_block(model, task, batches, work, members, ablation, repl_args, means, clean_pass, on_done):
    """Per layer: one clean pass records the layer's ``z``, ``v`` and attention output and steps
    the cached residual stream. Ablating local head ``j`` changes the attention output by
    ``(z_new - z)[:, :, j] @ W_O[j]`` (exact: the output is linear in each head's ``z``; a unit's
    heads add up; a post-attention norm, Gemma's or OLMo 2's ``ln1_post``, comes after it and runs
    in the block), so each stacked copy starts at the layer's post-attention norm and MLP and runs
    only what follows. Where ``starts[i] > 0`` only positions from there on run, over the clean KV
    cache ``prefixes[i]`` of the earlier ones, whose final hidden states ``heads_before[i]`` are clean."""
    refs, starts, prefixes, heads_before = clean_pass
    resid = [model(_tail(b.inputs, s), attention_mask=b.inputs["attention_mask"], stop_at_layer=0, past_kv=c)
             if s else model(b.inputs, stop_at_layer=0) for b, s, c in zip(batches, starts, prefixes)]
    streaming = isinstance(ablation, Streaming)
    names = ("z", "attn_out") + (("v",) if ablation == "uniform" or streaming else ()) + \
        (("attn_scores",) if streaming else ())
    for layer in range(max(u.layer for u in work) + 1):
        todo = [u for u in work if u.layer == layer]
        # hooked on every layer, work or not: the clean stream takes the explicit path through each layer
        # whichever units this process runs (an unhooked layer would run sdpa, equal only within rounding)
        acts, nxt = clean_activations(model, batches, layer, resid, names if todo else ("z",), past_kv=prefixes)
        repl = None
        if todo:
            repl = make_replacement(model, ablation, batches, acts.get("z"), layer=layer, mean=means.get(layer),
                                    **repl_args, **(dict(
                acts=acts, starts=starts, prefix_values=[c.values[layer] if c else None for c in prefixes])
                if streaming else {}))
        attn = model.blocks[layer].attn
        for u in todo:
            local = [[local_index(model, layer, h) for h in members[(layer, x)]] for x in u.ids]
            values = [[] for _ in u.ids]
            for i, b in enumerate(batches):
                R, z, n = b.n_rows, acts["z"][i], len(u.ids)
                v = acts["v"][i] if ablation == "uniform" else None
                attn_out = torch.cat([acts["attn_out"][i] + sum((repl.head_z(i, j, v, attn) - z[:, :, j]) @ attn.W_O[j]
                                                                for j in js) for js in local])  # [n * R, P, D]
                x = model.blocks[layer](resid[i].repeat(n, 1, 1), None, attn_out=attn_out)
                hidden = model(residual=x, attention_mask=b.inputs["attention_mask"].repeat(n, 1),
                               start_at_layer=layer + 1, return_type="hidden",
                               past_kv=prefixes[i].repeat(n) if prefixes[i] else None)
                if heads_before[i] is not None:  # the positions before the change are the clean ones
                    hidden = torch.cat([heads_before[i].repeat(n, 1, 1), hidden], dim=1)
                for c in range(n):
                    values[c].append(task.compute(model, hidden[c * R:(c + 1) * R], b, refs[i]).double().cpu())
            on_done(u, np.stack([torch.cat(v).numpy() for v in values]))
        resid = nxt


def _tail(inputs: dict, s: int) -> torch.Tensor:
    """The input ids from position ``s`` on, ``[R, P - s]``."""
    return inputs["input_ids"][:, s:]


@torch.no_grad()
def _naive_block(model, task, batches, work, members, ablation, repl_args, means, clean_pass, on_done):
    """One full forward per unit and batch, the unit's heads ablated by a hook (the reference)."""
    refs = clean_pass[0]
    repl, repl_layer = None, None
    for u in sorted(work, key=lambda u: u.layer):
        if repl_layer != u.layer:
            zs = clean_activations(model, batches, u.layer)[0]["z"] if ablation == "resample" else None
            repl = make_replacement(model, ablation, batches, zs, layer=u.layer, mean=means.get(u.layer), **repl_args)
            repl_layer = u.layer
        local = [local_index(model, u.layer, h) for h in members[(u.layer, u.ids[0])]]
        vals = []
        for i, b in enumerate(batches):
            hook = (hook_name(ablation, u.layer), ablation_hook(ablation, [local], b.n_rows, repl.value(i)))
            with model.hooks(fwd_hooks=[hook]):
                hidden = model(b.inputs, return_type="hidden")
            vals.append(task.compute(model, hidden, b, refs[i]).double().cpu())
        on_done(u, torch.cat(vals).numpy()[None])


# --- sweeps -----------------------------------------------------------------------------------
def sweep_metrics(model, task, ablation="zero", heads=None, method: str = "fast", seed: int = 0,
                  resume_dir=None, batch_size: int = 16, per_position: bool = True,
                  memory_budget_mb: float = 512, progress: bool = True, units: str = "heads",
                  cache_budget_mb: float = CACHE_BUDGET_MB,
                  weights_key: Optional[str] = None) -> tuple[list, np.ndarray, dict]:
    """Ablate each head (or key/value head, ``units="kv_heads"``) alone and keep every example's
    metric: ``(units, clean [N], ablated {(layer, id): [N]})``, examples in the task's order. The
    arguments are :func:`ablation_sweep`'s; a subset of examples gives that subset's table
    through :func:`importance_table`. ``weights_key``: a digest of the model's weights the caller
    already has (e.g. :func:`headlens.io.digest.source_digest`), for ``resume_dir``'s
    fingerprint; by default the weights are hashed here."""
    ablation = as_ablation(ablation)
    check(method in ("fast", "naive"), f"method must be 'fast' or 'naive', got {method!r}")
    check(memory_budget_mb > 0, f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    check(cache_budget_mb > 0, f"cache_budget_mb must be > 0, got {cache_budget_mb}")
    task = load_task(task, model)
    pairs, members = sweep_units(model, heads, units)
    batches = task.batches(model, batch_size)
    world = current_world()
    blocks = [range(len(batches))] if method == "naive" else _blocks(model, batches, cache_budget_mb)
    starts = [first_changed_position(ablation, batches[i]) if method == "fast" else 0 for i in range(len(batches))]
    plan = _plan(model, batches, pairs, blocks, method, memory_budget_mb, min(starts))
    n_block = [min(r.stop * batch_size, len(task)) - r.start * batch_size for r in blocks]
    with resume_lock(resume_dir, world):  # one job at a time writes a resume folder
        store, done = None, {}
        if resume_dir is not None:
            fingerprint = sweep_fingerprint(
                model, task, weights_key, ablation=str(ablation), method=method, seed=seed, batch_size=batch_size,
                per_position=per_position, memory_budget_mb=memory_budget_mb, heads_swept=repr(pairs),
                blocks=repr([(r.start, r.stop) for r in blocks]), **({} if units == "heads" else {"units": units}))
            store = world.on_main(lambda: SweepResume(resume_dir, fingerprint))
            done = world.on_main(lambda: {u: v for u in plan if (v := store.load(
                u.layer, u.ids, u.block, n_block[u.block])) is not None})  # rank 0 reads, every rank gets the same
        todo = [u for u in plan if u not in done]
        owners = world.assign([_cost(model, blocks, u, method) for u in todo])
        mine = [u for u, r in zip(todo, owners) if r == world.rank]
        # a mean ablation's mean is over all examples: from the block's own clean pass when there is one block
        # (fast), else from a pass of its own over every batch
        means = z_means(model, batches, {u.layer for u in todo}, per_position) \
            if ablation == "mean" and (len(blocks) > 1 or method == "naive") else {}
        desc = f"{ablation} ablation sweep" + (f" (rank 0 of {world.size})" if world.size > 1 else "")
        bar = tqdm(total=sum(len(u.ids) for u in mine + list(done)), desc=desc, unit="head",
                   disable=not progress or not world.is_main, leave=False)
        bar.update(sum(len(u.ids) for u in done))
        run_block = _fast_block if method == "fast" else _naive_block
        repl_args = dict(per_position=per_position)

        def my_share() -> tuple[dict, dict]:
            clean, values = {}, {}

            def on_done(u: Unit, v: np.ndarray) -> None:
                if store is not None:
                    store.save(u.layer, u.ids, v, block=u.block)
                values[u] = v
                bar.update(len(u.ids))

            for b, block in enumerate(blocks):
                work, owns = [u for u in mine if u.block == b], world.owner(b) == world.rank
                if not work and not owns:
                    continue
                block_batches = [batches[i] for i in block]
                block_starts = [starts[i] for i in block]
                metric, *rest = _clean_pass(model, task, block_batches, block_starts)
                if owns:
                    clean[b] = metric
                if work:
                    refs, prefixes, heads_before = rest
                    run_block(model, task, block_batches, work, members, ablation, dict(repl_args, seed=seed + b),
                              means, (refs, block_starts, prefixes, heads_before), on_done)
            return clean, values

        parts = world.run_shards(my_share)
        bar.close()
        clean = {b: c for part in parts for b, c in part[0].items()}
        values = {**done, **{u: v for part in parts for u, v in part[1].items()}}
        per_unit = {}
        for u in plan:
            for c, x in enumerate(u.ids):
                per_unit.setdefault((u.layer, x), {})[u.block] = values[u][c]
        results = {k: np.concatenate([d[b] for b in range(len(blocks))]) for k, d in per_unit.items()}
        return pairs, np.concatenate([clean[b] for b in range(len(blocks))]), results


def ablation_sweep(model, task, ablation="zero", heads=None, method: str = "fast",
                   n_bootstrap: int = 1000, seed: int = 0, resume_dir=None, batch_size: int = 16,
                   per_position: bool = True, memory_budget_mb: float = 512, progress: bool = True,
                   units: str = "heads", cache_budget_mb: float = CACHE_BUDGET_MB,
                   weights_key: Optional[str] = None) -> pd.DataFrame:
    """Ablate each head alone; one row per head: ``layer, head, importance, importance_se,
    importance_ci_low, importance_ci_high, damage, metric_clean, metric_ablated, n_examples``.

    ``ablation``: zero / mean / resample / uniform / streaming or a
    :class:`headlens.importance.streaming.Streaming` (see :mod:`headlens.importance.ablation`;
    ``per_position`` and ``seed`` configure mean and resample). ``units``: ``"heads"`` or
    ``"kv_heads"`` (rows ``layer, head`` then name the key/value head). ``method``: ``"fast"``
    (cached residuals, ablations stacked along the batch up to ``memory_budget_mb``, examples in
    blocks whose cached activations fit ``cache_budget_mb``) or ``"naive"`` (one forward per head
    and batch).
    CIs: percentile bootstrap over examples (``n_bootstrap`` resamples, ``seed``; 0 skips).
    ``resume_dir``: finished heads are saved there as they complete; re-running the same
    sweep resumes and recomputes nothing finished; a folder of another sweep, model or task
    content is refused (``weights_key``: see :func:`sweep_metrics`). Per-example metrics:
    :func:`sweep_metrics`."""
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    task = load_task(task, model)
    check(len(task) >= 2 or n_bootstrap == 0,
          f"task {task.name!r} has {len(task)} example: standard errors, confidence intervals and tests need at "
          "least 2 (give more examples, or n_bootstrap=0 (--n-bootstrap 0) for point estimates only)")
    pairs, clean, results = sweep_metrics(model, task, ablation, heads, method, seed, resume_dir, batch_size,
                                          per_position, memory_budget_mb, progress, units, cache_budget_mb,
                                          weights_key)
    table = importance_table(pairs, clean, results, task, n_bootstrap, seed)
    table.attrs.update(ablation=str(as_ablation(ablation)), method=method, units=units)
    return table
