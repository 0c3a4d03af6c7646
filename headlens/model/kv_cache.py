"""Keys and values of earlier positions, so that a forward pass runs only the new ones.

``model(ids, past_kv=cache)`` attends over the cached positions before its own (as
``transformers``' ``past_key_values`` and TransformerLens' ``past_kv_cache`` do): the new tokens
take positions ``S0 .. S0 + P - 1`` and ``attention_mask``, when given, covers all ``S0 + P``
keys. An open cache appends the new positions (prefill, then decode); a frozen one is only read,
so that many continuations (ablations, KV plans) can run from one prefilled context.

Shapes: ``B`` batch, ``S0`` cached positions, ``P`` new positions, ``K`` key/value heads of the
layer, ``d`` d_head. Entries are kept in the hook layout ``[B, S0, K, d]`` (keys after rotary),
as ``blocks.{l}.attn.hook_rot_k`` (``hook_k`` without rotary) / ``hook_v`` show them.
"""
from __future__ import annotations

from typing import Optional

import torch

from headlens.errors import check


class KVCache:
    """Per-layer keys and values ``[B, S0, K, d]``; ``frozen``: forward passes read it and do not
    append to it."""

    def __init__(self, n_layers: int, frozen: bool = False):
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers
        self.frozen = frozen
        self.copies = 1  # a frozen cache read as this many stacked copies of its batch (see repeat)

    @property
    def length(self) -> int:
        """``S0``: the number of cached positions (0 for an empty cache)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[1])

    @property
    def batch_size(self) -> Optional[int]:
        return None if self.keys[0] is None else int(self.keys[0].shape[0]) * self.copies

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of ``layer`` followed by the new ``k, v [B, P, K, d]``:
        ``[B, S0 + P, K, d]`` each. An open cache keeps the result."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and self.copies > 1:  # one layer at a time: never every layer's copies at once
            old_k, old_v = old_k.repeat(self.copies, 1, 1, 1), old_v.repeat(self.copies, 1, 1, 1)
        if old_k is not None:
            check(old_k.shape[0] == k.shape[0] and old_k.shape[2:] == k.shape[2:],
                  f"past_kv layer {layer} holds keys {tuple(old_k.shape)}, the input gives {tuple(k.shape)}")
            k, v = torch.cat([old_k.to(k.dtype), k], dim=1), torch.cat([old_v.to(v.dtype), v], dim=1)
        if not self.frozen:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def freeze(self) -> "KVCache":
        self.frozen = True
        return self

    def prefix(self, n: int) -> "KVCache":
        """A frozen cache of the first ``n`` positions (views, no copy)."""
        out = KVCache(len(self.keys), frozen=True)
        out.copies = self.copies
        out.keys = [None if k is None else k[:, :n] for k in self.keys]
        out.values = [None if v is None else v[:, :n] for v in self.values]
        return out

    def repeat(self, n: int) -> "KVCache":
        """A frozen cache read as its batch ``n`` times over (stacked copies of a batch); each
        layer's copies are made when that layer reads them."""
        out = self.prefix(self.length)
        out.copies = self.copies * n
        return out
