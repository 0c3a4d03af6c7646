"""headlens' own transformer: one class for every family, configured by :class:`ModelConfig`.

Shapes: ``B`` batch, ``P`` positions, ``S`` key positions, ``D`` d_model, ``V`` vocabulary,
``L`` layers, ``H`` heads.
Hook names follow TransformerLens (``hook_embed``, ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.ln1.hook_scale``, ``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.hook_attn_out``,
``blocks.{l}.hook_resid_post``, ``ln_final.hook_normalized`` ...), so ``run_with_hooks`` /
``run_with_cache`` work as there. The rest of TransformerLens' surface (token helpers, the
``ActivationCache``, weight stacks, weight processing, ``generate``) comes from the mixins in
``tl_tokens``, ``tl_run``, ``tl_weights``, ``processing`` and ``generate``.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from numbers import Integral
from typing import Optional, Sequence, Union

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from headlens.errors import HeadlensError, check
from headlens.model.attention import Attention, LazyMask, plain_causal
from headlens.model.config import ModelConfig
from headlens.model.generate import Generation
from headlens.model.layers import MLP, MLP_ACTIVATIONS, LayerNorm, make_norm
from headlens.model.processing import WeightProcessing
from headlens.model.tl_inputs import BlockInputs
from headlens.model.tl_run import RETURN_TYPES, RunSurface
from headlens.model.tl_tokens import TokenHelpers
from headlens.model.tl_weights import WeightStacks

Gate = Union[torch.Tensor, Sequence[torch.Tensor]]


def visible_positions(P: int, causal: bool, sliding_window: Optional[int], device=None,
                      offset: int = 0) -> Optional[torch.Tensor]:
    """``[P, offset + P]`` bool: which key positions each query position may see by position alone
    (keys up to the query, within ``sliding_window`` if any, for causal models); None: all of them.
    ``offset``: the queries are positions ``offset .. offset + P - 1`` (after a KV cache)."""
    if not causal:
        return None
    i = torch.arange(offset, offset + P, device=device)
    j = torch.arange(offset + P, device=device)
    visible = j[None, :] <= i[:, None]
    if sliding_window:
        visible = visible & (i[:, None] - j[None, :] < sliding_window)
    return visible


def to_device(items: tuple, device) -> tuple:
    """``items`` (tensors, tuples of tensors or None) on ``device`` (no copy when already there)."""
    return tuple(None if t is None else tuple(u.to(device) for u in t) if isinstance(t, tuple) else t.to(device)
                 for t in items)


def module_device(module: nn.Module, default) -> torch.device:
    """Where ``module``'s weights are (``default`` for a module without any, e.g. ``nn.Identity``)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else default


