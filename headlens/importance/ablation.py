"""Ablating heads: zero, mean, resample and uniform-attention ablation of any set of heads.

One mechanism, configured by ``ablation``: a TransformerLens hook replaces each ablated head's ``z``
(``blocks.{l}.attn.hook_z [B, P, H, d]``) by 0 (``zero``), its dataset mean over real tokens
(``mean``; per position or averaged over positions), or another row's ``z`` at the same
positions (``resample``: a derangement of the task's rows, fixed by ``seed``; past that row's end
its padding positions' ``z``); ``uniform`` replaces the head's pattern
(``hook_pattern [B, H, P, S]``) by uniform attention over the keys the query may see (Kovaleva
et al. 2019); ``streaming`` (or a :class:`headlens.importance.streaming.Streaming` with its sink
and window sizes) masks the keys a streaming head's KV cache drops after the context
(``hook_attn_scores``, see :mod:`headlens.importance.streaming`). Hooks live only inside
``model.hooks(...)``: the model is never left altered.

Sign convention: ``importance = mean over examples of metric(ablated) - metric(clean)``. For a loss
(lower is better) a positive importance means the head helps; for a higher-is-better metric
(logit difference, cosine margin) a negative one does. ``damage`` is ``importance`` signed so
that positive always means "ablating the head hurts".

Shapes: ``B`` batch (``R`` rows of one task batch), ``P`` query positions, ``S`` key positions,
``H`` heads of the layer, ``K`` key/value heads, ``d`` d_head, ``D`` d_model, ``N`` examples.
Every head's importance alone: :mod:`headlens.importance.sweep`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import torch

from headlens.errors import check
from headlens.importance.statistics import importance_table
from headlens.importance.streaming import Streaming, StreamingReplacement
from headlens.importance.tasks import load_task
from headlens.model.heads import local_index, resolve_heads
from headlens.runtime import current_world

ABLATIONS = ("zero", "mean", "resample", "uniform")  # the ones that apply to any task


def as_ablation(ablation):
    """The ablation to run: one of :data:`ABLATIONS`, or ``"streaming"`` / a :class:`Streaming`
    (for long-context tasks, which say where their context ends); anything else is refused."""
    if isinstance(ablation, Streaming):
        return ablation
    check(isinstance(ablation, str) and ablation in ABLATIONS + ("streaming",),
          f"ablation must be one of {ABLATIONS}, 'streaming' or a Streaming(sink, window), got {ablation!r}")
    return Streaming() if ablation == "streaming" else ablation


# --- the replacement values -------------------------------------------------------------------
def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2), deterministic under ``seed``."""
    check(n >= 2, "resample ablation needs at least two rows to swap activations between")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def hook_name(ablation, layer: int) -> str:
    point = {"uniform": "pattern"}.get(ablation, "attn_scores" if isinstance(ablation, Streaming) else "z")
    return f"blocks.{layer}.attn.hook_{point}"


# attn_out: the attention layer's output before any post-attention norm (Gemma, OLMo 2), where
# it is still linear in each head's z
ACTIVATION_HOOKS = {"z": "attn.hook_z", "v": "attn.hook_v", "attn_out": "attn.hook_out",
                    "attn_scores": "attn.hook_attn_scores"}


@torch.no_grad()
def clean_activations(model, batches, layer: int, resid=None, names=("z",), past_kv=None) -> tuple[dict, list]:
    """Clean activations of ``layer`` per batch, ``{name: [per batch]}`` with ``z [R, P, H, d]``,
    ``v [R, S, K, d]``, ``attn_out [R, P, D]`` (``attn.hook_out``), ``attn_scores [R, H, P, S]``;
    and the residual stream after the layer ``[R, P, D]`` per batch. ``resid``: per-batch residual
    entering ``layer`` (else computed from the input); ``past_kv``: per-batch KV caches of the
    positions before ``resid``'s (then only those later positions run)."""
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
                                 start_at_layer=layer, stop_at_layer=layer + 1,
                                 past_kv=None if past_kv is None else past_kv[i]))
    return acts, nxt


def masked_sums(z: torch.Tensor, mask: torch.Tensor) -> tuple:
    """``z [R, P, H, d]`` summed over the rows' real tokens in float64: ``([P, H, d], counts [P, 1, 1])``."""
    m = mask.double()[..., None, None].to(z.device)  # [R, P, 1, 1]
    return (z.double() * m).sum(0).cpu(), m.sum(0).cpu()


