"""Building blocks other than attention: norms, rotary embeddings and MLPs.

Shapes: ``B`` batch, ``P`` positions, ``D`` d_model, ``F`` d_mlp.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from headlens.errors import HeadlensError
from headlens.model.config import ModelConfig


def _norm_hooked(norm) -> bool:
    return norm.hook_scale.has_hooks() or norm.hook_normalized.has_hooks()


def _hooked_normalize(norm, x: torch.Tensor, square: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x * rsqrt(square)`` through ``norm.hook_scale`` (``sqrt(square)``) and
    ``norm.hook_normalized``: ``(normalized, edited)``. The hooks see copies, so that an edit,
    even in place, is seen; unedited, the values are those of the unhooked path."""
    scale = square.sqrt()
    hooked_scale = norm.hook_scale(scale.clone())
    scale_edited = not torch.equal(hooked_scale, scale)
    normalized = x / hooked_scale if scale_edited else x * torch.rsqrt(square)
    hooked = norm.hook_normalized(normalized.clone())
    return hooked, scale_edited or not torch.equal(hooked, normalized)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' hook points. ``[..., D] -> [..., D]``; parameters ``weight``,
    ``bias`` as in ``nn.LayerNorm``.

    ``hook_scale [..., 1]`` is ``sqrt(var + eps)``, ``hook_normalized [..., D]`` the centred input
    divided by it (before weight and bias), both in float32 as TransformerLens computes them. The
    output is torch's fused kernel's unless a hook changed one of them (even in place): then it is
    computed from the hooked values."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _norm_hooked(self):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 - x32.mean(-1, keepdim=True)
        variance = x32.pow(2).mean(-1, keepdim=True) + self.eps
        normalized, edited = _hooked_normalize(self, x32, variance)
        if not edited:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return (normalized * self.weight.to(x32.dtype) + self.bias.to(x32.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32 as ``transformers`` does.
    ``[..., d] -> [..., d]``.

    LLaMA: ``weight * normalized.to(dtype)``; ``fp32_weight`` (Gemma, OLMo 2): the weight is
    applied in float32 before casting back; ``offset`` (Gemma): the scale is ``1 + weight``.
    Hook points as :class:`LayerNorm`'s: ``hook_scale [..., 1]`` = ``sqrt(mean(x^2) + eps)``,
    ``hook_normalized [..., d]`` = ``x / scale`` (float32, before the weight)."""

    def __init__(self, d: int, eps: float, offset: bool = False, fp32_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps
        self.offset = offset
        self.fp32_weight = fp32_weight or offset
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wide = torch.promote_types(dtype, torch.float32)  # float64 models stay in float64
        x32 = x.to(wide)
        mean_square = x32.pow(2).mean(-1, keepdim=True) + self.eps
        if _norm_hooked(self):
            x32 = _hooked_normalize(self, x32, mean_square)[0]
        else:
            x32 = x32 * torch.rsqrt(mean_square)
        if self.fp32_weight:
            w = self.weight.to(wide)
            return (x32 * (1.0 + w if self.offset else w)).to(dtype)
        return self.weight * x32.to(dtype)


def make_norm(cfg: ModelConfig, d: Optional[int] = None) -> nn.Module:
    """The family's norm over ``d`` features (default d_model)."""
    d = d or cfg.d_model
    if cfg.norm == "layernorm":
        return LayerNorm(d, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return RMSNorm(d, cfg.norm_eps, offset=cfg.norm_offset, fp32_weight=cfg.norm_fp32_weight)
    return nn.Identity()


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` features of each head
    (GPT-NeoX / LLaMA "rotate half" convention, as in ``transformers``).

    As in ``transformers``, frequencies are ``base ** (-2i / rotary_dim)`` for ``2i < rotary_dim``
    and rotate ``2 * len(inv_freq)`` features (one more than an odd ``rotary_dim``)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.freq_dim = cfg.rotary_dim or cfg.d_head
        self.dim = 2 * ((self.freq_dim + 1) // 2)
        self.base, self.scaling = cfg.rotary_of(layer)
        self.make_buffers()

    @property
    def key(self) -> tuple:
        """Layers whose rotary has the same key share their cos / sin."""
        return self.freq_dim, self.base, repr(self.scaling)

    def make_buffers(self, device=None) -> None:
        exponents = torch.arange(0, self.freq_dim, 2, dtype=torch.float32, device=device) / self.freq_dim
        inv_freq = scale_frequencies(1.0 / (self.base ** exponents), self.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """``position_ids [B, P]`` -> cos, sin ``[B, 1, P, rotary_dim]``."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, P, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., d]`` (only its first ``rotary_dim`` features) by ``cos``, ``sin``
        broadcast against it (``[B, 1, P, rotary_dim]`` for ``[B, heads, P, d]``, or
        ``[B, P, 1, rotary_dim]`` for ``[B, P, heads, d]``)."""
        rot, rest = x[..., : self.dim], x[..., self.dim:]
        half = self.dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos + rotated * sin
        return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def scale_frequencies(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Rotary frequencies ``[dim/2]`` under ``transformers``' "linear" or "llama3" rope scaling."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise HeadlensError(f"rotary_scaling: rope_type must be 'default', 'linear' or 'llama3', got {kind!r}")
    old_ctx = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, as torch's one fused
    kernel (the same function; within ~2e-7 of transformers' ``NewGELUActivation`` in float32)."""
    return F.gelu(x, approximate="tanh")


MLP_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": _gelu_new,
}


class MLP(nn.Module):
    """Feed-forward block. Plain: ``W_out(act(W_in x))``; gated (swiglu / geglu / geglu_tanh):
    ``W_out(act(W_gate x) * W_in x)``. ``[B, P, D] -> [B, P, D]``.

    Weights are stored as ``nn.Linear`` modules (state-dict names ``W_in.weight [F, D]``,
    ``W_out.weight [D, F]`` ...; :meth:`linear` returns them); the attributes ``W_in`` /
    ``W_gate [D, F]``, ``W_out [F, D]``, ``b_in [F]``, ``b_out [D]`` read as TransformerLens'
    tensors. Hook points ``[B, P, F]`` as TransformerLens': ``hook_pre`` before the activation
    (gated: ``W_gate x``), ``hook_pre_linear`` (gated only: ``W_in x``), ``hook_post`` after it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu", "geglu_tanh")
        self.act = MLP_ACTIVATIONS[cfg.mlp]
        self.W_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        if self.gated:
            self.W_gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.W_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # [B, P, F]
        if self.gated:
            self.hook_pre_linear = HookPoint()  # [B, P, F]
        self.hook_post = HookPoint()  # [B, P, F]

    def linear(self, name: str) -> nn.Linear:
        """The ``nn.Linear`` named ``name`` (``"W_in"``, ``"W_gate"``, ``"W_out"``)."""
        module = self._modules.get(name)
        if module is None:
            raise AttributeError(f"this MLP has no {name}")
        return module

    @property
    def W_in(self) -> torch.Tensor:
        return self.linear("W_in").weight.T

    @property
    def W_gate(self) -> torch.Tensor:
        return self.linear("W_gate").weight.T

    @property
    def W_out(self) -> torch.Tensor:
        return self.linear("W_out").weight.T

    @property
    def b_in(self) -> torch.Tensor:
        b = self.linear("W_in").bias
        return b if b is not None else self.W_in.new_zeros(self.W_in.shape[1])

    @property
    def b_out(self) -> torch.Tensor:
        b = self.linear("W_out").bias
        return b if b is not None else self.W_out.new_zeros(self.W_out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W_in, W_out = self.linear("W_in"), self.linear("W_out")
        if self.gated:
            post = self.act(self.hook_pre(self.linear("W_gate")(x))) * self.hook_pre_linear(W_in(x))
        else:
            post = self.act(self.hook_pre(W_in(x)))
        return W_out(self.hook_post(post))
