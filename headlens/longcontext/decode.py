"""Prefill a long context once, then run what follows it many times: the full model, a KV plan
(streaming heads restricted to sink + recent window), heads removed at the decoding positions.

This is how a KV cache is used (and how kvpress applies a press): the context is computed with
full attention and cached; every later position reads the cache. A streaming head's cache keeps
only the ``sink`` first and ``window`` last context positions (:mod:`headlens.importance.streaming`),
so only the positions after the context change, and each plan costs a short continuation run
over the cached context, never a second pass over it.

Shapes: ``R`` rows of a batch, ``s`` the batch's first decoded position (its earliest context
end), ``T = P - s`` decoded positions, ``S = P`` keys, ``H`` heads, ``D`` d_model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from headlens.errors import check
from headlens.importance.streaming import Streaming, context_lengths, hidden_keys
from headlens.model.heads import gate_without
from headlens.model.kv_cache import KVCache

# a hook on every layer's pattern of the context: fn(layer, pattern [R, H, s, s], batch)
PatternHook = Callable[[int, torch.Tensor, object], None]


@dataclass
class Prefilled:
    """One batch with its context run: ``cache`` (frozen, positions ``< start``) and the final
    hidden states of those positions ``[R, start, D]``."""

    batch: object
    start: int
    cache: KVCache
    hidden_before: torch.Tensor


@torch.no_grad()
def prefill(model, task, batch_size: int = 4, on_pattern: Optional[PatternHook] = None) -> list[Prefilled]:
    """Run each batch's context once (``on_pattern`` sees every layer's context pattern)."""
    out = []
    for b in task.batches(model, batch_size):
        s = int(context_lengths(b).min())
        ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
        hooks = []
        if on_pattern is not None:
            hooks = [(f"blocks.{layer}.attn.hook_pattern",
                      lambda t, hook, layer=layer, b=b: on_pattern(layer, t, b)) for layer in range(model.cfg.n_layers)]
        cache = KVCache(model.cfg.n_layers)
        with model.hooks(fwd_hooks=hooks):
            hidden = model(ids[:, :s], attention_mask=mask[:, :s], past_kv=cache, return_type="hidden")
        out.append(Prefilled(b, s, cache.freeze(), hidden))
    return out


def streaming_hooks(model, pre: Prefilled, streaming: dict, spec: Streaming) -> list:
    """Hooks that restrict the query heads of ``streaming`` ``{layer: [kv heads]}`` (original ids)
    to the sink + window cache in ``pre``'s continuation run."""
    b, s = pre.batch, pre.start
    P = b.inputs["input_ids"].shape[1]
    hide = hidden_keys(spec, context_lengths(b), P - s, P, offset=s)  # [R, 1, T, S]
    hooks = []
    for layer, kvs in streaming.items():
        attn = model.blocks[int(layer)].attn
        local = [j for kv in kvs for j in attn.query_heads_of_kv(attn.kv_ids.index(int(kv)))]
        if not local:
            continue

        def hook(t, hook, local=local):
            t = t.clone()
            t[:, local] = t[:, local].masked_fill(hide, torch.finfo(t.dtype).min)
            return t

        hooks.append((f"blocks.{int(layer)}.attn.hook_attn_scores", hook))
    return hooks


@torch.no_grad()
def continue_from(model, pre: Prefilled, streaming: Optional[dict] = None, spec: Streaming = Streaming(),
                  removed=None, fwd_hooks=()) -> torch.Tensor:
    """Final hidden states ``[R, P, D]`` of ``pre``'s batch: the context's from the prefill, the
    rest run from its cache with the kv heads of ``streaming`` restricted to ``spec``'s cache and
    the query heads ``removed`` (``[(layer, head)]``) zeroed at the decoded positions."""
    b, s = pre.batch, pre.start
    hooks = (streaming_hooks(model, pre, streaming, spec) if streaming else []) + list(fwd_hooks)
    gate = gate_without(model, list(removed)) if removed else None
    with model.hooks(fwd_hooks=hooks):
        tail = model(b.inputs["input_ids"][:, s:], attention_mask=b.inputs["attention_mask"], past_kv=pre.cache,
                     head_gate=gate, return_type="hidden")
    return torch.cat([pre.hidden_before, tail], dim=1)


@torch.no_grad()
def evaluate(model, task, prefilled: list[Prefilled], streaming: Optional[dict] = None,
             spec: Streaming = Streaming(), removed=None, metrics=("loss", "accuracy")) -> dict:
    """``{metric: [N]}`` per example of ``task`` (in its order) under a plan (see :func:`continue_from`)."""
    check(len(prefilled) > 0, "nothing prefilled")
    out = {m: [] for m in metrics}
    scorers = {m: task.with_metric(m) for m in metrics}
    for pre in prefilled:
        hidden = continue_from(model, pre, streaming, spec, removed)
        for m in metrics:
            out[m].append(scorers[m].compute(model, hidden, pre.batch).double().cpu())
    return {m: torch.cat(v).numpy() for m, v in out.items()}


def query_heads_of(model, kv_plan: dict) -> list[tuple[int, int]]:
    """The ``(layer, query head)`` of the kv heads ``{layer: [kv heads]}``."""
    cfg = model.cfg
    return [(int(layer), h) for layer, kvs in kv_plan.items() for h in cfg.heads_in_layer(int(layer))
            if h // cfg.group_size in set(map(int, kvs))]