def mean_of(sums: torch.Tensor, counts: torch.Tensor, per_position: bool, like: torch.Tensor) -> torch.Tensor:
    """The mean ``[1, P or 1, H, d]`` from :func:`masked_sums`' totals, in ``like``'s dtype and device."""
    if not per_position:
        sums, counts = sums.sum(0, keepdim=True), counts.sum(0, keepdim=True)
    return (sums / counts)[None].to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def z_means(model, batches, layers, per_position: bool = True) -> dict:
    """Each of ``layers``' dataset mean of ``z`` over real tokens, ``{layer: [1, P or 1, H, d]}``
    (per position, or averaged over positions too), summed in float64 one batch at a time: no
    batch's activations are kept. In a multi-process job the batches are shared out over the
    ranks and their sums added."""
    layers = sorted(set(layers))
    if not layers:
        return {}
    world = current_world()

    def partial_sums():
        sums, counts = {}, None
        keep = {}
        hooks = [(f"blocks.{layer}.attn.hook_z", lambda t, hook, layer=layer: keep.__setitem__(layer, t))
                 for layer in layers]
        for i in range(len(batches)):
            if world.owner(i) != world.rank:
                continue
            b = batches[i]
            with model.hooks(fwd_hooks=hooks):
                model(b.inputs, stop_at_layer=layers[-1] + 1)
            for layer in layers:
                add, n = masked_sums(keep.pop(layer), b.inputs["attention_mask"])
                sums[layer] = add if layer not in sums else sums[layer] + add
            counts = n if counts is None else counts + n
        return sums, counts

    parts = [p for p in world.run_shards(partial_sums) if p[1] is not None]
    counts = sum(p[1] for p in parts)
    like = torch.empty(0, dtype=model.dtype)
    return {layer: mean_of(sum(p[0][layer] for p in parts), counts, per_position,
                           like.to(model.blocks[layer].attn.W_O.device)) for layer in layers}


class Replacement:
    """What an ablated head's ``z`` (or pattern) becomes, per batch, for one layer (``layer``:
    its sliding window decides the keys a uniform pattern spreads over).

    ``value(i)`` for batch ``i``: None (zero), ``[1, P or 1, H, d]`` (mean: ``mean``, from
    :func:`z_means`, or the mean of ``zs``, the clean ``z`` of the batches), ``[R, P, H, d]``
    (resample: another row of ``zs``) or ``[R, 1, P, S]`` (uniform pattern)."""

    def __init__(self, model, ablation: str, batches, zs=None, per_position: bool = True, seed: int = 0,
                 layer: int = 0, mean: Optional[torch.Tensor] = None):
        self.ablation = ablation
        if ablation == "mean" and mean is None:  # from the clean z of these batches
            parts = [masked_sums(z, b.inputs["attention_mask"]) for z, b in zip(zs, batches)]
            mean = mean_of(sum(p[0] for p in parts), sum(p[1] for p in parts), per_position, zs[0])
        if ablation == "mean":
            self.mean = mean
        elif ablation == "resample":
            self.z = torch.cat(zs)
            self.perm = derangement(self.z.shape[0], seed).to(self.z.device)
            self.offsets = np.cumsum([0] + [b.n_rows for b in batches])
        elif ablation == "uniform":  # per batch [R, 1, P, S]: uniform over the keys a query may see
            self.patterns = []
            for b in batches:
                mask = b.inputs["attention_mask"]
                visible = (model.attention_mask_bias(mask, mask.shape[1], torch.float32, layer=layer) == 0).float()
                self.patterns.append(visible / visible.sum(-1, keepdim=True).clamp(min=1))  # a padded query may see no key

    def head_z(self, i: int, j: int, v: Optional[torch.Tensor], attn) -> torch.Tensor | float:
        """What local head ``j``'s ``z`` becomes in batch ``i``: ``[R or 1, P or 1, d]`` (or 0 for
        zero ablation). ``v [R, S, K, d]``: the layer's clean values (uniform ablation only)."""
        if self.ablation == "zero":
            return 0.0
        if self.ablation == "uniform":
            return self.value(i)[:, 0].to(v.dtype) @ v[:, :, int(attn.kv_map[j])]
        return self.value(i)[:, :, j]

    def value(self, i: int) -> Optional[torch.Tensor]:
        if self.ablation == "mean":
            return self.mean
        if self.ablation == "resample":
            return self.z[self.perm[self.offsets[i]:self.offsets[i + 1]]]
        if self.ablation == "uniform":
            return self.patterns[i]
        return None


