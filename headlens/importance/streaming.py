"""The streaming ablation: a head restricted to the KV cache of a streaming head (Xiao et al. 2023;
DuoAttention, Xiao et al. 2024): the ``sink`` first positions and the ``window`` most recent ones.

It is what a KV cache compressed after prefilling the context gives (kvpress' presses,
``DuoAttentionPress`` among them): the context itself is computed with full attention; every
query after it (the question, the answer, a continuation) sees, of the context, only keys
``j < sink`` and ``j >= context_len - window``, plus all keys after the context. The task says
where its context ends, per example, in ``batch.targets["context_len"]`` (the long-context tasks
of :mod:`headlens.longcontext.tasks` do).

Restricting one head (or one key/value head's query heads) is exact: the head's scores are the
clean ones, so its new pattern is the clean pattern renormalised over the keys it still sees,
i.e. ``softmax`` of the clean scores with the hidden keys masked. Only positions at or after the
context end change, which lets the fast sweep (:mod:`headlens.importance.sweep`) rerun only those
positions from a KV cache of the clean context.

Shapes: ``R`` rows of a batch, ``P`` query positions, ``S`` key positions, ``S0`` positions
before the queries (cached), ``T`` positions from the first changed one, ``d`` d_head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlens.errors import check


@dataclass(frozen=True)
class Streaming:
    """The streaming ablation's KV cache: ``sink`` first positions plus ``window`` recent ones."""

    sink: int = 4
    window: int = 64
    kind = "streaming"

    def __post_init__(self):
        check(isinstance(self.sink, int) and self.sink >= 0, f"sink must be an int >= 0, got {self.sink!r}")
        check(isinstance(self.window, int) and self.window >= 1, f"window must be an int >= 1, got {self.window!r}")

    def __str__(self) -> str:
        return f"streaming(sink={self.sink}, window={self.window})"


def context_lengths(batch) -> torch.Tensor:
    """``[R]`` where each row's context ends (the first position that decodes from the cache)."""
    check("context_len" in batch.targets,
          "the streaming ablation needs a task that says where its context ends (targets['context_len']): "
          "use a long-context task (headlens.longcontext.tasks)")
    return batch.targets["context_len"]


def hidden_keys(spec: Streaming, context_len: torch.Tensor, P: int, S: int, offset: int = 0) -> torch.Tensor:
    """``[R, 1, P, S]`` bool: the keys a streaming head no longer sees. Queries are positions
    ``offset .. offset + P - 1``; a query at or after its row's ``context_len`` C loses the keys
    ``sink <= j < C - window``."""
    C = context_len.to(torch.long)[:, None, None, None]
    q = torch.arange(offset, offset + P, device=C.device)[None, None, :, None]
    j = torch.arange(S, device=C.device)[None, None, None, :]
    return (q >= C) & (j >= spec.sink) & (j < C - spec.window)


def restricted_z(spec: Streaming, scores: torch.Tensor, values: torch.Tensor, context_len: torch.Tensor,
                 offset: int) -> torch.Tensor:
    """One head's output when it streams: ``scores [R, P, S]`` (clean, masked, pre-softmax) of
    queries ``offset ..``, its values ``[R, S, d]`` -> ``z [R, P, d]``."""
    hide = hidden_keys(spec, context_len, scores.shape[1], scores.shape[2], offset)[:, 0]
    pattern = torch.softmax(scores.masked_fill(hide, torch.finfo(scores.dtype).min), dim=-1, dtype=torch.float32)
    return pattern.to(values.dtype) @ values


class StreamingReplacement:
    """What a streaming head's ``z`` becomes, per batch, for one layer (the interface of
    :class:`headlens.importance.ablation.Replacement`).

    Fast sweep: ``acts`` holds the layer's clean ``attn_scores [R, H, T, S]`` and ``v [R, T, K, d]``
    of the positions from ``starts[i]`` on, ``prefix_values[i] [R, S0, K, d]`` the values before
    them. Naive hooks: :meth:`value` is the mask of hidden keys over all positions."""

    def __init__(self, spec: Streaming, batches, acts=None, starts=None, prefix_values=None):
        self.spec, self.batches = spec, batches
        self.acts, self.starts, self.prefix_values = acts, starts, prefix_values

    def head_z(self, i: int, j: int, v, attn) -> torch.Tensor:
        """Local head ``j``'s ``z [R, T, d]`` in batch ``i`` when it streams."""
        values = self.acts["v"][i]
        if self.prefix_values is not None and self.prefix_values[i] is not None:
            values = torch.cat([self.prefix_values[i].to(values.dtype), values], dim=1)
        kv = int(attn.kv_map[j])
        return restricted_z(self.spec, self.acts["attn_scores"][i][:, j], values[:, :, kv],
                            context_lengths(self.batches[i]), self.starts[i] if self.starts else 0)

    def value(self, i: int) -> torch.Tensor:
        """``[R, 1, P, P]`` hidden keys of batch ``i`` (for a hook on ``hook_attn_scores``)."""
        b = self.batches[i]
        P = b.inputs["input_ids"].shape[1]
        return hidden_keys(self.spec, context_lengths(b), P, P)


def first_changed_position(ablation, batch) -> int:
    """The first position the ablation can change in ``batch`` (0 but for streaming: the
    earliest context end of its rows)."""
    if not isinstance(ablation, Streaming):
        return 0
    return int(context_lengths(batch).min())
