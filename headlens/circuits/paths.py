"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of sender head ``A`` on
receiver head ``B`` through ``B``'s query, key or value input only, or on the logits directly.

With ``direction="noise"`` (Wang et al.'s form) the clean run is the base: ``A``'s output is replaced
by its corrupted value *only on the path into B*, i.e. ``B``'s ``via`` input reads the clean residual
stream plus ``(z_A,corr - z_A,clean) W_O^A`` while every other head and MLP keeps its clean input,
and the run continues from ``B`` with ``B``'s new output (the other two of ``B``'s inputs stay clean).
``"denoise"`` swaps the roles (TransformerLens' ``patching.get_act_patch_direct_path``: the corrupted
run with ``A``'s clean write added into ``B``'s input). ``via="logits"``: the final residual stream
alone gets ``A``'s changed write. Only the direct path through the residual stream is patched:
intermediate heads and MLPs keep their base inputs. Under grouped-query attention ``B``'s key or
value input is that of its key/value head, patched for ``B`` alone.

Exact and batched like the fast ablation sweep: ``B``'s new ``z`` comes from one run of ``B``'s layer
(the stacked copies of the batch each carry one sender and path), and since a layer's output is
linear in each head's ``z``, every receiver then resumes from its layer's MLP, again as stacked copies.

Table: ``sender_layer, sender_head, receiver_layer, receiver_head`` (the logits: layer ``L``, head ``-1``),
``via, effect, ci_low, ci_high`` (mean of patched - base per example, 95% bootstrap), ``relative``
(effect over the whole corruption's effect, ``source - base``) and ``metric``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headlens.circuits.runs import (
    capture,
    check_additive,
    circuit_batches,
    copies_per_chunk,
    final_hidden,
    mean_ci,
    metric_of,
    repeat_mask,
    split_inputs,
)
from headlens.errors import check
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index, resolve_heads

VIAS = ("q", "k", "v", "logits")


def _chunks(items: list, n: int) -> list:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _input_hooks(layer: int, vias: list, rows: int, base: dict) -> list:
    """Hooks for one run of ``layer`` on stacked copies: copy ``c`` keeps only its ``vias[c]`` input
    patched, the other two of q, k, v are reset to the base run's values."""
    def reset(name):
        def hook(t, hook):
            t = t.clone()
            for c, via in enumerate(vias):
                if via != name:
                    t[c * rows:(c + 1) * rows] = base[f"blocks.{layer}.attn.hook_{name}"]
            return t
        return hook
    return [(f"blocks.{layer}.attn.hook_{name}", reset(name)) for name in ("q", "k", "v")]


@torch.no_grad()
def path_patching_metrics(model, task, senders=None, receivers=None, vias=VIAS, direction: str = "noise",
                          batch_size: int = 16, memory_budget_mb: float = 512, progress: bool = True) -> tuple:
    """Every path's metric per example: ``(keys, patched {key: [N]}, clean [N], corrupted [N])`` with
    ``key = (sender_layer, sender_head, receiver_layer, receiver_head, via)`` (the logits: ``(L, -1)``)."""
    check_additive(model, "path patching")
    for via in vias:
        check(via in VIAS, f"via must be one of {VIAS}, got {via!r}")
    task, batches = circuit_batches(model, task, batch_size, "path patching")
    L = model.cfg.n_layers
    senders = resolve_heads(model, senders)
    receivers = resolve_heads(model, receivers)
    head_vias = [v for v in vias if v != "logits"]
    names = [f"blocks.{layer}.{n}" for layer in range(L)
             for n in ("hook_resid_pre", "hook_attn_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")]
    names.append(f"blocks.{L - 1}.hook_resid_post")
    n_paths = len(senders) * ("logits" in vias) + len(head_vias) * sum(
        1 for s in senders for r in receivers if r[0] > s[0])
    bar = tqdm(total=n_paths * len(batches), desc="path patching", disable=not progress, leave=False)
    per_key, clean, corrupted = {}, [], []
    try:
        for batch in batches:
            base_in, source_in = split_inputs(batch, direction)
            ref = task.reference(model, batch)
            base = capture(model, base_in, names)
            z_src = capture(model, source_in, [f"blocks.{layer}.attn.hook_z" for layer in range(L)])
            for inputs, keep in ((batch.inputs, clean), (batch.corrupted, corrupted)):
                keep.append(task.compute(model, model(inputs, return_type="hidden"), batch, ref).double().cpu())
            R, P = batch.n_rows, batch.inputs["input_ids"].shape[1]
            delta = {}
            for layer, head in senders:
                j, W_O = local_index(model, layer, head), model.blocks[layer].attn.W_O
                name = f"blocks.{layer}.attn.hook_z"
                delta[(layer, head)] = (z_src[name][:, :, j] - base[name][:, :, j]) @ W_O[j]  # [R, P, D]
            record = _recorder(per_key, bar)
            n = copies_per_chunk(model, R, P, memory_budget_mb, max(len(senders), 1))
            if "logits" in vias:
                final = base[f"blocks.{L - 1}.hook_resid_post"]
                for chunk in _chunks(senders, n):
                    hidden = final_hidden(model, torch.cat([final + delta[s] for s in chunk]))
                    values = metric_of(model, task, batch, hidden, len(chunk), ref)
                    record([s + (L, -1, "logits") for s in chunk], values)
            for layer in sorted({r[0] for r in receivers}):
                pairs = [(s, via) for s in senders if s[0] < layer for via in head_vias]
                heads = [r[1] for r in receivers if r[0] == layer]
                for chunk in _chunks(pairs, n):
                    z_new = _receiver_z(model, batch, base, delta, layer, chunk)
                    _receiver_runs(model, task, batch, ref, base, layer, chunk, heads, z_new, n, record)
    finally:
        bar.close()
    keys = list(per_key)
    return keys, {k: torch.cat(v).numpy() for k, v in per_key.items()}, torch.cat(clean).numpy(), \
        torch.cat(corrupted).numpy()