def make_replacement(model, ablation, batches, zs=None, per_position: bool = True, seed: int = 0,
                     layer: int = 0, mean=None, **streaming):
    """The :class:`Replacement` of ``ablation`` for ``layer`` (a :class:`StreamingReplacement` for
    streaming, given its ``acts``, ``starts`` and ``prefix_values`` in the fast sweep)."""
    if isinstance(ablation, Streaming):
        return StreamingReplacement(ablation, batches, **streaming)
    return Replacement(model, ablation, batches, zs, per_position, seed, layer, mean=mean)


def ablation_hook(ablation, assignments: list, rows: int, value: Optional[torch.Tensor]):
    """Hook for one layer: copy ``c`` (rows ``c*rows:(c+1)*rows``) ablates local heads ``assignments[c]``."""

    def hook(t, hook):
        t = t.clone()
        for c, hs in enumerate(assignments):
            if not hs:
                continue
            rs = slice(c * rows, (c + 1) * rows)
            if ablation == "uniform":  # t [R', H, P, S]
                t[rs, hs] = value.to(t.dtype)
            elif isinstance(ablation, Streaming):  # t: scores [R', H, P, S]; value: hidden keys [R, 1, P, S]
                t[rs, hs] = t[rs, hs].masked_fill(value, torch.finfo(t.dtype).min)
            elif value is None:  # t [R', P, H, d]
                t[rs, :, hs] = 0
            else:
                t[rs, :, hs] = value[:, :, hs].to(t.dtype)
        return t

    return hook


# --- ablating a set of heads together ---------------------------------------------------------
@torch.no_grad()
def ablate(model, task, heads, ablation: str = "zero", per_position: bool = True, seed: int = 0,
           batch_size: int = 16) -> np.ndarray:
    """Metric per example ``[N]`` with all of ``heads`` (see :func:`resolve_heads`: a head, a list,
    a layer ``{l: None}``, a cluster) ablated together (the batches shared out over the ranks of
    a multi-process job)."""
    ablation = as_ablation(ablation)
    task = load_task(task, model)
    pairs = resolve_heads(model, heads)
    batches = task.batches(model, batch_size)
    layers = sorted({layer for layer, _ in pairs})
    means = z_means(model, batches, layers, per_position) if ablation == "mean" else {}
    repl = {}
    for layer in layers:
        zs = clean_activations(model, batches, layer)[0]["z"] if ablation == "resample" else None
        repl[layer] = make_replacement(model, ablation, batches, zs, per_position, seed, layer=layer,
                                       mean=means.get(layer))

    def metric(i: int) -> torch.Tensor:
        b = batches[i]
        ref = task.reference(model, b)
        hooks = [(hook_name(ablation, layer), ablation_hook(
            ablation, [[local_index(model, layer, h) for ll, h in pairs if ll == layer]], b.n_rows, repl[layer].value(i)))
            for layer in layers]
        with model.hooks(fwd_hooks=hooks):
            hidden = model(b.inputs, return_type="hidden")
        return task.compute(model, hidden, b, ref).double().cpu()

    return torch.cat(current_world().map(metric, len(batches))).numpy()


def ablation_effect(model, task, heads, ablation: str = "zero", n_bootstrap: int = 1000, seed: int = 0,
                    **kwargs) -> pd.Series:
    """Importance of ablating ``heads`` together: importance, importance_se, CI, metric_clean,
    metric_ablated, n_examples (same columns as one row of :func:`ablation_sweep`)."""
    task = load_task(task, model)
    clean = task.evaluate(model, batch_size=kwargs.get("batch_size", 16))
    ablated = ablate(model, task, heads, ablation, seed=seed, **kwargs)
    table = importance_table([(-1, -1)], clean, {(-1, -1): ablated}, task, n_bootstrap, seed)
    return table.iloc[0].drop(["layer", "head"])


