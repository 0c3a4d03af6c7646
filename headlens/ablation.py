"""Ablating heads and measuring what breaks: zero, mean, resample and uniform-attention ablation
of any set of heads, and exact single-head sweeps with bootstrap confidence intervals.

One mechanism, configured by ``kind``: a TransformerLens hook replaces each ablated head's ``z``
(``blocks.{l}.attn.hook_z [B, P, H, d]``) by 0 (``zero``), its dataset mean over real tokens
(``mean``; per position or averaged over positions), or another row's ``z`` at the same
positions (``resample``: a derangement of the task's rows, fixed by ``seed``; past that row's end
its padding positions' ``z``); ``uniform`` replaces the head's pattern
(``hook_pattern [B, H, P, S]``) by uniform attention over the keys the query may see (Kovaleva
et al. 2019). Hooks live only inside ``model.hooks(...)``: the model is never left altered.

Sign convention: ``importance = mean over examples of metric(ablated) - metric(clean)``. For a loss
(lower is better) a positive importance means the head helps; for a higher-is-better metric
(logit difference, cosine margin) a negative one does. ``damage`` is ``importance`` signed so
that positive always means "ablating the head hurts".

The fast sweep caches the clean residual stream entering each layer and that layer's clean
attention output; ablating one head changes that output by an exact per-head term, so each
ablation resumes at the layer's MLP, and several single-head ablations run in one forward pass by
stacking copies of the batch, each copy ablating a different head. ``method="naive"`` (one full forward
per head and batch) is the reference it is tested against.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap
from tqdm.auto import tqdm

from .errors import check
from .sweep_store import SweepCheckpoint, sweep_fingerprint
from .tasks import Task, load_task

KINDS = ("zero", "mean", "resample", "uniform")


# --- which heads ------------------------------------------------------------------------------
def resolve_heads(model, heads=None) -> list[tuple[int, int]]:
    """Normalise a head selection to a sorted list of ``(layer, original head)``.

    ``heads``: None (every head), ``(layer, head)``, a list of those (e.g. a cluster), or
    ``{layer: [heads] or None}`` (None: the whole layer)."""
    L = model.cfg.n_layers
    if heads is None:
        return model.head_labels()
    if isinstance(heads, dict):
        pairs = []
        for layer, hs in heads.items():
            check(str(layer).lstrip("-").isdigit() and 0 <= int(layer) < L,
                  f"layer {layer!r} is out of range: the model has layers 0..{L - 1}")
            hs = model.cfg.heads_in_layer(int(layer)) if hs is None else hs
            check(isinstance(hs, (list, tuple, set, range, np.ndarray)),
                  f"heads[{layer!r}] must be a list of head indices or None, got {type(hs).__name__}")
            pairs += [(int(layer), h) for h in hs]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, (int, np.integer)) for x in heads):
        pairs = [heads]
    else:
        check(hasattr(heads, "__iter__") and not isinstance(heads, (str, bytes)),
              f"heads must be None, a (layer, head) pair, a list of pairs or {{layer: [heads]}}, got {heads!r}")
        pairs = list(heads)
    out = set()
    for pair in pairs:
        check(isinstance(pair, (tuple, list)) and len(pair) == 2 and None not in map(_index, pair),
              f"a head must be a (layer, head) pair of integers, got {pair!r}")
        layer, head = _index(pair[0]), _index(pair[1])
        check(0 <= layer < L, f"head {(layer, head)}: layer {layer} is out of range (the model has layers 0..{L - 1})")
        kept = model.cfg.heads_in_layer(layer)
        check(head in kept, f"head {(layer, head)}: head {head} is out of range (layer {layer} has heads "
                            f"{kept if model.cfg.is_pruned else f'0..{model.cfg.n_heads - 1}'})")
        out.add((layer, head))
    check(len(out) > 0, "heads is empty: give at least one (layer, head)")
    return sorted(out)


def _index(x) -> Optional[int]:
    """``x`` as an int if it is one (an int, numpy int, integral float or digit string), else None."""
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, torch.Tensor) and x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        return int(x)
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return int(x)
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return None


def local_index(model, layer: int, head: int) -> int:
    """Position of original head ``head`` in layer ``layer``'s tensors (differs after pruning)."""
    return model.blocks[layer].attn.head_ids.index(head)


def gate_without(model, heads, dtype=torch.float32) -> torch.Tensor:
    """Head gate ``[L, max H]`` (local head order) that is 1 everywhere except 0 on ``heads``
    (original ``(layer, head)`` ids, see :func:`resolve_heads`)."""
    H = max(b.attn.n_heads for b in model.blocks)
    gate = torch.ones(model.cfg.n_layers, max(H, 1), dtype=dtype, device=model.device)
    for layer, head in resolve_heads(model, heads) if heads else []:
        gate[layer, local_index(model, layer, head)] = 0
    return gate


