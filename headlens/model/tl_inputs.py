"""TransformerLens' opt-in attention and MLP inputs of a :class:`~headlens.model.transformer.Block`.

Shapes: ``B`` batch, ``P`` positions, ``D`` d_model, ``H`` query heads, ``K`` key/value heads.
With ``cfg.use_attn_in`` the block fires ``hook_attn_in [B, P, H, D]``, with
``cfg.use_split_qkv_input`` ``hook_q_input [B, P, H, D]``, ``hook_k_input`` / ``hook_v_input
[B, P, K, D]``: one copy of the residual stream per head, each normed on its own, so that a patch
reaches one head's queries, keys or values only (TransformerLens' ``patching`` uses them). Under
grouped-query attention with ``use_attn_in``, a key/value head reads the copy of its first query
head. ``cfg.use_hook_mlp_in`` fires ``hook_mlp_in [B, P, D]``, a copy of the MLP's input.
"""
from __future__ import annotations

import torch


class BlockInputs:
    """Mixin for Block: :meth:`attention_input` and :meth:`mlp_input`."""

    def attention_input(self, x: torch.Tensor):
        """What the attention reads from the residual stream ``x [B, P, D]``: ``[B, P, D]``
        (normed by ``ln1`` in pre-norm blocks), or per-head copies ``(q, k, v)`` inputs when
        ``cfg.use_attn_in`` / ``cfg.use_split_qkv_input`` is set."""
        cfg = self.cfg
        norm = self.ln1 if cfg.norm_position in ("pre", "sandwich") else (lambda t: t)
        if not (cfg.use_attn_in or cfg.use_split_qkv_input):
            return norm(x)
        attn = self.attn
        H, K = attn.n_heads, attn.n_kv_heads
        if cfg.use_attn_in:
            q_in = self.hook_attn_in(x[:, :, None].repeat(1, 1, H, 1))  # [B, P, H, D]
            first = [attn.query_heads_of_kv(j)[0] for j in range(K)]  # a key/value head reads its first query head's copy
            k_in = v_in = q_in if first == list(range(H)) else q_in[:, :, first]
        else:
            q_in = self.hook_q_input(x[:, :, None].repeat(1, 1, H, 1))
            k_in = self.hook_k_input(x[:, :, None].repeat(1, 1, K, 1))  # [B, P, K, D]
            v_in = self.hook_v_input(x[:, :, None].repeat(1, 1, K, 1))
        return norm(q_in), norm(k_in), norm(v_in)

    def mlp_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_mlp_in(x.clone()) if self.cfg.use_hook_mlp_in else x