def _recorder(per_key: dict, bar):
    def record(keys, values):
        for key, v in zip(keys, values.cpu()):
            per_key.setdefault(key, []).append(v)
        bar.update(len(keys))
    return record


def _receiver_z(model, batch, base: dict, delta: dict, layer: int, chunk: list) -> torch.Tensor:
    """``z [copies, R, P, H, d]`` of ``layer``'s heads when copy ``c`` adds sender ``chunk[c][0]``'s changed
    write to the layer's input and keeps only the ``chunk[c][1]`` input of each head patched."""
    R = batch.n_rows
    x = torch.cat([base[f"blocks.{layer}.hook_resid_pre"] + delta[s] for s, _ in chunk])
    hooks = _input_hooks(layer, [via for _, via in chunk], R, base)
    z = capture_with(model, x, repeat_mask(batch, len(chunk)), layer, hooks)
    return z.view(len(chunk), R, *z.shape[1:])


@torch.no_grad()
def capture_with(model, x: torch.Tensor, mask: torch.Tensor, layer: int, hooks: list) -> torch.Tensor:
    """Run only ``layer`` on the residual ``x`` with ``hooks`` on; its ``z [R', P, H, d]``."""
    keep = {}

    def save(t, hook):
        keep["z"] = t.detach().clone()

    with model.hooks(fwd_hooks=hooks + [(f"blocks.{layer}.attn.hook_z", save)]):
        model(residual=x, attention_mask=mask, start_at_layer=layer, stop_at_layer=layer + 1)
    return keep["z"]


def _receiver_runs(model, task, batch, ref, base: dict, layer: int, chunk: list, heads: list,
                   z_new: torch.Tensor, n: int, record) -> None:
    """Each receiver head of ``layer`` alone takes its new ``z``: its layer's output changes by
    ``(z_new - z) W_O`` (exact), and the run resumes at that layer's MLP."""
    attn = model.blocks[layer].attn
    z, out = base[f"blocks.{layer}.attn.hook_z"], base[f"blocks.{layer}.hook_attn_out"]
    runs = [(c, head) for head in heads for c in range(len(chunk))]
    resid = base[f"blocks.{layer}.hook_resid_pre"]
    for part in _chunks(runs, n):
        attn_out = []
        for c, head in part:
            j = local_index(model, layer, head)
            attn_out.append(out + (z_new[c][:, :, j] - z[:, :, j]) @ attn.W_O[j])
        x = model.blocks[layer](resid.repeat(len(part), 1, 1), None, attn_out=torch.cat(attn_out))
        hidden = model(residual=x, attention_mask=repeat_mask(batch, len(part)), start_at_layer=layer + 1,
                       return_type="hidden")
        keys = [chunk[c][0] + (layer, head, chunk[c][1]) for c, head in part]
        record(keys, metric_of(model, task, batch, hidden, len(part), ref))


def path_patching(model, task, senders=None, receivers=None, vias=VIAS, direction: str = "noise",
                  batch_size: int = 16, n_bootstrap: int = 1000, seed: int = 0, memory_budget_mb: float = 512,
                  progress: bool = True) -> pd.DataFrame:
    """Path patching from every sender head (default: all) to every later receiver head (default:
    all) through ``vias``; one row per path (see the module doc for the columns)."""
    task = load_task(task, model)
    keys, patched, clean, corrupted = path_patching_metrics(model, task, senders, receivers, vias, direction,
                                                            batch_size, memory_budget_mb, progress)
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    columns = ["sender_layer", "sender_head", "receiver_layer", "receiver_head", "via", "effect", "ci_low",
               "ci_high", "relative", "metric"]
    if not keys:
        table = pd.DataFrame(columns=columns)
    else:
        values = np.stack([patched[k] for k in keys])
        mean, low, high = mean_ci(values - base, n_bootstrap, seed)
        whole = source.mean() - base.mean()
        table = pd.DataFrame({
            "sender_layer": [k[0] for k in keys], "sender_head": [k[1] for k in keys],
            "receiver_layer": [k[2] for k in keys], "receiver_head": [k[3] for k in keys], "via": [k[4] for k in keys],
            "effect": mean, "ci_low": low, "ci_high": high, "relative": mean / whole if whole != 0 else np.nan,
            "metric": values.mean(1)})[columns]
        order = {v: i for i, v in enumerate(VIAS)}
        table = table.assign(_v=table.via.map(order)).sort_values(
            ["receiver_layer", "receiver_head", "_v", "sender_layer", "sender_head"], ignore_index=True)
        table = table.drop(columns="_v")
    table.attrs.update(direction=direction, metric_clean=float(clean.mean()), metric_corrupted=float(corrupted.mean()),
                       n_examples=len(clean), task=task.name, metric=task.metric_name)
    return table