# --- the replacement values -------------------------------------------------------------------
def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2), deterministic under ``seed``."""
    check(n >= 2, "resample ablation needs at least two rows to swap activations between")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def hook_name(kind: str, layer: int) -> str:
    return f"blocks.{layer}.attn.hook_{'pattern' if kind == 'uniform' else 'z'}"


ACTIVATION_HOOKS = {"z": "attn.hook_z", "v": "attn.hook_v", "attn_out": "hook_attn_out"}


@torch.no_grad()
def clean_activations(model, batches, layer: int, resid=None, names=("z",)) -> tuple[dict, list]:
    """Clean activations of ``layer`` per batch, ``{name: [per batch]}`` with ``z [R, P, H, d]``,
    ``v [R, S, K, d]``, ``attn_out [R, P, D]``; and the residual stream after the layer
    ``[R, P, D]`` per batch. ``resid``: per-batch residual entering ``layer`` (else computed
    from the input)."""
    acts = {name: [] for name in names}
    hooks = [(f"blocks.{layer}.{ACTIVATION_HOOKS[name]}", lambda t, hook, keep=acts[name]: keep.append(t.clone()))
             for name in names]
    nxt = []
    with model.hooks(fwd_hooks=hooks):
        for i, b in enumerate(batches):
            if resid is None:
                nxt.append(model(b.inputs, stop_at_layer=layer + 1))
            else:
                nxt.append(model(residual=resid[i], attention_mask=b.inputs["attention_mask"],
                                 start_at_layer=layer, stop_at_layer=layer + 1))
    return acts, nxt


class Replacement:
    """What an ablated head's ``z`` (or pattern) becomes, per batch, for one layer.

    ``value(i)`` for batch ``i``: None (zero), ``[1, P or 1, H, d]`` (mean), ``[R, P, H, d]``
    (resample) or ``[R, 1, P, S]`` (uniform pattern)."""

    def __init__(self, model, kind: str, batches, zs=None, per_position: bool = True, seed: int = 0):
        self.kind = kind
        if kind == "mean":
            m = torch.cat([b.inputs["attention_mask"] for b in batches]).to(zs[0].dtype)[..., None, None]
            z = torch.cat(zs)
            dims = (0,) if per_position else (0, 1)
            self.mean = ((z * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True))
        elif kind == "resample":
            self.z = torch.cat(zs)
            self.perm = derangement(self.z.shape[0], seed).to(self.z.device)
            self.offsets = np.cumsum([0] + [b.n_rows for b in batches])
        elif kind == "uniform":  # per batch [R, 1, P, S]: uniform over the keys a query may see
            self.patterns = []
            for b in batches:
                mask = b.inputs["attention_mask"]
                visible = (model.attention_mask_bias(mask, mask.shape[1], torch.float32) == 0).float()
                self.patterns.append(visible / visible.sum(-1, keepdim=True).clamp(min=1))  # a padded query may see no key

    def head_z(self, i: int, j: int, v: Optional[torch.Tensor], attn) -> torch.Tensor | float:
        """What local head ``j``'s ``z`` becomes in batch ``i``: ``[R or 1, P or 1, d]`` (or 0 for
        zero ablation). ``v [R, S, K, d]``: the layer's clean values (uniform ablation only)."""
        if self.kind == "zero":
            return 0.0
        if self.kind == "uniform":
            return self.value(i)[:, 0].to(v.dtype) @ v[:, :, int(attn.kv_map[j])]
        return self.value(i)[:, :, j]

    def value(self, i: int) -> Optional[torch.Tensor]:
        if self.kind == "mean":
            return self.mean
        if self.kind == "resample":
            return self.z[self.perm[self.offsets[i]:self.offsets[i + 1]]]
        if self.kind == "uniform":
            return self.patterns[i]
        return None


def ablation_hook(kind: str, assignments: list, rows: int, value: Optional[torch.Tensor]):
    """Hook for one layer: copy ``c`` (rows ``c*rows:(c+1)*rows``) ablates local heads ``assignments[c]``."""

    def hook(t, hook):
        t = t.clone()
        for c, hs in enumerate(assignments):
            if not hs:
                continue
            rs = slice(c * rows, (c + 1) * rows)
            if kind == "uniform":  # t [R', H, P, S]
                t[rs, hs] = value.to(t.dtype)
            elif value is None:  # t [R', P, H, d]
                t[rs, :, hs] = 0
            else:
                t[rs, :, hs] = value[:, :, hs].to(t.dtype)
        return t

    return hook