class Block(BlockInputs, nn.Module):
    """One transformer layer; ``cfg.norm_position`` places the norms around a sublayer ``f``:
    ``pre`` ``x + f(ln(x))`` (GPT-2, LLaMA), ``post`` ``ln(x + f(x))`` (BERT), ``sandwich``
    ``x + ln_post(f(ln(x)))`` (Gemma 2/3), ``output`` ``x + ln_post(f(x))`` (OLMo 2); or
    parallel (GPT-NeoX) ``x + attn(ln1 x) + mlp(ln2 x)``.

    Norm modules: ``ln1`` / ``ln2`` before (pre, sandwich) or after (post) the residual sum,
    ``ln1_post`` / ``ln2_post`` on the sublayer outputs (sandwich, output), as TransformerLens
    names them. ``hook_attn_out`` / ``hook_mlp_out`` are what is added to the residual stream
    (after ``ln1_post`` / ``ln2_post``).

    Hook points ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``,
    ``hook_resid_post`` ``[B, P, D]``; TransformerLens' opt-in per-head inputs and ``hook_mlp_in``:
    :mod:`headlens.model.tl_inputs`."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        has_mlp = cfg.mlp != "none"
        pos = cfg.norm_position
        if pos != "output":
            self.ln1 = make_norm(cfg)
        if pos in ("sandwich", "output"):
            self.ln1_post = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg) if has_mlp else None
        self.ln2 = make_norm(cfg) if has_mlp and pos != "output" else None
        if has_mlp and pos in ("sandwich", "output"):
            self.ln2_post = make_norm(cfg)
        for name in ("resid_pre", "attn_in", "q_input", "k_input", "v_input", "attn_out", "resid_mid",
                     "mlp_in", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, mask, gate=None, rotary_cos_sin=None, attn_out=None, past_kv=None):
        """``x [B, P, D]`` -> ``[B, P, D]``. ``attn_out [B, P, D]``: take this as the attention
        layer's output (``attn.hook_out``, before any ``ln1_post``) instead of computing it (the
        rest of the layer runs as usual). ``past_kv``: a KV cache of earlier positions (see
        :mod:`headlens.model.kv_cache`)."""
        # the model may be placed over several devices (headlens.runtime.devices): bring the inputs here
        x, mask, gate, rotary_cos_sin, attn_out = to_device((x, mask, gate, rotary_cos_sin, attn_out),
                                                            self.attn.W_O.device)
        x = self.hook_resid_pre(x)
        pos = self.cfg.norm_position
        post = pos == "post"
        if attn_out is None:
            attn_out = self.attn(self.attention_input(x), mask, gate, rotary_cos_sin, past_kv=past_kv)
        if pos in ("sandwich", "output"):
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if self.mlp is None:
            resid = x + attn_out
            return self.hook_resid_post(self.ln1(resid) if post else resid)
        if self.cfg.parallel_block:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(self.mlp_input(x))))
            return self.hook_resid_post(x + attn_out + mlp_out)
        if post:
            mid = self.hook_resid_mid(self.ln1(x + attn_out))
            mlp_out = self.hook_mlp_out(self.mlp(self.mlp_input(mid)))
            return self.hook_resid_post(self.ln2(mid + mlp_out))
        mid = self.hook_resid_mid(x + attn_out)
        mlp_in = self.mlp_input(mid)
        mlp_out = self.mlp(mlp_in if pos == "output" else self.ln2(mlp_in))
        if pos in ("sandwich", "output"):
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(mid + mlp_out)


class Unembed(nn.Module):
    """Final norm and output head. ``lm``: ``[B, P, D] -> [B, P, V]``; ``mlm``: BERT's
    dense + activation + LayerNorm transform, then the vocabulary projection. Logits are
    soft-capped when ``cfg.output_logits_soft_cap`` is set (Gemma 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.unembed == "mlm":
            self.transform = nn.Linear(cfg.d_model, cfg.d_model)
            self.transform_ln = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.vocab_size))
        self.b_U = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.unembed_bias else None

    def forward(self, x: torch.Tensor, W_E: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., V]``, on ``x``'s device (computed where the output weights are)."""
        home, W = x.device, (W_E if self.cfg.tie_embeddings else self.W_U)
        x = x.to(W.device)
        if self.cfg.unembed == "mlm":
            x = self.transform_ln(MLP_ACTIVATIONS["gelu"](self.transform(x)))
        x = x.contiguous()  # a slice (e.g. hidden[:, :-1]) would send the matmul down a slower batched path
        logits = x @ (W_E.T if self.cfg.tie_embeddings else self.W_U)
        if self.b_U is not None:
            logits = logits + self.b_U
        cap = self.cfg.output_logits_soft_cap
        return (torch.tanh(logits / cap) * cap if cap else logits).to(home)


