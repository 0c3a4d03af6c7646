"""Multi-head attention computed explicitly per head, with a hook point on every intermediate.

Shapes: ``B`` batch, ``P`` query positions, ``S`` key positions, ``D`` d_model, ``H`` query heads
in this layer, ``K`` key/value heads in this layer, ``d`` d_head.

Hook points (TransformerLens names, under ``blocks.{l}.attn``):

================ ================= ===========================================================
hook_in          ``[B, P, D]``     the attention's input (after ``ln1`` in pre-norm blocks; not
                                   fired for per-head inputs)
hook_q           ``[B, P, H, d]``  queries (before any QK-norm and rotary)
hook_k           ``[B, S, K, d]``  keys (before any QK-norm and rotary); key/value head ``j``
                                   serves the query heads ``query_heads_of_kv(j)``
hook_v           ``[B, S, K, d]``  values
hook_q_normed    ``[B, P, H, d]``  queries after the QK-norm, before rotary (only with ``qk_norm``)
hook_k_normed    ``[B, S, K, d]``  keys after the QK-norm, before rotary (only with ``qk_norm``)
hook_rot_q       ``[B, P, H, d]``  queries after rotary (rotary models only)
hook_rot_k       ``[B, S, K, d]``  keys after rotary (rotary models only)
hook_attn_scores ``[B, H, P, S]``  scaled, soft-capped (``attn_scores_soft_cap``), masked
                                   scores before the softmax
hook_pattern     ``[B, H, P, S]``  attention pattern (rows sum to 1)
hook_z           ``[B, P, H, d]``  value-weighted output of each head, after the gate
hook_result      ``[B, P, H, D]``  each head's contribution to the residual stream (computed when
                                   something is hooked on it or ``cfg.use_attn_result`` is set)
hook_out         ``[B, P, D]``     the layer's output (the sum of the heads' results and ``b_O``),
                                   before any post-attention norm (``blocks.{l}.hook_attn_out``
                                   is after it, as in TransformerLens)
================ ================= ===========================================================

With a key/value cache (``past_kv``), ``hook_k`` / ``hook_v`` / ``hook_rot_k`` see the new
positions only, and ``S`` counts the cached ones too.

QK-norm (``cfg.qk_norm``): ``"head"`` normalises each head's query and key (``q_norm`` /
``k_norm`` weights ``[d]``, Qwen3, Gemma 3); ``"projection"`` normalises the whole query
projection ``[H*d]`` and key projection ``[K*d]`` (OLMo 2), so every head's query depends on the
other heads' projections: gating or ablating a head's output is still exact, removing its
weights is not (physical pruning refuses such models).

Two ways to the same numbers: a layer whose scores, pattern or per-head values nothing reads (no
hook on any of its hook points above but ``hook_in`` / ``hook_out``, no head gate, no score
soft-cap) runs ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels: no ``[B, H, P, S]`` tensor); every other layer runs the explicit per-head path, which
fires the hooks. :func:`needs_explicit` decides, per layer and forward pass;
``model.set_attn_implementation("eager")`` makes every layer explicit (fp32: the two agree within
1e-4, ``tests/test_fast_attention.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from headlens.model.config import ModelConfig
from headlens.model.layers import Rotary, make_norm

# the hook points only the explicit path fires as they are (hook_in / hook_out are outside it)
INNER_HOOKS = ("q", "k", "v", "q_normed", "k_normed", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")


def _hooked(hook: nn.Module) -> bool:
    """Whether anything is hooked on ``hook`` (TransformerLens' hooks, forward or backward, or
    torch's own module hooks)."""
    return bool(hook._forward_hooks or hook._forward_pre_hooks or hook._backward_hooks
                or hook._backward_pre_hooks or hook.has_hooks())


def needs_explicit(attn: "Attention", gate: Optional[torch.Tensor]) -> bool:
    """Whether layer ``attn`` must run the explicit per-head path in this forward pass: something
    reads or edits its queries, keys, values, scores, pattern, ``z`` or per-head results (a hook,
    ``use_attn_result``), a head gate multiplies its heads, its scores are soft-capped (sdpa cannot
    express that), or the model is set to ``"eager"``. Otherwise sdpa computes the same output."""
    cfg = attn.cfg
    if gate is not None or attn.soft_cap or cfg.use_attn_result or cfg.attn_implementation == "eager":
        return True
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True  # a global module hook would see the hook points
    return any(_hooked(hook) for name in INNER_HOOKS if (hook := getattr(attn, f"hook_{name}", None)) is not None)


class LazyMask:
    """One kind of layer's additive mask ``[B or 1, 1, P, S]`` (0 visible, very negative hidden),
    built when a layer first asks for it, on ``device``. ``plain_causal``: the mask is only the
    causal one (no padding, no window shorter than the input, no cached positions), which sdpa
    applies itself (``is_causal``), so a forward pass that reads no layer's scores never builds it."""

    def __init__(self, build, plain_causal: bool, device):
        self.build, self.plain_causal, self.device = build, plain_causal, torch.device(device)
        self._bias, self._built = None, False

    def bias(self) -> Optional[torch.Tensor]:
        if not self._built:
            self._bias, self._built = self.build(), True
        return self._bias

    def to(self, device) -> "LazyMask":
        """This mask on ``device``: itself, or one built there from this one when first used."""
        device = torch.device(device)
        if device == self.device:
            return self
        return LazyMask(lambda: None if self.bias() is None else self.bias().to(device), self.plain_causal, device)


def plain_causal(cfg: ModelConfig, attention_mask: Optional[torch.Tensor], P: int, S0: int,
                 window: Optional[int]) -> bool:
    """Whether a layer with sliding window ``window`` masks its ``P`` queries by causality alone:
    a causal model, no cached positions (``S0 = 0``), no padding (``attention_mask [B, P]`` None
    or all ones) and no window shorter than the input."""
    return (cfg.causal and S0 == 0 and (not window or window >= P)
            and (attention_mask is None or bool(attention_mask.bool().all())))


class Attention(nn.Module):
    """One attention layer. Parameters, TransformerLens-style, one slice per head:

    ``W_Q [D, H, d]``, ``b_Q [H, d]``, ``W_K``/``W_V [D, K, d]``, ``b_K``/``b_V [K, d]``,
    ``W_O [H, d, D]``, ``b_O [D]``.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.head_ids = cfg.heads_in_layer(layer)  # original query-head indices
        self.kv_ids = cfg.kv_heads_in_layer(layer)  # original key/value-head indices
        H, K, D, d = len(self.head_ids), len(self.kv_ids), cfg.d_model, cfg.d_head
        self.n_heads, self.n_kv_heads = H, K
        self.W_Q = nn.Parameter(torch.empty(D, H, d))
        self.W_K = nn.Parameter(torch.empty(D, K, d))
        self.W_V = nn.Parameter(torch.empty(D, K, d))
        self.W_O = nn.Parameter(torch.empty(H, d, D))
        zeros = (lambda *s: nn.Parameter(torch.zeros(*s)))
        self.b_Q = zeros(H, d) if cfg.qkv_bias else None
        self.b_K = zeros(K, d) if cfg.qkv_bias else None
        self.b_V = zeros(K, d) if cfg.qkv_bias else None
        self.b_O = zeros(D) if cfg.out_bias else None
        self.make_buffers()
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(d)
        self.rotary = Rotary(cfg, layer) if cfg.positional == "rotary" else None
        self.sliding_window = cfg.sliding_window_of(layer)
        self.soft_cap = cfg.attn_scores_soft_cap
        names = ["in", "q", "k", "v"] + (["rot_q", "rot_k"] if self.rotary is not None else [])
        names += ["attn_scores", "pattern", "z", "result", "out"]
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, d if per_head else cfg.n_heads * d)
            self.k_norm = make_norm(cfg, d if per_head else cfg.n_kv_heads * d)
            names += ["q_normed", "k_normed"]
        for name in names:
            setattr(self, f"hook_{name}", HookPoint())

    def make_buffers(self, device=None) -> None:
        """kv_map ``[H]``: query head i (local index) reads key/value head kv_map[i] (local)."""
        kv_local = {kv: j for j, kv in enumerate(self.kv_ids)}
        kv_map = [kv_local[h // self.cfg.group_size] for h in self.head_ids]
        self.register_buffer("kv_map", torch.tensor(kv_map, dtype=torch.long, device=device),
                             persistent=False)
        self._kv_identity = kv_map == list(range(len(self.head_ids)))

    def query_heads_of_kv(self, kv: int) -> list[int]:
        """Local indices of the query heads that read key/value head ``kv`` (local index)."""
        return [i for i, j in enumerate(self.kv_map.tolist()) if j == kv]

    @staticmethod
    def _project(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        """``x [B, P, D]`` @ ``W [D, n, d]`` (+ ``b [n, d]``) -> ``[B, P, n, d]``. Per-head inputs
        ``x [B, P, n, D]``: head ``i`` projects its own copy ``x[:, :, i]``."""
        D, n, d = W.shape
        if x.ndim == 4:
            out = torch.einsum("bpnm,mnd->bpnd", x, W)
            return out + b if b is not None else out
        out = x @ W.reshape(D, n * d)
        if b is not None:
            out = out + b.reshape(n * d)
        return out.view(*x.shape[:-1], n, d)

    def forward(
        self,
        x,
        mask: Optional[torch.Tensor],
        gate: Optional[torch.Tensor] = None,
        rotary_cos_sin: Optional[tuple] = None,
        kv_input: Optional[torch.Tensor] = None,
        past_kv=None,
    ) -> torch.Tensor:
        """``x [B, P, D]`` -> ``[B, P, D]``.

        x: ``[B, P, D]``, or per-head inputs ``(q_input [B, P, H, D], k_input [B, S, K, D],
        v_input [B, S, K, D])`` (TransformerLens' ``use_split_qkv_input`` / ``use_attn_in``).
        mask: additive ``[B or 1, 1, P, S]`` (0 visible, very negative hidden), a :class:`LazyMask`
        or None.
        gate: ``[H]`` (or ``[B, H]``, one per example) multiplier on each head's output (1 keeps,
        0 removes); may need grad.
        kv_input: ``[B, S, D]`` to attend over instead of ``x`` (defaults to ``x``).
        past_kv: a :class:`headlens.model.kv_cache.KVCache` whose positions come before ``x``'s
        (then ``S = S0 + P`` and ``mask`` covers all of them).
        """
        explicit = needs_explicit(self, gate)
        if isinstance(x, tuple):
            q_in, k_in, v_in = x
        else:
            x = self.hook_in(x)
            q_in = x
            k_in = v_in = x if kv_input is None else kv_input
        q = self.hook_q(self._project(q_in, self.W_Q, self.b_Q))  # [B, P, H, d]
        k = self.hook_k(self._project(k_in, self.W_K, self.b_K))  # [B, S, K, d]
        v = self.hook_v(self._project(v_in, self.W_V, self.b_V))
        if self.cfg.qk_norm != "none":
            q = self.hook_q_normed(self._qk_norm(self.q_norm, q))
            k = self.hook_k_normed(self._qk_norm(self.k_norm, k))
        if self.rotary is not None:
            cos, sin = (t.transpose(1, 2) for t in rotary_cos_sin)  # [B, P, 1, rotary_dim]
            q = self.hook_rot_q(self.rotary.apply(q, cos, sin))
            k = self.hook_rot_k(self.rotary.apply(k, cos, sin))
        if past_kv is not None:  # earlier positions first: [B, S0 + P, K, d]
            k, v = past_kv.extend(self.layer, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, n, P, d]
        if not self._kv_identity:  # grouped-query attention: each query head reads its group
            k, v = k.index_select(1, self.kv_map), v.index_select(1, self.kv_map)
        if explicit:
            z = self._explicit(q, k, v, mask.bias() if isinstance(mask, LazyMask) else mask, gate)
        else:
            z = self._sdpa(q, k, v, mask)
        z = self.hook_z(z)
        H, d, D = self.W_O.shape
        if self.cfg.use_attn_result or self.hook_result.has_hooks():
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            out = result.sum(dim=2)
        else:
            out = z.reshape(*z.shape[:2], H * d) @ self.W_O.reshape(H * d, D)
        if self.b_O is not None:
            out = out + self.b_O
        return self.hook_out(out)

    def _explicit(self, q, k, v, mask: Optional[torch.Tensor], gate: Optional[torch.Tensor]) -> torch.Tensor:
        """``q [B, H, P, d]``, ``k``, ``v [B, H, S, d]`` (one key/value per query head) -> ``z
        [B, P, H, d]``, through ``hook_attn_scores`` and ``hook_pattern``, gated by ``gate``."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.soft_cap:
            scores = torch.tanh(scores / self.soft_cap) * self.soft_cap
        if mask is not None:
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        # in float32 as transformers does (float64 models stay in float64: a fully masked row, a padded
        # query outside its sliding window, would overflow to -inf and give NaN)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        pattern = self.hook_pattern(pattern)
        z = torch.matmul(pattern, v).transpose(1, 2)  # [B, P, H, d]
        if gate is not None:  # [H], or [B, H] per example
            g = gate.to(z.dtype)
            z = z * (g[:, None] if g.ndim == 1 else g[:, None, :, None])
        return z

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        """As :meth:`_explicit` without hooks or gate, by ``scaled_dot_product_attention``: ``z [B, P,
        H, d]``. A plainly causal :class:`LazyMask` becomes ``is_causal`` and is never built."""
        causal = isinstance(mask, LazyMask) and mask.plain_causal
        bias = None if causal else mask.bias() if isinstance(mask, LazyMask) else mask
        z = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=self.scale)
        return z.transpose(1, 2)

    def _qk_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x [B, P, n, d]`` through the QK-norm: per head, or over all ``n * d`` features."""
        if self.cfg.qk_norm == "head":
            return norm(x)
        return norm(x.flatten(-2)).view_as(x)
