"""Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024): run one input with a single
activation of one head taken from the other input, and read the task metric.

``direction="denoise"`` (the default, as ``transformer_lens.patching``) runs the corrupted input with
a clean activation put in; ``"noise"`` runs the clean input with a corrupted one. Activations:
``z``, ``q`` (query heads, ``[B, P, H, d]``), ``k``, ``v`` (key/value heads, ``[B, S, K, d]``: under
grouped-query attention a key/value head serves several query heads, and patching it changes all
of them) and ``pattern`` (query heads, ``[B, H, P, S]``); over every position (``by_position=False``)
or one position at a time (the query position for ``z``, ``q`` and ``pattern``, the key position
for ``k`` and ``v``). The numbers equal ``transformer_lens.patching.get_act_patch_attn_head_*`` on a
``TransformerBridge`` over the same weights.

Batched and exact: every patch of layer ``l`` needs only the layers from ``l`` on, so the base run's
residual stream entering ``l`` is cached and several patches run in one forward, as stacked copies
of the batch (each copy patching a different head or position), up to ``memory_budget_mb``.

Table (one row per patch): ``layer, head, head_type`` (``query`` or ``kv``), ``activation, position``
(``-1``: every position), ``metric`` (mean patched metric), ``effect`` (mean of patched - base, per
example), ``effect_ci_low, effect_ci_high`` (95% bootstrap over examples) and ``normalized``
(``(metric - corrupted) / (clean - corrupted)`` of the means: 1 is the clean run, 0 the corrupted).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.circuits.runs import (
    capture,
    circuit_batches,
    copies_per_chunk,
    mean_ci,
    metric_of,
    repeat_mask,
    split_inputs,
)
from headlens.errors import check
from headlens.importance.tasks import load_task
from headlens.model.heads import resolve_heads

ACTIVATIONS = ("z", "q", "k", "v", "pattern")
KV_ACTIVATIONS = ("k", "v")


def _indices(model, layer: int, activation: str, by_position: bool, P: int, heads=None) -> list[tuple]:
    """``(original head, local index, position or None)`` of every patch of ``activation`` in ``layer``;
    ``heads``: only those query heads (for ``k`` and ``v``: the key/value heads they read)."""
    attn = model.blocks[layer].attn
    chosen = None if heads is None else [h for ll, h in heads if ll == layer]
    if activation in KV_ACTIVATIONS:
        ids = list(enumerate(attn.kv_ids))
        if chosen is not None:
            wanted = {int(attn.kv_map[attn.head_ids.index(h)]) for h in chosen}
            ids = [(j, kv) for j, kv in ids if j in wanted]
    else:
        ids = [(j, h) for j, h in enumerate(attn.head_ids) if chosen is None or h in chosen]
    positions = range(P) if by_position else [None]
    return [(head, local, p) for p in positions for local, head in ids]


def _tail(activation: str, local: int, p) -> tuple:
    """Index of one patch inside an activation, after the batch axis."""
    if activation == "pattern":  # [R, H, P, S]
        return (local,) if p is None else (local, p)
    return (slice(None), local) if p is None else (p, local)  # [R, P, n, d]


def _patch_hook(activation: str, picks: list[tuple], rows: int, source: torch.Tensor):
    """Copy ``c`` of the stacked batch gets ``picks[c]`` of ``source`` (the other run's activation)."""
    def hook(t, hook):
        t = t.clone()
        for c, (_, local, p) in enumerate(picks):
            tail = _tail(activation, local, p)
            t[(slice(c * rows, (c + 1) * rows),) + tail] = source[(slice(None),) + tail].to(t.dtype)
        return t
    return hook


@torch.no_grad()
def patching_metrics(model, task, activations=("z",), by_position: bool = False, direction: str = "denoise",
                     heads=None, batch_size: int = 16, memory_budget_mb: float = 512, progress: bool = True) -> tuple:
    """Every patch's metric per example: ``(keys, patched {key: [N]}, clean [N], corrupted [N])`` with
    ``key = (layer, head, activation, position or -1)`` (``head``: a key/value head for ``k``, ``v``).
    ``heads``: patch only these query heads (see :func:`headlens.model.heads.resolve_heads`; default all)."""
    for a in activations:
        check(a in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {a!r}")
    task, batches = circuit_batches(model, task, batch_size, "activation patching")
    L = model.cfg.n_layers
    heads = None if heads is None else resolve_heads(model, heads)
    per_key, clean, corrupted = {}, [], []
    total = sum(len(_indices(model, layer, a, by_position, batches[0].inputs["input_ids"].shape[1], heads))
                for layer in range(L) for a in activations) * len(batches)
    bar = tqdm(total=total, desc="activation patching", disable=not progress, leave=False)
    try:
        for batch in batches:
            base, source = split_inputs(batch, direction)
            ref = task.reference(model, batch)
            resid = capture(model, base, [f"blocks.{layer}.hook_resid_pre" for layer in range(L)])
            src = capture(model, source, [f"blocks.{layer}.attn.hook_{a}" for layer in range(L) for a in activations])
            for inputs, keep in ((batch.inputs, clean), (batch.corrupted, corrupted)):
                keep.append(task.compute(model, model(inputs, return_type="hidden"), batch, ref).double().cpu())
            R, P = batch.n_rows, batch.inputs["input_ids"].shape[1]
            for layer in range(L):
                x = resid[f"blocks.{layer}.hook_resid_pre"]
                for a in activations:
                    picks = _indices(model, layer, a, by_position, P, heads)
                    if not picks:
                        continue
                    n = copies_per_chunk(model, R, P, memory_budget_mb, len(picks))
                    for chunk in [picks[i:i + n] for i in range(0, len(picks), n)]:
                        name = f"blocks.{layer}.attn.hook_{a}"
                        with model.hooks(fwd_hooks=[(name, _patch_hook(a, chunk, R, src[name]))]):
                            hidden = model(residual=x.repeat(len(chunk), 1, 1), start_at_layer=layer,
                                           attention_mask=repeat_mask(batch, len(chunk)), return_type="hidden")
                        values = metric_of(model, task, batch, hidden, len(chunk), ref).cpu()
                        for c, (head, _, p) in enumerate(chunk):
                            per_key.setdefault((layer, head, a, -1 if p is None else p), []).append(values[c])
                        bar.update(len(chunk))
    finally:
        bar.close()
    keys = list(per_key)
    return keys, {k: torch.cat(v).numpy() for k, v in per_key.items()}, torch.cat(clean).numpy(), \
        torch.cat(corrupted).numpy()


def activation_patching(model, task, activations=("z",), by_position: bool = False, direction: str = "denoise",
                        heads=None, batch_size: int = 16, n_bootstrap: int = 1000, seed: int = 0,
                        memory_budget_mb: float = 512, progress: bool = True) -> pd.DataFrame:
    """Patch every head's (or only ``heads``') ``activations`` (all positions, or each position with
    ``by_position``) between the clean and corrupted inputs; one row per patch (see the module doc)."""
    task = load_task(task, model)
    keys, patched, clean, corrupted = patching_metrics(model, task, activations, by_position, direction, heads,
                                                       batch_size, memory_budget_mb, progress)
    base = corrupted if direction == "denoise" else clean
    values = np.stack([patched[k] for k in keys])  # [n_patches, N]
    mean, low, high = mean_ci(values - base, n_bootstrap, seed)
    gap = clean.mean() - corrupted.mean()
    table = pd.DataFrame({
        "layer": [k[0] for k in keys], "head": [k[1] for k in keys],
        "head_type": ["kv" if k[2] in KV_ACTIVATIONS else "query" for k in keys],
        "activation": [k[2] for k in keys], "position": [k[3] for k in keys],
        "metric": values.mean(1), "effect": mean, "effect_ci_low": low, "effect_ci_high": high,
        "normalized": (values.mean(1) - corrupted.mean()) / gap if gap != 0 else np.nan})
    table = table.sort_values(["activation", "layer", "head", "position"], ignore_index=True)
    table.attrs.update(direction=direction, metric_clean=float(clean.mean()), metric_corrupted=float(corrupted.mean()),
                       n_examples=len(clean), task=task.name, metric=task.metric_name)
    return table