# --- ablating a set of heads together ---------------------------------------------------------
@torch.no_grad()
def ablate(model, task, heads, kind: str = "zero", per_position: bool = True, seed: int = 0,
           batch_size: int = 16) -> np.ndarray:
    """Metric per example ``[N]`` with all of ``heads`` (see :func:`resolve_heads`: a head, a list,
    a layer ``{l: None}``, a cluster) ablated together."""
    check(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
    task = load_task(task, model)
    pairs = resolve_heads(model, heads)
    batches = task.batches(model, batch_size)
    layers = sorted({layer for layer, _ in pairs})
    repl = {}
    for layer in layers:
        zs = clean_activations(model, batches, layer)[0]["z"] if kind in ("mean", "resample") else None
        repl[layer] = Replacement(model, kind, batches, zs, per_position, seed)
    out = []
    for i, b in enumerate(batches):
        ref = task.reference(model, b)
        hooks = [(hook_name(kind, layer), ablation_hook(
            kind, [[local_index(model, layer, h) for ll, h in pairs if ll == layer]], b.n_rows, repl[layer].value(i)))
            for layer in layers]
        with model.hooks(fwd_hooks=hooks):
            hidden = model(b.inputs, return_type="hidden")
        out.append(task.compute(model, hidden, b, ref).double().cpu())
    return torch.cat(out).numpy()


def ablation_effect(model, task, heads, kind: str = "zero", n_bootstrap: int = 1000, seed: int = 0,
                    **kwargs) -> pd.Series:
    """Importance of ablating ``heads`` together: importance, importance_se, CI, metric_clean,
    metric_ablated, n_examples (same columns as one row of :func:`ablation_sweep`)."""
    task = load_task(task, model)
    clean = task.evaluate(model, batch_size=kwargs.get("batch_size", 16))
    ablated = ablate(model, task, heads, kind, seed=seed, **kwargs)
    table = importance_table([(-1, -1)], clean, {(-1, -1): ablated}, task, n_bootstrap, seed)
    return table.iloc[0].drop(["layer", "head"])


# --- tables -----------------------------------------------------------------------------------
def importance_table(heads, clean: np.ndarray, ablated: dict, task: Task, n_bootstrap: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Tidy table from per-example metrics: ``clean [N]``, ``ablated {(layer, head): [N]}``."""
    diffs = np.stack([ablated[h] - clean for h in heads])  # [n_heads, N]
    N = diffs.shape[1]
    se = diffs.std(1, ddof=1) / np.sqrt(N) if N > 1 else np.full(len(heads), np.nan)
    low = high = np.full(len(heads), np.nan)
    if n_bootstrap > 0 and N > 1:
        res = bootstrap((diffs,), np.mean, axis=-1, vectorized=True, n_resamples=n_bootstrap,
                        method="percentile", random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval.low, res.confidence_interval.high
        const = np.ptp(diffs, axis=1) == 0  # no spread: the interval is the point
        low, high = np.where(const, diffs[:, 0], low), np.where(const, diffs[:, 0], high)
    importance = diffs.mean(1)
    table = pd.DataFrame({
        "layer": [h[0] for h in heads], "head": [h[1] for h in heads], "importance": importance,
        "importance_se": se, "importance_ci_low": low, "importance_ci_high": high,
        "damage": -importance if task.higher_is_better else importance,
        "metric_clean": clean.mean(), "metric_ablated": diffs.mean(1) + clean.mean(), "n_examples": N,
    })
    table.attrs.update(task=task.name, metric=task.metric_name, higher_is_better=task.higher_is_better,
                       sign="importance = metric(ablated) - metric(clean); damage > 0: ablating hurts")
    return table.sort_values(["layer", "head"], ignore_index=True)


# --- sweeps -----------------------------------------------------------------------------------
def _rows_per_chunk(model, task, batches, n_heads: int, memory_budget_mb: float) -> int:
    """How many ablated copies of a batch fit the budget (a rough activation-size estimate)."""
    cfg, b = model.cfg, batches[0]
    R, P = max(x.n_rows for x in batches), b.inputs["input_ids"].shape[1]
    per_row = 4 * P * (6 * cfg.d_model + 2 * max(cfg.d_mlp, 1) + 3 * cfg.n_heads * P)
    return int(max(1, min(n_heads, memory_budget_mb * 2**20 // (R * per_row))))


@torch.no_grad()
def _sweep_fast(model, task, batches, pairs, kind, repl_args, refs, store, bar, memory_budget_mb):
    """Per layer: one clean pass records the layer's ``z``, ``v`` and attention output and steps
    the cached residual stream. Ablating local head ``j`` changes the attention output by
    ``(z_new - z)[:, :, j] @ W_O[j]`` (exact: the output is linear in each head's ``z``), so each
    stacked copy starts at the layer's MLP and runs only what follows."""
    results = {}
    by_layer = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    resid = [model(b.inputs, stop_at_layer=0) for b in batches]
    names = ("z", "attn_out") + (("v",) if kind == "uniform" else ())
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
        repl = Replacement(model, kind, batches, acts.get("z"), **repl_args) if todo else None
        attn = model.blocks[layer].attn
        for chunk in todo:
            local = [local_index(model, layer, h) for h in chunk]
            values = [[] for _ in chunk]
            for i, b in enumerate(batches):
                R, z = b.n_rows, acts["z"][i]
                v = acts["v"][i] if kind == "uniform" else None
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
def _sweep_naive(model, task, batches, pairs, kind, repl_args, refs, store, bar):
    results, repl, repl_layer = {}, None, None
    for layer, head in pairs:
        done = store.load(layer, [head]) if store else None
        if done is None:
            if repl_layer != layer:
                zs = clean_activations(model, batches, layer)[0]["z"] if kind in ("mean", "resample") else None
                repl, repl_layer = Replacement(model, kind, batches, zs, **repl_args), layer
            vals = []
            for i, b in enumerate(batches):
                hook = (hook_name(kind, layer), ablation_hook(kind, [[local_index(model, layer, head)]],
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


def sweep_metrics(model, task, kind: str = "zero", heads=None, method: str = "fast", seed: int = 0,
                  checkpoint_dir=None, batch_size: int = 16, per_position: bool = True,
                  memory_budget_mb: float = 512, progress: bool = True) -> tuple[list, np.ndarray, dict]:
    """Ablate each head alone and keep every example's metric: ``(heads, clean [N], ablated
    {(layer, head): [N]})``, examples in the task's order. The arguments are
    :func:`ablation_sweep`'s; a subset of examples gives that subset's table through
    :func:`importance_table`."""
    check(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
    check(method in ("fast", "naive"), f"method must be 'fast' or 'naive', got {method!r}")
    check(memory_budget_mb > 0, f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    task = load_task(task, model)
    pairs = resolve_heads(model, heads)
    batches = task.batches(model, batch_size)
    store = None
    if checkpoint_dir is not None:
        store = SweepCheckpoint(checkpoint_dir, sweep_fingerprint(
            model, task, kind=kind, method=method, seed=seed, batch_size=batch_size,
            per_position=per_position, memory_budget_mb=memory_budget_mb, heads_swept=repr(pairs)))
    refs, clean = [], []
    with torch.no_grad():
        for b in batches:  # one unablated forward per batch: the clean metric and the reference
            hidden = model(b.inputs, return_type="hidden")
            refs.append(hidden if task.needs_reference else None)
            clean.append(task.compute(model, hidden, b, refs[-1]).double().cpu().numpy())
    clean = np.concatenate(clean)
    repl_args = dict(per_position=per_position, seed=seed)
    with tqdm(total=len(pairs), desc=f"{kind} ablation sweep", disable=not progress, leave=False) as bar:
        if method == "fast":
            results = _sweep_fast(model, task, batches, pairs, kind, repl_args, refs, store, bar, memory_budget_mb)
        else:
            results = _sweep_naive(model, task, batches, pairs, kind, repl_args, refs, store, bar)
    return pairs, clean, results


def ablation_sweep(model, task, kind: str = "zero", heads=None, method: str = "fast",
                   n_bootstrap: int = 1000, seed: int = 0, checkpoint_dir=None, batch_size: int = 16,
                   per_position: bool = True, memory_budget_mb: float = 512, progress: bool = True) -> pd.DataFrame:
    """Ablate each head alone; one row per head: ``layer, head, importance, importance_se,
    importance_ci_low, importance_ci_high, damage, metric_clean, metric_ablated, n_examples``.

    ``kind``: zero / mean / resample / uniform (see the module doc; ``per_position`` and ``seed``
    configure mean and resample). ``method``: ``"fast"`` (cached residuals, ablations stacked
    along the batch up to ``memory_budget_mb``) or ``"naive"`` (one forward per head and batch).
    CIs: percentile bootstrap over examples (``n_bootstrap`` resamples, ``seed``; 0 skips).
    ``checkpoint_dir``: finished heads are saved there as they complete; re-running the same
    sweep resumes and recomputes nothing finished. Per-example metrics: :func:`sweep_metrics`."""
    check(n_bootstrap >= 0, f"n_bootstrap must be >= 0, got {n_bootstrap}")
    task = load_task(task, model)
    pairs, clean, results = sweep_metrics(model, task, kind, heads, method, seed, checkpoint_dir, batch_size,
                                          per_position, memory_budget_mb, progress)
    table = importance_table(pairs, clean, results, task, n_bootstrap, seed)
    table.attrs.update(kind=kind, method=method)
    return table