class HeadlensModel(TokenHelpers, WeightStacks, WeightProcessing, RunSurface, Generation, HookedRootModule):
    """A transformer whose every head can be read, gated, masked or replaced.

    ``model(input_ids)`` returns logits ``[B, P, V]`` (or final hidden states ``[B, P, D]`` for
    encoders without an output head). ``head_gate`` ``[L, H]`` (or ``[B, L, H]``, one per example) multiplies each head's output.
    ``model.W_E`` / ``model.W_pos`` are the embedding tables as tensors (TransformerLens' names);
    the ``nn.Embedding`` modules holding them keep the state-dict names ``W_E.weight`` /
    ``W_pos.weight`` (``model.get_submodule("W_E")``).
    """

    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.add_module("W_E", nn.Embedding(cfg.vocab_size, cfg.d_model))
        if cfg.positional == "learned":
            self.add_module("W_pos", nn.Embedding(cfg.n_ctx, cfg.d_model))
        self.W_token_type = nn.Embedding(cfg.n_token_types, cfg.d_model) if cfg.n_token_types else None
        self.embed_ln = LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.embed_norm else None
        self.hook_embed = HookPoint()  # [B, P, D]
        self.hook_pos_embed = HookPoint()  # [B, P, D]
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg) if (cfg.final_norm and cfg.norm_position != "post") else None
        self.hook_final = HookPoint()  # [B, P, D] final hidden state, after the final norm
        self.unembed = Unembed(cfg) if cfg.unembed != "none" else None
        self.setup()
        self._sync_cfg()

    # --- construction ---------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "HeadlensModel":
        """Random initialisation (normal(0, std) matrices, zero biases, unit norms: weight 1, or 0
        where the norm scales by ``1 + weight``)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight"):  # the 1-d weights are the norms'
                p.fill_(0.0 if self.cfg.norm_offset else 1.0)
            else:
                p.zero_()
        return self

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict, tokenizer=None) -> "HeadlensModel":
        """Build a model around ``state`` (tensors used as they are: no random init, no copy)."""
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        missing = set(model.state_dict()) - set(state)
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise HeadlensError(f"weights do not match the config: missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}")
        for name, p in model.state_dict().items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise HeadlensError(f"weight {name!r} has shape {tuple(state[name].shape)}, "
                                    f"the config needs {tuple(p.shape)}")
            if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
                raise HeadlensError(f"weight {name!r} holds NaN or infinite values (a corrupted checkpoint?)")
        model.load_state_dict(state, strict=True, assign=True)
        devices = {"": next(iter(state.values())).device}
        for name, module in model.named_modules():  # each module's buffers where its weights are
            own = next(module.parameters(), None)
            devices[name] = own.device if own is not None else devices[name.rpartition(".")[0]]
            if hasattr(module, "make_buffers"):
                module.make_buffers(devices[name])
        model._sync_cfg()
        return model.eval()

    def get_submodule(self, target: str) -> nn.Module:
        """As ``nn.Module.get_submodule``, walking the module tree itself, so that ``"W_E"`` /
        ``"W_pos"`` name the embedding modules (the attributes of those names are their tables)."""
        module = self
        for name in target.split(".") if target else []:
            if name not in module._modules or module._modules[name] is None:
                raise AttributeError(f"{type(module).__name__} has no submodule {name!r} (in {target!r})")
            module = module._modules[name]
        return module

    @property
    def device(self) -> torch.device:
        """Where inputs go and outputs come back: the token embedding's device."""
        return self.W_E.device

    def place(self, device_map, max_memory=None) -> "HeadlensModel":
        """Put the blocks on several devices: ``device_map`` is ``"auto"`` (accelerate's
        ``infer_auto_device_map`` under ``max_memory``), ``{layer: device}`` or ``{module: device}``
        (see :mod:`headlens.runtime.devices`); the embeddings stay together. The forward pass then
        moves activations from block to block and returns its results on :attr:`device`; the
        map used is kept in ``self.device_map``."""
        from headlens.runtime.devices import place, resolve_device_map

        self.device_map = resolve_device_map(self, device_map, max_memory,
                                             together=("W_E", "W_pos", "W_token_type", "embed_ln"))
        place(self, self.device_map)
        self._sync_cfg()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    def head_labels(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head, in original head indices, layer-major."""
        return [(layer, h) for layer in range(self.cfg.n_layers) for h in self.cfg.heads_in_layer(layer)]

    # --- forward --------------------------------------------------------------------------
    def attention_mask_bias(self, attention_mask: Optional[torch.Tensor], P: int, dtype,
                            offset: int = 0, layer: int = 0) -> Optional[torch.Tensor]:
        """Additive mask ``[B or 1, 1, P, offset + P]`` of layer ``layer`` (its sliding window, if
        any): 0 where a query may look, dtype-min elsewhere (``offset``: cached positions before
        the queries)."""
        cfg, device = self.cfg, self.device
        visible = visible_positions(P, cfg.causal, cfg.sliding_window_of(layer), device, offset)
        visible = visible[None, None] if visible is not None else None
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :].bool()
            visible = keys if visible is None else (visible & keys)
        if visible is None:
            return None
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(visible, zero, torch.finfo(dtype).min)

    @staticmethod
    def _gate_row(head_gate: Gate, layer: int):
        """Layer ``layer``'s gate: ``[H]``, or ``[B, H]`` for a per-example ``[B, L, H]`` gate."""
        per_example = isinstance(head_gate, torch.Tensor) and head_gate.ndim == 3
        return head_gate[:, layer] if per_example else head_gate[layer]

    def _gate_for(self, head_gate: Optional[Gate], layer: int) -> Optional[torch.Tensor]:
        if head_gate is None:
            return None
        g = self._gate_row(head_gate, layer)
        H = self.blocks[layer].attn.n_heads
        if g.shape[-1] != H:
            g = g[..., :H]  # a padded [L, max H] gate on a pruned model
        return g

    def check_gate(self, head_gate: Gate, batch_size: Optional[int] = None) -> None:
        L = self.cfg.n_layers
        per_example = isinstance(head_gate, torch.Tensor) and head_gate.ndim == 3
        if per_example:
            check(batch_size is None or head_gate.shape[0] == batch_size,
                  f"a per-example head_gate [batch, n_layers, n_heads] needs one row per example "
                  f"({batch_size}), got {head_gate.shape[0]}")
        n_rows = head_gate.shape[1] if per_example else len(head_gate)
        check(n_rows == L, f"head_gate must have one row per layer ({L}), got {n_rows}")
        for layer in range(L):
            H = self.blocks[layer].attn.n_heads
            row = self._gate_row(head_gate, layer)
            check(isinstance(row, torch.Tensor) and row.ndim == 1 + per_example,
                  f"head_gate must be a [n_layers, n_heads] tensor, a per-example [batch, n_layers, n_heads] "
                  f"tensor or a list of 1-d tensors; row {layer} is "
                  f"{type(row).__name__}{tuple(row.shape) if isinstance(row, torch.Tensor) else ''}")
            n = row.shape[-1]
            check(n >= H, f"head_gate row {layer} has {n} entries, layer {layer} has {H} heads")
        rows = [head_gate] if isinstance(head_gate, torch.Tensor) else head_gate
        check(all(bool(torch.isfinite(r.detach()).all()) for r in rows), "head_gate holds NaN or infinite values")

    def check_inputs(self, B: int, P: int, input_ids, attention_mask, token_type_ids, position_ids,
                     residual, start_at_layer: int, stop_at_layer: Optional[int], S0: int = 0) -> None:
        """Shapes, dtypes, ranges and finiteness of :meth:`forward`'s arguments (``S0``: positions
        in ``past_kv``, which ``attention_mask`` covers too)."""
        cfg, L = self.cfg, self.cfg.n_layers
        if input_ids is not None:
            check(not input_ids.is_floating_point() and not input_ids.is_complex(),
                  f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            check(input_ids.numel() > 0,
                  f"input_ids is empty (shape {tuple(input_ids.shape)}): need at least one token")
            check(int(input_ids.min()) >= 0 and int(input_ids.max()) < cfg.vocab_size,
                  f"input_ids must lie in [0, {cfg.vocab_size}) for this model's vocabulary")
        if residual is not None:
            check(residual.ndim == 3 and residual.shape[-1] == cfg.d_model and residual.numel() > 0,
                  f"residual must be [batch, pos, d_model={cfg.d_model}], got shape {tuple(residual.shape)}")
            check(bool(torch.isfinite(residual.detach()).all()), "residual holds NaN or infinite values")
        for name, t, n in (("attention_mask", attention_mask, S0 + P), ("token_type_ids", token_type_ids, P)):
            check(t is None or tuple(t.shape) == (B, n),
                  f"{name} must have the shape {(B, n)}" + (" (past_kv's positions, then input_ids')" if n != P else
                  " of input_ids") + f", got {tuple(t.shape) if t is not None else None}")
        if token_type_ids is not None and self.W_token_type is not None:
            check(int(token_type_ids.min()) >= 0 and int(token_type_ids.max()) < cfg.n_token_types,
                  f"token_type_ids must lie in [0, {cfg.n_token_types})")
        if position_ids is not None:
            check(position_ids.ndim == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == P,
                  f"position_ids must be [batch, pos] = {(B, P)} (or [1, pos]), got {tuple(position_ids.shape)}")
            check(int(position_ids.min()) >= 0 and int(position_ids.max()) < cfg.n_ctx,
                  f"position_ids must lie in [0, {cfg.n_ctx})")
        stop = L if stop_at_layer is None else stop_at_layer
        check(isinstance(start_at_layer, Integral) and 0 <= start_at_layer <= L,
              f"start_at_layer must be an int in [0, {L}], got {start_at_layer!r}")
        check(isinstance(stop, Integral) and start_at_layer <= stop <= L,
              f"stop_at_layer must be an int in [start_at_layer={start_at_layer}, {L}], got {stop_at_layer!r}")

    def embed(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """``input_ids [B, P]`` -> residual stream before layer 0, ``[B, P, D]``."""
        x = nn.functional.embedding(input_ids, self.W_E)
        if self.cfg.embed_scale is not None:  # as transformers: the scale rounded to the weights' dtype
            x = x * torch.tensor(self.cfg.embed_scale, device=x.device).to(x.dtype)
        x = self.hook_embed(x)
        if self.cfg.positional == "learned":
            x = x + self.hook_pos_embed(nn.functional.embedding(position_ids, self.W_pos))
        if self.W_token_type is not None:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.W_token_type(tt)
        return self.embed_ln(x) if self.embed_ln is not None else x

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        head_gate: Optional[Gate] = None,
        return_type: Optional[str] = "logits",
        start_at_layer: int = 0,
        stop_at_layer: Optional[int] = None,
        residual: Optional[torch.Tensor] = None,
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        past_kv=None,
    ):
        """Run the model.

        input_ids ``[B, P]``, a batch dict (:func:`headlens.model.tokens.encode`), or text (a
        string or a list of strings, tokenized as :meth:`to_tokens` with ``prepend_bos`` /
        ``padding_side``); attention_mask ``[B, P]`` (1 = real token). ``return_type``:
        ``"logits"`` (``[B, P, V]``; hidden states for models without an output head),
        ``"hidden"`` (final hidden states ``[B, P, D]``), ``"loss"`` (mean next-token
        cross-entropy; ``[B, P - 1]`` with ``loss_per_token``), ``"both"`` (``(logits, loss)``)
        or ``None``. ``start_at_layer`` with ``residual [B, P, D]`` resumes from that layer's
        residual stream; ``stop_at_layer`` returns the residual stream entering that layer.
        ``past_kv``: a :class:`headlens.model.kv_cache.KVCache` of the positions before these
        (then the inputs are positions ``S0 ..`` and ``attention_mask`` is ``[B, S0 + P]``); an
        open cache is extended.
        """
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and isinstance(input_ids[0], str)):
            from headlens.model.tokens import encode

            input_ids = encode(self, input_ids, prepend_bos=prepend_bos, padding_side=padding_side or "right")
        if isinstance(input_ids, Mapping):  # a batch dict or a transformers BatchEncoding
            batch = input_ids
            input_ids = batch["input_ids"]
            attention_mask = batch.get("attention_mask", attention_mask)
            token_type_ids = batch.get("token_type_ids", token_type_ids)
        cfg = self.cfg
        check(return_type in RETURN_TYPES, f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if residual is None:
            check(input_ids is not None, "forward needs input_ids (or residual with start_at_layer)")
            check(isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2,
                  "input_ids must be a [batch, pos] tensor, got " + (f"shape {tuple(input_ids.shape)}" if
                  isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
            check(start_at_layer == 0, "start_at_layer > 0 needs the residual stream entering that layer")
        else:
            check(isinstance(residual, torch.Tensor) and residual.ndim == 3,
                  "residual must be a [batch, pos, d_model] tensor, got " + (f"shape {tuple(residual.shape)}" if
                  isinstance(residual, torch.Tensor) else type(residual).__name__))
        B, P = (residual if residual is not None else input_ids).shape[:2]
        S0 = 0 if past_kv is None else past_kv.length
        check(past_kv is None or S0 == 0 or past_kv.batch_size == B,
              f"past_kv holds {past_kv.batch_size if past_kv is not None else 0} rows, the input has {B}")
        check(S0 + P <= cfg.n_ctx, f"sequence length {S0 + P} exceeds the model's context of {cfg.n_ctx} tokens")
        self.check_inputs(B, P, input_ids if residual is None else None, attention_mask, token_type_ids,
                          position_ids, residual, start_at_layer, stop_at_layer, S0)
        if head_gate is not None:
            self.check_gate(head_gate, B)
        if position_ids is None:
            position_ids = torch.arange(S0, S0 + P, device=self.device)[None].expand(B, P)
        x = residual if residual is not None else self.embed(input_ids, token_type_ids, position_ids)
        masks, cos_sin = {}, {}  # per sliding window / rotary: layers that share them share one copy
        stop = cfg.n_layers if stop_at_layer is None else stop_at_layer
        for layer in range(start_at_layer, stop):
            attn = self.blocks[layer].attn
            if attn.sliding_window not in masks:  # built only if a layer runs the explicit path or needs it
                masks[attn.sliding_window] = LazyMask(
                    partial(self.attention_mask_bias, attention_mask, P, x.dtype, S0, layer),
                    plain_causal(cfg, attention_mask, P, S0, attn.sliding_window), self.device)
            rot = attn.rotary
            if rot is not None and rot.key not in cos_sin:
                cos_sin[rot.key] = rot.cos_sin(position_ids, x.dtype)
            x = self.blocks[layer](x, masks[attn.sliding_window], self._gate_for(head_gate, layer),
                                   cos_sin[rot.key] if rot is not None else None, past_kv=past_kv)
        if stop_at_layer is not None:
            return x.to(self.device)
        if self.ln_final is not None:
            x = self.ln_final(x.to(module_device(self.ln_final, x.device)))
        x = self.hook_final(x.to(self.device))
        if return_type is None:
            return None
        if return_type == "hidden" or (self.unembed is None and return_type == "logits"):
            return x
        logits = self.unembed(x, self.W_E) if self.unembed is not None else None
        loss_mask = attention_mask[:, -P:] if attention_mask is not None else None  # the mask covers past_kv too
        return self._output(return_type, logits, input_ids, loss_mask, loss_per_token)
